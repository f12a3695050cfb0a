"""Markdown tables, ROC plots and the JSON record of an adversarial evaluation.

Everything here reads the result dictionary that ``evaluate.run`` builds; nothing recomputes a
number, so the table, the plots and the JSON always agree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bastion.benchmarks.adversarial.scoring import COMBINED

POOLED = "pooled"


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _auc(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def attack_table(result: dict[str, Any]) -> list[str]:
    """Successes, distortion and runtime per attack."""
    lines = [
        "| attack | successes / attempts | success % | mean L2 | mean L∞ | served graph agrees "
        "| runtime (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in result["attacks"].items():
        rate = a["successes"] / a["attempts"] if a["attempts"] else float("nan")
        lines.append(
            f"| {name} | {a['successes']} / {a['attempts']} | {_pct(rate)} | "
            f"{a['mean_l2']:.2f} | {a['mean_linf']:.3f} | {a['served_agrees']} | "
            f"{a['runtime_s']:.1f} |"
        )
    return lines


def detection_table(result: dict[str, Any]) -> list[str]:
    """ROC-AUC and detection rate (TPR %) at the calibrated thresholds, and the clean FPR."""
    names = [*result["detectors"], COMBINED]
    header = " | ".join(f"{n} AUC | {n} TPR %" for n in names)
    lines = [f"| attack | n | {header} |", "|---|---:|" + "---:|" * (2 * len(names))]
    rows = {**result["attacks"], f"**{POOLED}**": result["summary"][POOLED]}
    for name, a in rows.items():
        cells = " | ".join(
            f"{_auc(a['metrics'][n]['auc'])} | {_pct(a['metrics'][n]['tpr'])}" for n in names
        )
        lines.append(f"| {name} | {a['successes']} | {cells} |")
    fpr = " | ".join(f" | {_pct(result['test_fpr'][n])}" for n in names)
    lines.append(f"| clean test (FPR %) | {result['clean']['n']} | {fpr} |")
    return lines


def tier_table(result: dict[str, Any]) -> list[str]:
    """The combined decision per attack at both tiers: withheld, and withheld or reviewed."""
    t = result["calibration"]["tiers"]
    lines = [
        f"| attack | n | withheld % (block, {100 * t['block']:.1f} % FPR) "
        f"| withheld or reviewed % (review, {100 * t['review']:.0f} % FPR) |",
        "|---|---:|---:|---:|",
    ]
    rows = {**result["attacks"], f"**{POOLED}**": result["summary"][POOLED]}
    for name, a in rows.items():
        block = a["metrics"][COMBINED]["tpr"]
        review = a["review_metrics"][COMBINED]["tpr"]
        lines.append(f"| {name} | {a['successes']} | {_pct(block)} | {_pct(review)} |")
    lines.append(
        f"| clean test (FPR %) | {result['clean']['n']} | {_pct(result['test_fpr'][COMBINED])} "
        f"| {_pct(result['review_test_fpr'][COMBINED])} |"
    )
    return lines


def adaptive_table(result: dict[str, Any]) -> list[str]:
    """Adaptive attack success against the budget, screened beside unscreened."""
    lines = [
        "| ε (L∞) | seeds | unscreened success % | screened success % | "
        "evaded at λ (0/1/10…) | mean L∞ of evaders | runtime (s) |",
        "|---:|---:|---:|---:|---|---:|---:|",
    ]
    for b in result.get("adaptive", []):
        lams = "/".join(str(v) for v in b["by_lambda"].values())
        lines.append(
            f"| {b['eps']} | {b['attempts']} | {_pct(b['unscreened_rate'])} | "
            f"{_pct(b['screened_rate'])} | {lams} | {_auc(b['mean_linf'])} | "
            f"{b['runtime_s']:.1f} |"
        )
    return lines


NOTES = (
    "Distortions are measured on the 8-bit images, so L∞ may exceed ε by half a pixel level "
    "(0.002). 'served graph agrees' counts successes whose label from the gateway's "
    "channels-last served graph equals the attacked network's.",
    "TPR is the share of successful adversarial examples flagged at the block tier's threshold "
    "(score > threshold; every column is a clean surprise -log10 p, the detectors' under their "
    "own clean tails); the clean test row gives the false-positive rate of each decision on "
    "the clean test split.",
    "Adaptive attack: L∞ PGD, random start, step ε/40, ascending CE(f(x), y) - λ·[f(x) ≠ y]·"
    "(Σ_d relu(s_d/τ_d - κ) + CE of the squeezed copies against f's label), τ_d the score at "
    "which detector d alone crosses the block tier, with BPDA (identity) "
    "through bit depth, the median differentiated through kthvalue, and the gradient-norm "
    "detector by double backpropagation; λ = 0, 1, 10 tried in turn per seed. Success: the real "
    "screening job, on the 8-bit image kept inside the ε-ball, finds it misclassified and not "
    "withheld by the block tier (the review tier serves it). Unscreened success: plain PGD "
    "(λ = 0) misclassifies.",
)


def markdown(result: dict[str, Any]) -> str:
    """The whole report: attacks, detection, adaptive attack."""
    c = result["calibration"]
    pooled = result["summary"][POOLED]["metrics"][COMBINED]
    review = result["summary"][POOLED]["review_metrics"][COMBINED]
    parts = [
        "# Adversarial evaluation of the digits model's screening",
        "",
        f"Seeds: {result['config']['seeds']} correctly classified test digits (seed "
        f"{result['config']['seed']}); successes counted after rounding to 8-bit pixels. "
        f"Negatives: the {result['clean']['n']} clean test digits. Thresholds: the committed "
        f"calibration ({c['samples']} calibration digits, combiner {c['combiner']}, "
        f"Mahalanobis layer {c['mahalanobis_layer']}); block tier at "
        f"{100 * c['tiers']['block']:.1f} % target FPR (combined score > "
        f"{c['thresholds']['block']:.3f}), review tier at {100 * c['tiers']['review']:.0f} % "
        f"(> {c['thresholds']['review']:.3f}).",
        "",
        f"**Pooled over the non-adaptive attacks: the block tier withholds {_pct(pooled['tpr'])} "
        f"% of {result['summary'][POOLED]['successes']} successful adversarial examples at "
        f"{_pct(result['test_fpr'][COMBINED])} % clean test FPR; the review tier catches "
        f"{_pct(review['tpr'])} % (withheld or reviewed) at "
        f"{_pct(result['review_test_fpr'][COMBINED])} % (ROC-AUC {_auc(pooled['auc'])}).**",
        "",
        "## Attacks",
        "",
        *attack_table(result),
        "",
        "## Tiers",
        "",
        *tier_table(result),
        "",
        "## Detection by detector (block tier)",
        "",
        *detection_table(result),
    ]
    if result.get("adaptive"):
        parts += ["", "## Adaptive attack (PGD through the detectors, BPDA)", ""]
        parts += adaptive_table(result)
    parts += ["", "## Notes", "", *(f"- {note}" for note in NOTES)]
    parts += ["", f"Total runtime: {result['runtime_s']:.0f} s.", ""]
    return "\n".join(parts)


def _draw_roc(ax: Any, curves: dict[str, dict[str, Any]], xmax: float) -> None:
    for name, c in curves.items():
        style = {"lw": 2.5, "color": "black"} if name == COMBINED else {"lw": 1.5}
        line = ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {_auc(c['auc'])})", **style)[0]
        ax.plot([c["point"][0]], [c["point"][1]], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="false-positive rate (clean test)", xlim=(-0.005 * xmax, xmax), ylim=(0, 1.01))
    ax.grid(alpha=0.3)


def plot_roc(title: str, curves: dict[str, dict[str, Any]], path: Path) -> Path:
    """ROC per decision, whole and zoomed to FPR <= 0.2; dots mark the calibrated thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, zoom) = plt.subplots(1, 2, figsize=(10, 4.8))
    _draw_roc(whole, curves, 1.0)
    _draw_roc(zoom, curves, 0.2)
    whole.set(ylabel="true-positive rate (successful adversarial)", title=title)
    zoom.set(title="zoom: FPR <= 0.2 (dots: calibrated thresholds)")
    whole.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_adaptive(budgets: list[dict[str, Any]], path: Path) -> Path:
    """Adaptive attack success against the L-inf budget, screened and unscreened."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [b["eps"] for b in budgets]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(eps, [b["unscreened_rate"] for b in budgets], "o-", label="unscreened (misclassified)")
    ax.plot(eps, [b["screened_rate"] for b in budgets], "s-", label="screened (and not flagged)")
    ax.set(xlabel="L∞ budget ε", ylabel="attack success rate", ylim=(-0.02, 1.02))
    ax.set(title="Adaptive PGD (BPDA through the squeezers)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write(result: dict[str, Any], curves: dict[str, dict], out_dir: Path) -> list[Path]:
    """Writes the markdown, the JSON and every plot; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "adversarial.md", out_dir / "adversarial.json"]
    written[0].write_text(markdown(result))
    written[1].write_text(json.dumps(_jsonable(result), indent=1))
    for name, by_decision in curves.items():
        title = f"ROC: {name} vs clean test digits"
        written.append(plot_roc(title, by_decision, out_dir / f"roc_{name}.png"))
    if result.get("adaptive"):
        written.append(plot_adaptive(result["adaptive"], out_dir / "adaptive.png"))
    return written
