"""Query-based black-box attacks on the live gateway, over HTTP, with screening off and on.

A real attacker has no weights: it sends images and reads answers. ART's HopSkipJump (Chen et
al., S&P 2020; decision-based, L2) and Square (Andriushchenko et al., ECCV 2020; score-based,
L-inf eps 0.3) run against a ``BlackBoxClassifierNeuralNetwork`` whose ``predict`` calls the
gateway with ``tritonclient``. Three settings:

- ``off``: screening off (a repository copy); the attacker sees every answer.
- ``on``: the bundled repository (action ``block``), one image per request (a 403 withholds a
  whole request, so batching would blind the attacker to which image tripped it); a 403 is read
  as a uniform probability vector, the attacker learning nothing from it.
- ``on-adaptive``: the same gateway, but the attacker reads a 403 as "not adversarial yet" (the
  seed's own label), so the attack searches for images that are misclassified *and* pass.

Seeds are correctly classified test digits that the screened gateway lets through; HopSkipJump
starts from the nearest such digit of another class (the attacker owns natural digits). Success
means the final image, rounded to 8-bit pixels, is misclassified by the real model and, with
screening on, answered 200. Queries are images sent; judging the final images is not counted.

Run: ``python -m bastion.benchmarks.adversarial.blackbox [--seeds 10] [--max-queries 3000]
[--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bastion.benchmarks.adversarial.through_gateway import (
    MODEL,
    RESULTS,
    gateway_rule,
    offline_scores,
    running_gateway,
)

SETTINGS = ("off", "on", "on-adaptive")
ATTACKS = ("hopskipjump", "square")
MAX_BATCH = 64


class BudgetExceeded(RuntimeError):
    """The attacker spent its query budget on one seed."""


class GatewayOracle:
    """ART's ``predict_fn``: the gateway's probabilities, one row per image sent.

    It counts images sent and images refused, and answers a refused image the way the setting's
    attacker reads a 403. One tritonclient per worker thread (the client is not thread-safe).
    """

    def __init__(self, url: str, one_per_request: bool, blocked_as: str, budget: int) -> None:
        import tritonclient.http as triton_http

        self._http, self.url, self.budget = triton_http, url, budget
        self.chunk = 1 if one_per_request else MAX_BATCH
        self.blocked_as = blocked_as  # "uniform" or "label"
        self.label = 0  # the current seed's true label (the attacker knows its own image)
        self.queries = self.blocked = 0
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="oracle")

    def reset(self, label: int) -> None:
        self.label, self.queries, self.blocked = label, 0, 0

    def _client(self) -> Any:
        if getattr(self._local, "client", None) is None:
            self._local.client = self._http.InferenceServerClient(self.url, network_timeout=30)
        return self._local.client

    def ask(self, x: np.ndarray) -> np.ndarray | None:
        """Probabilities for one request, or None when the gateway refused it (403)."""
        from tritonclient.utils import InferenceServerException

        tensor = self._http.InferInput("images", list(x.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(x, np.float32), binary_data=True)
        try:
            return self._client().infer(MODEL, [tensor]).as_numpy("probabilities")
        except InferenceServerException as exc:
            if exc.status() != "403":
                raise
            return None

    def refused_answer(self) -> np.ndarray:
        if self.blocked_as == "uniform":
            return np.full(10, 0.1, np.float32)
        return np.eye(10, dtype=np.float32)[self.label]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.queries + len(x) > self.budget:
            raise BudgetExceeded(f"{self.queries} queries spent, {len(x)} more asked")
        chunks = [x[i : i + self.chunk] for i in range(0, len(x), self.chunk)]
        answers = list(self._pool.map(self.ask, chunks))
        self.queries += len(x)
        rows = []
        for chunk, answer in zip(chunks, answers, strict=True):
            if answer is None:
                self.blocked += len(chunk)
                answer = np.tile(self.refused_answer(), (len(chunk), 1))
            rows.append(answer)
        return np.concatenate(rows)

    def close(self) -> None:
        self._pool.shutdown()


def eligible_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test split as floats, its labels, and the indices of the digits an attack may
    start from: correctly classified, and passed by the screened gateway (scored offline)."""
    import torch

    from bastion.gateway.settings import DEFAULT_REPOSITORY
    from bastion.models.data import load_split, to_float
    from bastion.models.weights import load_digits

    images, labels = load_split("test")
    x = to_float(images)
    with torch.no_grad():
        correct = load_digits()(torch.from_numpy(x)).argmax(1).numpy() == labels
    combined, threshold = offline_scores({"test": x}, 250, DEFAULT_REPOSITORY)
    return x, labels, np.flatnonzero(correct & ~gateway_rule(combined["test"][:, -1], threshold))


