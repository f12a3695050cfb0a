"""``bastion evaluate``: white-box attacks on the digits model, scored by the gateway's screening.

Runs the ART attacks of ``attacks.ATTACKS`` on correctly classified test digits, keeps the
successes (after rounding to 8-bit pixels), scores them and the clean test split with the
gateway's own screening job and committed calibration, then runs the adaptive attack. Writes
``adversarial.md``, ``adversarial.json`` and ROC plots under ``--out``.

Run: ``python -m bastion.benchmarks.adversarial.evaluate [--seeds 500]
[--attacks fgsm,bim,pgd,cw,deepfool] [--no-adaptive] [--out benchmarks/results/adversarial]
[--save-examples]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bastion.benchmarks.adversarial import adaptive as adaptive_attack
from bastion.benchmarks.adversarial import attacks as zoo
from bastion.benchmarks.adversarial import report, scoring
from bastion.benchmarks.adversarial.scoring import COMBINED, Scores
from bastion.gateway.progress import Progress
from bastion.models.data import load_split
from bastion.models.weights import load_digits

RESULTS = Path(__file__).resolve().parents[1] / "results" / "adversarial"
EXAMPLES = "examples.npz"


def curves(
    clean: Scores, adversarial: Scores, names: tuple[str, ...], cuts: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """ROC curve and calibrated operating point of every decision, for plotting."""
    out = {}
    for name in (*names, COMBINED):
        negatives, positives = clean.column(name, names), adversarial.column(name, names)
        fpr, tpr = scoring.roc(negatives, positives)
        out[name] = {
            "fpr": fpr,
            "tpr": tpr,
            "auc": scoring.auc(negatives, positives),
            "point": (
                scoring.flagged_rate(negatives, cuts[name]),
                scoring.flagged_rate(positives, cuts[name]),
            ),
        }
    return out


def attack_record(result: zoo.AttackResult, scores: Scores, metrics: dict) -> dict[str, Any]:
    """What the report keeps of one attack."""
    return {
        "successes": result.successes,
        "attempts": result.attempts,
        "mean_l2": result.mean_l2,
        "mean_linf": result.mean_linf,
        "runtime_s": result.runtime_s,
        "served_agrees": int((scores.predictions == result.predictions).sum()),
        "metrics": metrics,
    }


def static_attacks(
    specs: tuple[zoo.AttackSpec, ...], job: Any, seeds: np.ndarray, seed: int
) -> tuple[dict[str, zoo.AttackResult], dict[str, Scores]]:
    """Runs every attack and scores its successes through the screening job."""
    images, labels = load_split("test")
    net = load_digits()
    results, scores = {}, {}
    with Progress("evaluate: white-box attacks", len(specs), "attacks", every_s=0) as progress:
        for spec in specs:
            results[spec.name] = result = zoo.run_attack(spec, net, images, labels, seeds, seed)
            scores[spec.name] = scoring.score(job, result.pixels)
            print(f"{spec.name}: {result.successes}/{result.attempts} in {result.runtime_s:.1f} s")
            progress.advance()
    return results, scores


def adaptive_records(
    job: Any, seeds: np.ndarray, n: int, steps: int, seed: int
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The adaptive attack on the first ``n`` seeds, as report rows and evading examples."""
    images, labels = load_split("test")
    picked = seeds[:n]
    config = adaptive_attack.AdaptiveConfig(steps=steps)
    budgets = adaptive_attack.run_adaptive(
        job, images[picked], labels[picked], config=config, seed=seed
    )
    rows, evaders = [], {}
    for b in budgets:
        rows.append(
            {
                "eps": b.eps,
                "attempts": b.attempts,
                "unscreened": b.unscreened,
                "screened": b.screened,
                "unscreened_rate": b.unscreened / b.attempts,
                "screened_rate": b.screened / b.attempts,
                "by_lambda": b.by_lambda,
                "mean_l2": b.mean_l2,
                "mean_linf": b.mean_linf,
                "runtime_s": b.runtime_s,
            }
        )
        evaders[f"adaptive-{b.eps}"], evaders[f"adaptive-{b.eps}_labels"] = b.pixels, b.labels
        print(
            f"adaptive eps {b.eps}: unscreened {b.unscreened}, screened {b.screened} "
            f"of {b.attempts} in {b.runtime_s:.1f} s"
        )
    return rows, evaders


BLOCK_TARGET, REVIEW_TARGET = 0.95, 0.99  # pooled detection the tiers are held to


