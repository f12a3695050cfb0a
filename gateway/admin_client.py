"""A small HTTP client for the admin API, used by ``bastion quarantine`` (stdlib only)."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class AdminError(RuntimeError):
    pass


def call(
    url: str,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    query: dict[str, Any] | None = None,
    timeout_s: float = 30.0,
) -> Any:
    params = {k: v for k, v in (query or {}).items() if v is not None}
    target = url.rstrip("/") + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
    if "://" not in target:
        target = "http://" + target
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(target, data=data, method=method)
    if token:  # none given: the server says a token is needed, not that it is wrong
        request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]
        raise AdminError(f"{exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise AdminError(f"cannot reach {url}: {exc.reason}") from None
    except (http.client.HTTPException, ConnectionError, ValueError) as exc:
        raise AdminError(
            f"{url} did not answer as Bastion's HTTP port ({type(exc).__name__}); is it the "
            "gRPC port? Admin commands use the HTTP port (--url, BASTION_URL)"
        ) from None


def describe_stats(stats: dict[str, Any], now: float | None = None) -> list[str]:
    """``GET /v2/quarantine/stats`` as lines for a terminal."""
    quota = stats["quota"]
    now = time.time() if now is None else now

    def share(used: int, limit: int) -> str:
        return f"of {limit} ({100 * used / limit:.1f}%)"

    def pairs(counts: dict[str, int]) -> str:
        return " ".join(f"{k}={v}" for k, v in counts.items()) or "-"

    def when(t: float | None) -> str:
        if t is None:
            return "-"
        stamp = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
        return f"{stamp} ({(now - t) / 3600:.1f} h ago)"

    clients = " ".join(
        f"{c['client_id'] if c['client_id'] is not None else '(none)'}={c['records']}"
        for c in stats["top_clients"]
    )
    return [
        f"records      {stats['records']} {share(stats['records'], quota['max_records'])}",
        f"bytes        {stats['bytes']} {share(stats['bytes'], quota['max_bytes'])}",
        f"per client   at most {quota['max_records_per_client']} records",
        f"over quota   {'YES: new records are dropped' if stats['over_quota'] else 'no'}",
        f"by status    {pairs(stats['by_status'])}",
        f"by model     {pairs(stats['by_model'])}",
        f"oldest       {when(stats['oldest'])}",
        f"newest       {when(stats['newest'])}",
        f"top clients  {clients or '-'}",
        f"dropped      {pairs(stats['dropped'])}",
    ]
