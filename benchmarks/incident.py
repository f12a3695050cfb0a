"""Incident: does the stateful defence catch a coordinated query-based attack, and spare the rest?

One real gateway (bundled repository, screening ``block``, ``BASTION_DEFENCE=on``, probes answered
as ``--response evidence`` or ``repeat``) on 127.0.0.1 is watched through two phases:

- **before** (``--before`` s): honest clients only (4 threads, ~20 requests/s each, one image
  a request): fresh photos of their own test digits (rotation ±12°, scale 0.9-1.1, shift ±2 px),
  and at 5 % each an exact retry of a recent one and a JPEG re-encode (quality 70-95); beside
  them ``--honest-newcomers`` threads (1) that take a fresh identity every
  ``--newcomer-rotate`` (10) requests, the young identities a defence against rotating
  attackers weighs on;
- **during**: the same, while the attacks run one after another, each on its own ``--seeds``
  seeds (correctly classified test digits the screening passes; decision-based attacks start
  from the nearest such digit of another class, which must lie beyond L2 4: a nearer one is
  another digit already inside the threat ball, "won" without a query), never held by an
  honest client.

The attacker rotates its ``X-Client-ID`` every ``--rotate`` queries (fresh random names), reads a
refused query (403 or 429) as "not adversarial" (uniform probabilities for a score-based attack,
the seed's label for a decision-based one) and never backs off. Attacks: ART HopSkipJump and
BoundaryAttack (decision-based, L2 <= 4), SquareAttack (L-inf 0.3) and SimBA (pixel, L-inf);
foolbox HopSkipJumpAttack and BoundaryAttack (L2 <= 4) through an ``nn.Module`` that asks the
gateway; up to ``--parallel`` queries in flight. Each seed has ``--budget`` queries and stops
``--after-detection`` queries after its detection: the first of its queries, under any identity,
that the defence acted on: answered with a repeat (the earlier answer of the query it nearly
duplicates), refused as a repeat (403 reason ``repeat``), 429, or 403 ``contained`` (a plain 403
is the per-image screening, not detection). The first 429 or 403 ``contained`` (what the attacker
sees of its identities' containment) is reported beside it.

Per attack: queries until detection, the share of later queries refused or answered with a
repeat (a 200 whose probabilities differ from the model's own output for the image sent by more
than 1e-4: ``repeat`` mode), adversarial examples obtained (a fresh 200 for an image misclassified
and within the bound of its seed, the start image excepted) and whether the attack's final image
(or, when stopped, the closest one the attacker believed adversarial) is adversarial for the real
model within the bound. L2 <= 4 is loose for 28x28 digits: a blend of the seed and its start
half-way across can already count, so a decision-based attack may obtain one in its first few
queries, before any evidence exists (the table says how many came before detection). Then an
adaptive attacker (OARS, Feng et al., CCS 2023): ART HopSkipJump whose queries carry fresh
uniform noise, which waits out a 429 and switches identity on a refusal
(``benchmarks.incident_attacker.AdaptiveOracle``), stopped only by its budget; success is a
fresh 200 for an image within L2 4 of its seed that the real model misclassifies (target: at
most 5 % of seeds). Honest clients: refusal rate before and during (a plain 403 from the
screening counts), and how many were ever throttled or contained (target: none). Every honest
picture is scored offline afterwards: the ones the per-image screening withholds by itself
explain a phase's refusals up to which pictures it happened to draw (±0.35 points at 2,400
requests), so the before/during comparison [within 0.2 points] is made on the rest, what the
defence refused on top of the screening.

``--honest-only`` is the volume check instead: 8 honest processes as fast as they go, the same
picture mix, ``--honest-requests`` in all (or ``--max-seconds``); target: no honest client ever
throttled or contained.

Run: ``python -m bastion.benchmarks.incident [--quick] [--attacks art-hsj,...,adaptive] [--response
evidence|repeat]`` (2-5 minutes on 2 cores; ``--quick``: 2 seeds, smaller budgets, about 90 s)
or ``--honest-only --honest-requests 100000``. Markdown and JSON (every query's outcome per
seed as a trace) go to ``benchmarks/results/incident/``; helpers in ``incident_clients``,
``incident_attacker`` and ``incident_report``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bastion.benchmarks import incident_attacker as attacker
from bastion.benchmarks import incident_clients as clients
from bastion.benchmarks.adversarial.through_gateway import running_gateway
from bastion.benchmarks.incident_report import (
    ADAPTIVE,
    gateway_view,
    honest_probes,
    markdown,
    probe_actions,
    summarise_attacks,
    summarise_honest,
    summarise_volume,
    transitions,
    volume_markdown,
)

RESULTS = Path(__file__).resolve().parent / "results" / "incident"
L2_BOUND, LINF_BOUND = attacker.L2_BOUND, attacker.LINF_BOUND
FULL = {
    "hsj_iter": 10, "hsj_max_eval": 200, "hsj_init_eval": 20,
    "boundary_iter": 40, "boundary_trials": 10, "boundary_samples": 10,
    "square_iter": 300, "simba_iter": 500, "fb_boundary_steps": 500,
}  # fmt: skip
QUICK = {
    "hsj_iter": 4, "hsj_max_eval": 60, "hsj_init_eval": 10,
    "boundary_iter": 10, "boundary_trials": 5, "boundary_samples": 5,
    "square_iter": 100, "simba_iter": 150, "fb_boundary_steps": 150,
}  # fmt: skip


@dataclass(frozen=True)
class AttackSpec:
    name: str
    library: str
    decision: bool  # decision-based: one-hot answers, a refusal read as the seed's label
    norm: str
    bound: float
    run: Callable[[Any, np.ndarray, int, np.ndarray, dict[str, int]], np.ndarray]


def _art(oracle: Any) -> Any:
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    return BlackBoxClassifierNeuralNetwork(
        oracle, input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0)
    )


def _art_hsj(oracle: Any, x: np.ndarray, y: int, start: np.ndarray, s: dict[str, int]) -> Any:
    from art.attacks.evasion import HopSkipJump

    attack = HopSkipJump(
        _art(oracle),
        batch_size=64,
        targeted=False,
        norm=2,
        max_iter=s["hsj_iter"],
        max_eval=s["hsj_max_eval"],
        init_eval=s["hsj_init_eval"],
        verbose=False,
    )
    return attack.generate(x, y=np.eye(10)[[y]], x_adv_init=start)


def _art_boundary(oracle: Any, x: np.ndarray, y: int, start: np.ndarray, s: dict[str, int]) -> Any:
    from art.attacks.evasion import BoundaryAttack

    attack = BoundaryAttack(
        _art(oracle),
        batch_size=64,
        targeted=False,
        max_iter=s["boundary_iter"],
        num_trial=s["boundary_trials"],
        sample_size=s["boundary_samples"],
        verbose=False,
    )
    return attack.generate(x, y=np.eye(10)[[y]], x_adv_init=start)


def _art_square(oracle: Any, x: np.ndarray, y: int, start: np.ndarray, s: dict[str, int]) -> Any:
    from art.attacks.evasion import SquareAttack

    attack = SquareAttack(
        _art(oracle), norm=np.inf, eps=LINF_BOUND, max_iter=s["square_iter"], verbose=False
    )
    return attack.generate(x, y=np.eye(10)[[y]])


def _art_simba(oracle: Any, x: np.ndarray, y: int, start: np.ndarray, s: dict[str, int]) -> Any:
    from art.attacks.evasion import SimBA

    attack = SimBA(_art(oracle), attack="px", max_iter=s["simba_iter"], epsilon=0.2, verbose=False)
    return attack.generate(x, y=np.eye(10)[[y]])


def _foolbox(make: Callable[[dict[str, int]], Any]) -> Callable[..., np.ndarray]:
    """A foolbox attack on the gateway: the oracle wrapped in an ``nn.Module`` returning
    log-probabilities, started from the nearest digit of another class."""

    def run(oracle: Any, x: np.ndarray, y: int, start: np.ndarray, s: dict[str, int]) -> Any:
        import foolbox
        import torch

        class Gateway(torch.nn.Module):
            def forward(self, images: torch.Tensor) -> torch.Tensor:
                answers = oracle(images.detach().cpu().numpy())
                return torch.from_numpy(np.log(np.clip(answers, 1e-12, 1.0)))

        model = foolbox.PyTorchModel(Gateway().eval(), bounds=(0.0, 1.0), device="cpu")
        criterion = foolbox.criteria.Misclassification(torch.tensor([y]))
        adv = make(s).run(
            model, torch.from_numpy(x), criterion, starting_points=torch.from_numpy(start)
        )
        return adv.numpy()

    return run


def _fb_hsj(s: dict[str, int]) -> Any:
    from foolbox.attacks import HopSkipJumpAttack

    return HopSkipJumpAttack(
        steps=s["hsj_iter"],
        initial_gradient_eval_steps=s["hsj_init_eval"],
        max_gradient_eval_steps=s["hsj_max_eval"],
    )


def _fb_boundary(s: dict[str, int]) -> Any:
    from foolbox.attacks import BoundaryAttack

    return BoundaryAttack(steps=s["fb_boundary_steps"])


ATTACKS = {
    "art-hsj": AttackSpec("HopSkipJump", "ART", True, "l2", L2_BOUND, _art_hsj),
    "art-boundary": AttackSpec("BoundaryAttack", "ART", True, "l2", L2_BOUND, _art_boundary),
    "art-square": AttackSpec("SquareAttack", "ART", False, "linf", LINF_BOUND, _art_square),
    "art-simba": AttackSpec("SimBA (px)", "ART", False, "linf", LINF_BOUND, _art_simba),
    "fb-hsj": AttackSpec("HopSkipJumpAttack", "foolbox", True, "l2", L2_BOUND, _foolbox(_fb_hsj)),
    "fb-boundary": AttackSpec(
        "BoundaryAttack", "foolbox", True, "l2", L2_BOUND, _foolbox(_fb_boundary)
    ),
}
ADAPTIVE_SPEC = AttackSpec("HopSkipJump + OARS", "ART", True, "l2", L2_BOUND, _art_hsj)


def run_seed(
    key: str, oracle: attacker.Oracle, seeds: dict[str, np.ndarray], i: int, args: Any
) -> dict[str, Any]:
    """One seed through one attack; the ledger's numbers and the final image's truth."""
    import torch

    spec = ATTACKS.get(key, ADAPTIVE_SPEC)
    x, y, start = seeds["x"][i : i + 1], int(seeds["y"][i]), seeds["start"][i : i + 1]
    seconds = args.adaptive_seconds if key == ADAPTIVE else args.attack_seconds
    ledger = attacker.Ledger(x, y, start if spec.decision else None, spec.norm, spec.bound)
    ledger.deadline = time.monotonic() + seconds
    oracle.begin(ledger)
    np.random.seed(args.seed + i)  # ART draws from numpy's global generator
    torch.manual_seed(args.seed + i)
    started, final = time.perf_counter(), None
    try:
        final = np.asarray(spec.run(oracle, x, y, start, args.settings), np.float32)
    except attacker.StopAttack as stop:
        ledger.ended = str(stop)
    except (ValueError, RuntimeError, AssertionError) as exc:
        # foolbox checks its own invariants: a start that is refused, or a point found
        # adversarial once and "not adversarial" (refused) when asked again
        ledger.ended = f"error: {type(exc).__name__} {exc}"[:160]
    if final is None:  # stopped: the closest image the attacker believed adversarial
        final = ledger.believed[1] if ledger.believed else x
    with torch.no_grad():
        predicted = int(oracle.net(torch.from_numpy(final.reshape(clients.SHAPE))).argmax(1)[0])
    return {
        "attack": key,
        "name": spec.name,
        "library": spec.library,
        "threat": f"{spec.norm} <= {spec.bound:g}",
        "seed_index": int(seeds["index"][i]),
        "label": y,
        "seconds": time.perf_counter() - started,
        "final_adversarial": predicted != y and ledger.within(final),
        "final_distance": ledger.distance(final),
        "sigma": getattr(oracle, "sigma", None),
        **ledger.summary(),
        "_withheld": np.array(ledger.withheld).reshape(-1, *clients.SHAPE[1:]),
        "_request_ids": ledger.request_ids,
    }


def run_attacks(url: str, seeds: dict[str, np.ndarray], args: Any) -> list[dict[str, Any]]:
    """Every chosen attack, one after another, each on its own slice of the seeds."""
    from bastion.models.weights import load_digits

    net, rows = load_digits(), []
    limits = {k: getattr(args, k) for k in ("budget", "after_detection", "rotate", "parallel")}
    for n, key in enumerate(args.attacks):
        decision = ATTACKS.get(key, ADAPTIVE_SPEC).decision
        if key == ADAPTIVE:  # it keeps going after detection: only its budget stops it
            oracle: attacker.Oracle = attacker.AdaptiveOracle(
                url, net, decision, {**limits, "after_detection": args.budget}, args.seed + 1000 * n
            )
        else:
            oracle = attacker.Oracle(url, net, decision, limits, args.seed + 1000 * n)
        for i in range(n * args.seeds, (n + 1) * args.seeds):
            rows.append(run_seed(key, oracle, seeds, i, args))
            shown = {k: v for k, v in rows[-1].items() if k != "trace" and k[0] != "_"}
            print(json.dumps(shown), flush=True)
        oracle.close()
    return rows


def gateway_env(args: Any) -> dict[str, str]:
    return {
        "BASTION_DEFENCE": "on",
        "BASTION_PROBE_RESPONSE": args.response,
        "BASTION_THROTTLE_INTERVAL_S": str(args.throttle_interval_s),
        "BASTION_ALERT_S": str(args.alert_s),
        "OMP_NUM_THREADS": "1",
        "BASTION_LOG_LEVEL": "debug",  # each probe's line: the gateway's view of detection
    }


def incident(args: Any) -> dict[str, Any]:
    from bastion.gateway.settings import DEFAULT_REPOSITORY

    seeds, honest_digits = attacker.choose_seeds(
        args.seeds * len(args.attacks), args.seed, L2_BOUND
    )
    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bastion-incident-") as tmp:
        with running_gateway(DEFAULT_REPOSITORY, Path(tmp), env=gateway_env(args)) as url:
            fleet = clients.HonestFleet(
                url,
                honest_digits,
                args.honest_clients,
                args.honest_rate,
                args.seed,
                args.honest_newcomers,
                args.newcomer_rotate,
            )
            phases["before"] = time.time()
            fleet.start()
            try:
                time.sleep(args.before)
                fleet.phase, phases["during"] = "during", time.time()
                rows = run_attacks(url, seeds, args)
            finally:
                records = fleet.stop()
            phases["end"] = time.time()
        logged = transitions(Path(tmp) / "bastion.log")
        acted = probe_actions(Path(tmp) / "bastion.log")
        honest = honest_probes(Path(tmp) / "bastion.log")
        if args.keep_log is not None:  # every probe and rung change, by request id
            shutil.copyfile(Path(tmp) / "bastion.log", args.keep_log)
    for row in rows:  # scored after the gateway is gone, so the CPUs were the gateway's
        request_ids = row.pop("_request_ids")
        gateway_view(row, request_ids, acted)
        if args.keep_log is not None:  # to read each query's line in the log beside its trace
            row["request_ids"] = request_ids
        row["withheld_by_screening_alone"] = attacker.screening_alone(row.pop("_withheld"))
    alone = attacker.withheld_alone(np.stack([r[6] for r in records]) if records else np.zeros(0))
    return {
        "rows": rows,
        "table": summarise_attacks(rows),
        "honest": {**summarise_honest(records, phases, alone), "probes": honest},
        "transitions_logged": logged,
    }


def volume(args: Any) -> dict[str, Any]:
    """Honest traffic only, ``--volume-clients`` processes as fast as they go."""
    from bastion.gateway.settings import DEFAULT_REPOSITORY
    from bastion.models.data import load_split, to_float

    digits = to_float(load_split("test")[0])
    n = args.volume_clients
    with tempfile.TemporaryDirectory(prefix="bastion-incident-") as tmp:
        with running_gateway(DEFAULT_REPOSITORY, Path(tmp), env=gateway_env(args)) as url:
            started = time.time()
            share = [args.honest_requests // n + (i < args.honest_requests % n) for i in range(n)]
            deadline = started + args.max_seconds
            jobs = [
                (url, f"honest-{i}", digits[i::n], share[i], deadline, args.seed + i)
                for i in range(n)
            ]
            with mp.get_context("spawn").Pool(n) as pool:
                workers = pool.map(clients.volume_worker, jobs)
            wall = time.time() - started
        logged = transitions(Path(tmp) / "bastion.log")
    return {"volume": summarise_volume(workers, wall), "transitions_logged": logged}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--response", choices=("evidence", "repeat"), default="evidence")
    parser.add_argument("--attacks", default=",".join([*ATTACKS, ADAPTIVE]))
    parser.add_argument("--seeds", type=int, default=3, help="seed digits per attack")
    parser.add_argument("--budget", type=int, default=1000, help="queries per seed")
    parser.add_argument("--after-detection", type=int, default=200, help="queries per seed")
    parser.add_argument("--rotate", type=int, default=10, help="queries per attacker identity")
    parser.add_argument("--parallel", type=int, default=4, help="attacker queries in flight")
    parser.add_argument("--attack-seconds", type=float, default=120.0, help="cap per seed")
    parser.add_argument("--adaptive-seconds", type=float, default=90.0, help="cap per seed")
    parser.add_argument("--honest-clients", type=int, default=4)
    parser.add_argument(
        "--honest-newcomers", type=int, default=1, help="honest threads of fresh identities"
    )
    parser.add_argument("--newcomer-rotate", type=int, default=10, help="requests per newcomer")
    parser.add_argument("--honest-rate", type=float, default=20.0, help="requests/s per client")
    parser.add_argument("--before", type=float, default=30.0, help="seconds of honest traffic")
    parser.add_argument("--throttle-interval-s", type=float, default=1.0)
    parser.add_argument(
        "--alert-s", type=float, default=0.0, help="the gateway's alert_s (0, its default: none)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 90 s")
    parser.add_argument("--honest-only", action="store_true", help="the volume check instead")
    parser.add_argument("--honest-requests", type=int, default=100_000)
    parser.add_argument("--volume-clients", type=int, default=8)
    parser.add_argument(
        "--max-seconds", type=float, default=900.0, help="bound of the volume check"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--keep-log", type=Path, help="copy the gateway's debug log (each probe, by request) here"
    )
    args = parser.parse_args(argv)
    unknown = set(args.attacks.split(",")) - {*ATTACKS, ADAPTIVE}
    if unknown:
        parser.error(f"unknown attacks {sorted(unknown)}; known: {[*ATTACKS, ADAPTIVE]}")
    args.attacks = args.attacks.split(",")
    args.settings = QUICK if args.quick else FULL
    if args.quick:
        args.seeds, args.budget, args.before = 2, min(args.budget, 300), min(args.before, 15.0)
        args.after_detection = min(args.after_detection, 50)
        args.attack_seconds = min(args.attack_seconds, 25.0)
        args.adaptive_seconds = min(args.adaptive_seconds, 25.0)
    return args


def _git(*command: str) -> str:
    done = subprocess.run(["git", *command], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    result = volume(args) if args.honest_only else incident(args)
    result = {
        "command": shlex.join(
            [
                "python",
                "-m",
                "bastion.benchmarks.incident",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted": _git("status", "--porcelain", "--", "gateway", "models").splitlines(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "elapsed_s": time.perf_counter() - started,
        **result,
    }
    text = volume_markdown(result) if args.honest_only else markdown(result)
    name = "honest_volume" if args.honest_only else f"incident_{args.response}"
    name += "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