def summary(
    records: dict[str, dict],
    scores: dict[str, Scores],
    clean: Scores,
    names: tuple[str, ...],
    cuts: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """Pooled detection over all non-adaptive successes (each attack weighted by its count), at
    the block tier (withheld) and the review tier (withheld or reviewed)."""
    pooled = scoring.pool(list(scores.values()))
    by_tier = {tier: scoring.metrics(clean, pooled, names, c) for tier, c in cuts.items()}
    block, review = by_tier["block"][COMBINED], by_tier["review"][COMBINED]
    return {
        report.POOLED: {
            "successes": sum(r["successes"] for r in records.values()),
            "metrics": by_tier["block"],
            "review_metrics": by_tier["review"],
        },
        "combined_tpr": block["tpr"],
        "combined_fpr": block["fpr"],
        "review_tpr": review["tpr"],
        "review_fpr": review["fpr"],
        "target_95": block["tpr"] >= BLOCK_TARGET and review["tpr"] >= REVIEW_TARGET,
    }


def examples(
    clean: np.ndarray,
    labels: np.ndarray,
    results: dict[str, zoo.AttackResult],
    extra: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Arrays for the end-to-end check: uint8 (n, 1, 28, 28) images, ``<name>_labels`` beside.

    ``adaptive-<eps>`` holds the adaptive examples that the screen passed (expected to be
    answered, not blocked); empty sets are left out.
    """
    arrays = {"clean": clean, "clean_labels": labels}
    for name, r in results.items():
        arrays[name], arrays[f"{name}_labels"] = r.pixels, r.labels
        arrays[f"{name}_seed_index"] = r.seed_index
    arrays = {**arrays, **extra}
    empty = {name for name, a in arrays.items() if a.ndim == 4 and len(a) == 0}
    return {k: a for k, a in arrays.items() if k not in empty and k.split("_", 1)[0] not in empty}


def describe(
    specs: tuple[zoo.AttackSpec, ...], seeds: int, seed: int, adaptive_seeds: int, steps: int
) -> dict[str, Any]:
    """What was run, with which versions, so a result can be reproduced."""
    import art

    config = adaptive_attack.AdaptiveConfig(steps=steps)
    return {
        "seeds": seeds,
        "seed": seed,
        "attacks": [s.name for s in specs],
        "specs": {
            s.name: {"art": s.art_class, "max_seeds": s.max_seeds, **s.kwargs} for s in specs
        },
        "adaptive": {
            "seeds": adaptive_seeds,
            "steps": steps,
            "budgets": list(adaptive_attack.BUDGETS),
            "lambdas": list(config.lambdas),
            "kappa": config.kappa,
            "check_every": config.check_every,
        },
        "torch": torch.__version__,
        "art": art.__version__,
    }


def run(
    n_seeds: int = 500,
    attacks: list[str] | None = None,
    out_dir: Path = RESULTS,
    adaptive: bool = True,
    seed: int = 0,
    save_examples: bool = False,
    adaptive_seeds: int = 100,
    adaptive_steps: int = 100,
) -> dict[str, Any]:
    """The whole evaluation; writes the report under ``out_dir`` and returns its numbers."""
    start = time.perf_counter()
    np.random.seed(seed)
    torch.manual_seed(seed)
    specs = zoo.select(attacks)
    job, calibration = scoring.build_job()
    names = calibration.detectors
    tiers = {tier: scoring.thresholds(job, tier) for tier in scoring.TIERS}
    cuts = tiers["block"]
    images, labels = load_split("test")
    clean = scoring.score(job, images)
    seeds = zoo.select_seeds(load_digits(), images, labels, n_seeds, seed)
    results, scores = static_attacks(specs, job, seeds, seed)
    records = {
        name: attack_record(r, scores[name], scoring.metrics(clean, scores[name], names, cuts))
        for name, r in results.items()
    }
    for name, record in records.items():
        review = scoring.metrics(clean, scores[name], names, tiers["review"])
        record["review_metrics"] = review
    plots = {name: curves(clean, s, names, cuts) for name, s in scores.items() if len(s.combined)}
    plots[report.POOLED] = curves(clean, scoring.pool(list(scores.values())), names, cuts)
    rows, evaders = (
        adaptive_records(job, seeds, adaptive_seeds, adaptive_steps, seed) if adaptive else ([], {})
    )
    result = {
        "config": describe(
            specs, len(seeds), seed, adaptive_seeds if adaptive else 0, adaptive_steps
        ),
        "detectors": list(names),
        "calibration": {
            "samples": calibration.samples,
            "combiner": calibration.rule,
            "tiers": {tier: 10.0 ** -c[COMBINED] for tier, c in tiers.items()},
            "thresholds": {tier: c[COMBINED] for tier, c in tiers.items()},
            "mahalanobis_layer": job.gaussian.layer if job.gaussian is not None else None,
        },
        "clean": {"n": len(labels), "accuracy": float((clean.predictions == labels).mean())},
        "test_fpr": {n: scoring.flagged_rate(clean.column(n, names), cuts[n]) for n in cuts},
        "review_test_fpr": {
            n: scoring.flagged_rate(clean.column(n, names), tiers["review"][n]) for n in cuts
        },
        "attacks": records,
        "summary": summary(records, scores, clean, names, tiers),
        "adaptive": rows,
    }
    result["runtime_s"] = time.perf_counter() - start
    report.write(result, plots, out_dir)
    if save_examples:
        np.savez_compressed(out_dir / EXAMPLES, **examples(images, labels, results, evaders))
    return result


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=500, help="correctly classified test seeds")
    parser.add_argument(
        "--attacks",
        default=",".join(zoo.FAMILIES),
        help=f"comma-separated families: {','.join(zoo.FAMILIES)}",
    )
    parser.add_argument("--no-adaptive", action="store_true", help="skip the adaptive attack")
    parser.add_argument("--adaptive-seeds", type=int, default=100)
    parser.add_argument("--adaptive-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--save-examples",
        action="store_true",
        help=f"write {EXAMPLES} (uint8 clean and adversarial digits, labels)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = run(
        n_seeds=args.seeds,
        attacks=[a.strip() for a in args.attacks.split(",") if a.strip()],
        out_dir=args.out,
        adaptive=not args.no_adaptive,
        seed=args.seed,
        save_examples=args.save_examples,
        adaptive_seeds=args.adaptive_seeds,
        adaptive_steps=args.adaptive_steps,
    )
    print(report.markdown(result))
    return 0 if result["summary"]["target_95"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