def pick_seeds(count: int, seed: int) -> dict[str, np.ndarray]:
    """Correctly classified test digits the screened gateway passes, and for each the nearest
    (L2) such digit of another class, HopSkipJump's starting point."""
    x, labels, eligible = eligible_digits()
    chosen = np.random.default_rng(seed).choice(eligible, size=count, replace=False)
    starts = []
    for i in chosen:
        others = eligible[labels[eligible] != labels[i]]
        distances = np.linalg.norm((x[others] - x[i]).reshape(len(others), -1), axis=1)
        starts.append(others[distances.argmin()])
    return {"index": chosen, "x": x[chosen], "y": labels[chosen], "start": x[np.array(starts)]}


def make_attack(name: str, classifier: Any, args: argparse.Namespace) -> Any:
    from art.attacks.evasion import HopSkipJump, SquareAttack

    if name == "hopskipjump":
        return HopSkipJump(
            classifier,
            batch_size=MAX_BATCH,
            targeted=False,
            norm=2,
            max_iter=args.hsj_iter,
            max_eval=args.hsj_max_eval,
            init_eval=args.hsj_init_eval,
            init_size=10,
            verbose=False,
        )
    return SquareAttack(
        classifier,
        norm=np.inf,
        eps=0.3,
        max_iter=args.square_iter,
        p_init=0.8,
        nb_restarts=1,
        batch_size=MAX_BATCH,
        verbose=False,
    )


def attack_seed(
    name: str,
    classifier: Any,
    oracle: GatewayOracle,
    seeds: dict[str, np.ndarray],
    i: int,
    args: argparse.Namespace,
) -> tuple[np.ndarray, str]:
    """One seed through one attack; returns the attacker's final image and how it ended."""
    x, y = seeds["x"][i : i + 1], seeds["y"][i : i + 1]
    oracle.reset(int(y[0]))
    np.random.seed(args.seed + i)  # ART draws from numpy's global generator
    extra = {"x_adv_init": seeds["start"][i : i + 1]} if name == "hopskipjump" else {}
    try:
        return make_attack(name, classifier, args).generate(x, y=y, **extra), "finished"
    except BudgetExceeded:
        return x, "budget"


def judge(oracle: GatewayOracle, net: Any, clean: np.ndarray, adv: np.ndarray) -> dict[str, Any]:
    """The final image as 8-bit pixels: the real model's label and whether the gateway answers
    it (asked directly, not counted as an attack query)."""
    import torch

    pixels = (np.round(adv * 255) / 255).astype(np.float32)
    with torch.no_grad():
        predicted = int(net(torch.from_numpy(pixels)).argmax(1)[0])
    answered = oracle.ask(pixels) is not None
    delta = (pixels - clean).ravel()
    return {
        "predicted": predicted,
        "answered": answered,
        "success": predicted != oracle.label and answered,
        "l2": float(np.linalg.norm(delta)),
        "linf": float(np.abs(delta).max()),
    }


def believed(oracle: GatewayOracle, adv: np.ndarray, ended: str) -> bool:
    """Whether the attacker, reading its own oracle, thinks its final (float) image works."""
    if ended != "finished":
        return False
    answer = oracle.ask(adv)
    return int(np.argmax(oracle.refused_answer() if answer is None else answer)) != oracle.label


