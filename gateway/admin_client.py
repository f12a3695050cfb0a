"""A small HTTP client for the admin API, used by ``bastion quarantine`` (stdlib only)."""

from __future__ import annotations

import contextlib
import json
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
