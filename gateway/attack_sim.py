"""Attack simulation: replay clean and adversarial traffic into a running gateway at a set rate.

A team that deploys Bastion needs to see its blocks, alerts and quarantine fire before a real
attacker does. ``simulate`` sends one image per request, open loop (request ``i`` leaves at
``start + i / rate`` whatever the answers, so a slow gateway cannot slow the load down and hide its
own latency, and the rate is never exceeded), honest clean traffic under ``X-Client-ID``
``client-1 .. client-N`` and adversarial traffic under the attacker's id. Latency is measured from
each request's scheduled time, so time spent waiting for a free sender counts (no coordinated
omission). The run stops by itself after ``duration_s`` or ``max_requests``.

Adversarial images come from an ``.npz`` file (array ``images``, float32 in [0, 1], shape
(n, 1, 28, 28)) or are made on the fly: PGD-L-inf (Madry et al. 2018; eps 0.3, 20 steps) against
the bundled digits model, rounded to 8-bit pixels and kept where they fool it. It needs only torch.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("clean", "adversarial")
OUTCOMES = ("ok", "blocked", "contained", "error")  # contained: the stateful defence (429, 403)
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Planned:
    """One request of the schedule: what it carries and under whose client id."""

    index: int
    kind: str
    client_id: str
    image: int  # row of the clean or adversarial pool


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    outcome: str
    latency_s: float  # from the scheduled send time to the answer
    lag_s: float  # how late the send actually started


@dataclass
class SimulationReport:
    """What an operator compares with the gateway's own metrics and alerts."""

    url: str
    model: str
    rate_per_s: float
    duration_s: float
    adversarial_source: str
    attacker_id: str
    sent: int
    counts: dict[str, dict[str, int]]  # kind -> outcome -> requests
    latency_ms: dict[str, dict[str, float]]  # kind -> p50 / p99 (answered requests)
    elapsed_s: float
    max_lag_ms: float  # worst delay between a request's slot and its departure
    errors: list[str] = field(default_factory=list)  # first few error messages

    @property
    def block_rate(self) -> float:
        """Share of adversarial requests refused (403 by the screening, or 429 / 403 by the
        stateful defence once it contained the attacker), of those answered."""
        return _rate(self.counts["adversarial"])

    @property
    def false_block_rate(self) -> float:
        """Share of clean requests refused: the price honest clients pay."""
        return _rate(self.counts["clean"])

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(block_rate=self.block_rate, false_block_rate=self.false_block_rate)
        return data


def _rate(counts: dict[str, int]) -> float:
    refused = counts["blocked"] + counts["contained"]
    answered = counts["ok"] + refused
    return refused / answered if answered else float("nan")