def run_setting(
    setting: str, url: str, seeds: dict[str, np.ndarray], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every attack on every seed against one gateway, as one kind of attacker."""
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    from bastion.models.weights import load_digits

    net = load_digits()
    blocked_as = "label" if setting == "on-adaptive" else "uniform"
    oracle = GatewayOracle(url, setting != "off", blocked_as, args.max_queries)
    classifier = BlackBoxClassifierNeuralNetwork(
        oracle, input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0)
    )
    rows = []
    for name in args.attacks:
        for i in range(len(seeds["y"])):
            started = time.perf_counter()
            adv, ended = attack_seed(name, classifier, oracle, seeds, i, args)
            seconds = time.perf_counter() - started
            rows.append(
                {
                    "setting": setting,
                    "attack": name,
                    "seed_index": int(seeds["index"][i]),
                    "label": oracle.label,
                    "ended": ended,
                    "queries": oracle.queries,
                    "blocked": oracle.blocked,
                    "attacker_believes_success": believed(oracle, adv, ended),
                    "seconds": seconds,
                    **judge(oracle, net, seeds["x"][i : i + 1], adv),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    oracle.close()
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting and attack: the attacker's view, the truth, and what it cost."""
    table = []
    for setting in SETTINGS:
        for attack in ATTACKS:
            part = [r for r in rows if r["setting"] == setting and r["attack"] == attack]
            if not part:
                continue
            wins = [r for r in part if r["success"]]
            queries = sum(r["queries"] for r in part)
            blocked = sum(r["blocked"] for r in part)
            table.append(
                {
                    "setting": setting,
                    "attack": attack,
                    "seeds": len(part),
                    "attacker_believes": sum(r["attacker_believes_success"] for r in part),
                    "successes": len(wins),
                    "final_refused": sum(not r["answered"] for r in part),
                    "out_of_budget": sum(r["ended"] == "budget" for r in part),
                    "queries": queries,
                    "queries_per_seed": queries / len(part),
                    "blocked": blocked,
                    "blocked_share": blocked / queries if queries else 0.0,
                    "median_l2": float(np.median([r["l2"] for r in wins])) if wins else None,
                    "median_linf": float(np.median([r["linf"] for r in wins])) if wins else None,
                    "seconds": sum(r["seconds"] for r in part),
                }
            )
    return table


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [
        "# Black-box attacks through the gateway's API",
        "",
        f"{a['seeds']} seeds (correctly classified test digits the screened gateway passes); "
        f"HopSkipJump (L2, untargeted, max_iter {a['hsj_iter']}, init_eval {a['hsj_init_eval']}, "
        f"max_eval {a['hsj_max_eval']}, started from the nearest passing digit of another class); "
        f"Square (L-inf eps 0.3, max_iter {a['square_iter']}); at most {a['max_queries']} queries "
        f"per seed and attack. Success: the final image, as 8-bit pixels, is misclassified by the "
        f"real model and answered 200. Run took {result['elapsed_s']:.0f} s.",
        "",
        "| setting | attack | seeds | attacker believes | successes | final image refused "
        "| out of budget | queries / seed | queries refused | median L2 | median L-inf | s |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {r['setting']} | {r['attack']} | {r['seeds']} | {r['attacker_believes']} "
        f"| {r['successes']} | {r['final_refused']} | {r['out_of_budget']} "
        f"| {r['queries_per_seed']:.0f} | {r['blocked']} ({r['blocked_share']:.0%}) "
        f"| {_num(r['median_l2'])} | {_num(r['median_linf'])} | {r['seconds']:.0f} |"
        for r in result["table"]
    ]
    lines += ["", *SETTING_NOTES, ""]
    return "\n".join(lines)


SETTING_NOTES = (
    "- off: screening off; the attacker reads every answer (requests of up to 64 images).",
    "- on: action block, one image per request; a 403 is read as a uniform probability vector "
    "(argmax class 0), the attacker learning nothing from it.",
    "- on-adaptive: the same gateway; a 403 is read as the seed's own label (not adversarial "
    "yet), so the attack looks for images that are misclassified and pass.",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--max-queries", type=int, default=3000, help="per seed and attack")
    parser.add_argument("--hsj-iter", type=int, default=15)
    parser.add_argument("--hsj-init-eval", type=int, default=30)
    parser.add_argument("--hsj-max-eval", type=int, default=150)
    parser.add_argument("--square-iter", type=int, default=500)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.attacks = [a for a in args.attacks.split(",") if a in ATTACKS]
    settings = [s for s in args.settings.split(",") if s in SETTINGS]
    started = time.perf_counter()
    seeds = pick_seeds(args.seeds, args.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bastion-blackbox-") as tmp:
        if "off" in settings:
            rows += _against(False, ["off"], Path(tmp), seeds, args)
        rows += _against(True, [s for s in settings if s != "off"], Path(tmp), seeds, args)
    result = {
        "args": {**vars(args), "out": str(args.out)},
        "elapsed_s": 0.0,
        "rows": rows,
        "table": summarise(rows),
    }
    result["elapsed_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "blackbox.json").write_text(json.dumps(result, indent=1))
    (args.out / "blackbox.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _against(
    screening: bool,
    settings: list[str],
    workdir: Path,
    seeds: dict[str, np.ndarray],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Starts the gateway for one screening mode and runs each of its attacker settings."""
    from bastion.benchmarks.serving import bastion_repository
    from bastion.gateway.settings import DEFAULT_REPOSITORY

    if not settings:
        return []
    folder = workdir / ("on" if screening else "off")
    folder.mkdir()
    repository = DEFAULT_REPOSITORY if screening else bastion_repository(folder, screening=False)
    rows = []
    with running_gateway(repository, folder) as url:
        for setting in settings:
            rows += run_setting(setting, url, seeds, args)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