def pgd_linf(
    net: Any, x: np.ndarray, y: np.ndarray, eps: float = 0.3, steps: int = 20, seed: int = 0
) -> np.ndarray:
    """PGD-L-inf with a random start and step 2.5 eps / steps (Madry et al. 2018), 8-bit output."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    clean, labels = torch.from_numpy(x), torch.from_numpy(y)
    noise = (torch.rand(clean.shape, generator=generator) * 2 - 1) * eps
    adv = (clean + noise).clamp(0, 1)
    step = 2.5 * eps / steps
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(adv), labels), adv)
        adv = (adv.detach() + step * grad.sign()).clamp(clean - eps, clean + eps).clamp(0, 1)
    return (torch.round(adv * 255) / 255).numpy().astype(np.float32)


@lru_cache(maxsize=4)
def generated_adversarial(seed: int = 0, count: int = 128) -> np.ndarray:
    """PGD digits from the test split that the bundled model misclassifies (all if none do)."""
    import torch

    from bastion.models.data import load_split, to_float
    from bastion.models.weights import load_digits

    net = load_digits()
    images, labels = load_split("test")
    pick = np.random.default_rng(seed).choice(len(images), size=count, replace=False)
    x, y = to_float(images[pick]), labels[pick]
    adv = pgd_linf(net, x, y, seed=seed)
    with torch.no_grad():
        fooled = net(torch.from_numpy(adv)).argmax(1).numpy() != y
    return adv[fooled] if fooled.any() else adv


def load_examples(path: Path) -> np.ndarray:
    """Adversarial images from ``.npz``: array ``images`` (or ``adversarial``), or else every
    (n, 1, 28, 28) array in the file except ``clean``, stacked; floats in [0, 1] or uint8."""
    with np.load(path) as data:
        for key in ("images", "adversarial"):
            if key in data.files:
                return _checked(data[key], path)
        arrays = [data[k] for k in data.files if k != "clean" and data[k].ndim == 4]
    if not arrays:
        raise ValueError(f"{path}: no array 'images' of shape (n, 1, 28, 28)")
    return np.concatenate([_checked(a, path) for a in arrays])


def _checked(images: np.ndarray, path: Path) -> np.ndarray:
    if images.dtype == np.uint8:  # 8-bit pixels
        images = images.astype(np.float32) / np.float32(255)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0 or images.min() < 0 or images.max() > 1:
        raise ValueError(f"{path}: need float images in [0, 1] of shape (n, 1, 28, 28)")
    return images


def make_plan(
    total: int,
    adversarial_fraction: float,
    clients: int,
    attacker_id: str,
    pools: tuple[int, int],
    seed: int,
) -> list[Planned]:
    """Which requests are adversarial (a seeded shuffle of exactly round(fraction * total)) and
    which client and image each carries."""
    rng = np.random.default_rng(seed)
    n_adv = round(adversarial_fraction * total)
    adversarial = np.zeros(total, dtype=bool)
    adversarial[rng.choice(total, size=n_adv, replace=False)] = True
    plan = []
    for i, is_adv in enumerate(adversarial.tolist()):
        kind = KINDS[int(is_adv)]
        client = attacker_id if is_adv else f"client-{i % clients + 1}"
        plan.append(Planned(i, kind, client, int(rng.integers(pools[int(is_adv)]))))
    return plan


class _Sender:
    """Sends one planned image per request; one tritonclient per worker thread (it is not
    thread-safe), so concurrent requests never share a connection."""

    def __init__(self, url: str, model: str, pools: tuple[np.ndarray, np.ndarray]) -> None:
        import tritonclient.http as triton_http

        self._http = triton_http
        self.url, self.model, self.pools = url, model, pools
        self._local = threading.local()
        self._clients: list[Any] = []
        meta = self._client().get_model_metadata(model)
        self.input_name = meta["inputs"][0]["name"]
        self.errors: list[str] = []

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._http.InferenceServerClient(
                self.url, connection_timeout=REQUEST_TIMEOUT_S, network_timeout=REQUEST_TIMEOUT_S
            )
            self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def send(self, item: Planned, due: float) -> Outcome:
        from tritonclient.utils import InferenceServerException

        started = time.perf_counter()
        image = self.pools[int(item.kind == "adversarial")][item.image][None]
        tensor = self._http.InferInput(self.input_name, list(image.shape), "FP32")
        tensor.set_data_from_numpy(image, binary_data=True)
        try:
            self._client().infer(
                self.model,
                [tensor],
                request_id=f"sim-{item.index}",
                headers={"X-Client-ID": item.client_id},
            )
            outcome = "ok"
        except InferenceServerException as exc:
            status, message = exc.status(), str(exc.message())
            if status == "429" or (status == "403" and "contained" in message):
                outcome = "contained"  # the stateful defence refused the client
            else:
                outcome = "blocked" if status == "403" else "error"
            if outcome == "error" and len(self.errors) < 5:
                self.errors.append(str(exc))
        except Exception as exc:  # a transport failure is one error, never the end of the run
            outcome = "error"
            if len(self.errors) < 5:
                self.errors.append(repr(exc))
        return Outcome(item.kind, outcome, time.perf_counter() - due, started - due)


def simulate(
    url: str,
    model: str = "digits",
    rate_per_s: float = 50.0,
    duration_s: float = 30.0,
    adversarial_fraction: float = 0.1,
    clients: int = 4,
    attacker_id: str = "attacker-1",
    examples: Path | None = None,
    seed: int = 0,
    max_requests: int | None = None,
) -> SimulationReport:
    """Replays mixed traffic into the gateway at ``url`` and counts what it let through.

    ``rate_per_s`` requests per second, open loop, for ``duration_s`` seconds or ``max_requests``
    requests, whichever is fewer; ``adversarial_fraction`` of them carry adversarial images
    (from ``examples`` or made by PGD) under ``attacker_id``, the rest clean test digits under
    ``client-1 .. client-{clients}``; ``seed`` fixes which requests are which. Every request holds
    one image, so a 403 is that image's verdict. ``bastion attack-sim`` maps ``--url --model
    --rate --duration --adversarial-fraction --clients --examples --seed --max-requests`` onto
    these arguments one to one.
    """
    if rate_per_s <= 0 or duration_s <= 0 or clients < 1 or not 0 <= adversarial_fraction <= 1:
        raise ValueError("need rate > 0, duration > 0, clients >= 1 and a fraction in [0, 1]")
    from bastion.models.data import load_split, to_float

    adversarial = load_examples(examples) if examples else generated_adversarial(seed)
    source = str(examples) if examples else f"PGD-Linf eps 0.3, 20 steps (seed {seed})"
    pools = (to_float(load_split("test")[0]), adversarial)
    total = math.floor(rate_per_s * duration_s)
    total = min(total, max_requests) if max_requests is not None else total
    plan = make_plan(
        total, adversarial_fraction, clients, attacker_id, (len(pools[0]), len(pools[1])), seed
    )
    sender = _Sender(url.removeprefix("http://"), model, pools)
    try:
        outcomes, elapsed = _run_open_loop(sender, plan, rate_per_s)
    finally:
        sender.close()
    return _summarise(
        url, model, rate_per_s, duration_s, source, attacker_id, outcomes, elapsed, sender.errors
    )


def _run_open_loop(
    sender: _Sender, plan: list[Planned], rate: float
) -> tuple[list[Outcome], float]:
    """Submits request ``i`` at ``start + i / rate`` (a timed wait, not a busy loop)."""
    workers = min(32, max(4, math.ceil(rate / 10)))
    futures: list[Future[Outcome]] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="attack-sim") as pool:
        start = time.perf_counter()
        for item in plan:
            due = start + item.index / rate
            if (delay := due - time.perf_counter()) > 0:
                time.sleep(delay)
            futures.append(pool.submit(sender.send, item, due))
        outcomes = [f.result(timeout=2 * REQUEST_TIMEOUT_S + 5) for f in futures]
    return outcomes, time.perf_counter() - start


def _summarise(
    url: str,
    model: str,
    rate: float,
    duration: float,
    source: str,
    attacker_id: str,
    outcomes: list[Outcome],
    elapsed: float,
    errors: list[str],
) -> SimulationReport:
    counts = {k: dict.fromkeys(OUTCOMES, 0) for k in KINDS}
    latencies: dict[str, list[float]] = {k: [] for k in KINDS}
    for o in outcomes:
        counts[o.kind][o.outcome] += 1
        if o.outcome != "error":
            latencies[o.kind].append(o.latency_s * 1e3)
    latency_ms = {
        k: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
        if v
        else {"p50": float("nan"), "p99": float("nan")}
        for k, v in latencies.items()
    }
    max_lag = max((o.lag_s for o in outcomes), default=0.0) * 1e3
    return SimulationReport(
        url,
        model,
        rate,
        duration,
        source,
        attacker_id,
        len(outcomes),
        counts,
        latency_ms,
        elapsed,
        max_lag,
        errors,
    )


def format_report(report: SimulationReport) -> str:
    """A plain table for the terminal: per kind, requests by outcome and latency."""
    lines = [
        f"attack simulation against {report.url} model {report.model}: {report.sent} requests "
        f"in {report.elapsed_s:.1f} s ({report.sent / max(report.elapsed_s, 1e-9):.1f}/s, "
        f"target {report.rate_per_s:g}/s); adversarial from {report.adversarial_source}",
        f"{'kind':<12} {'sent':>6} {'ok':>6} {'blocked':>8} {'contained':>10} {'error':>6} "
        f"{'p50 ms':>8} {'p99 ms':>8}",
    ]
    for kind in KINDS:
        c, lat = report.counts[kind], report.latency_ms[kind]
        lines.append(
            f"{kind:<12} {sum(c.values()):>6} {c['ok']:>6} {c['blocked']:>8} "
            f"{c['contained']:>10} {c['error']:>6} {lat['p50']:>8.1f} {lat['p99']:>8.1f}"
        )
    lines.append(
        f"block rate (adversarial, as {report.attacker_id}): {report.block_rate:.1%}   "
        f"false block rate (clean): {report.false_block_rate:.1%}   "
        f"worst send lag {report.max_lag_ms:.1f} ms"
    )
    lines += [f"error: {e}" for e in report.errors]
    return "\n".join(lines)
