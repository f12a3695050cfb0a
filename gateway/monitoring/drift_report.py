"""Drift reports in Evidently's format: a model version's reference profile against a window of
what it served, as the ledger recorded it.

The in-path monitor (``drift_monitor``) keeps only bin counts; the ledger keeps each image's
confidence, margin, pixel mean and sd, predicted class and an 8-dimensional random projection
of its embedding (``incidents.ledger``). A report puts the reference (rebuilt from the
profile: ``reference_frame``) beside a window of those rows (``window_frame``) in an Evidently
data-drift report, and beside it the monitor's own verdicts on the same window (PSI on the
profile's quantile bins, Jensen-Shannon divergence of the classes: ``monitor_verdicts``), with
where the two disagree and why (``differences``): Evidently bins and measures in its own way.

Needs the ``reports`` extra (Evidently, pandas); offline and read-only.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bastion.gateway.incidents.database import Database
from bastion.gateway.incidents.ledger import EMBEDDING_SUMMARY, embedding_projection
from bastion.gateway.monitoring import drift
from bastion.gateway.monitoring.reference import STATISTICS, ReferenceProfile

if TYPE_CHECKING:
    import pandas as pd

LAST_IMAGES = 500  # ``--window last``: as many images as the in-path monitor scores at once
EMBEDDING_COLUMNS = [f"embedding_{i}" for i in range(EMBEDDING_SUMMARY)]
MAX_IMAGES = 200_000  # a window's rows read at most (the newest)
# normed Wasserstein distance per embedding-summary dimension: twice Evidently's default, as
# eight dimensions are tested at once on 500-image windows (clean test digits against the
# bundled profile score 0.05-0.13 per dimension, the same digits at half brightness 0.43-0.87)
EMBEDDING_THRESHOLD = 0.2
MAX_EMBEDDING_VALUE = 1e6  # a summary past it is a corrupt row, not a layer's output


@dataclass(frozen=True)
class Verdict:
    """One statistic's drift score and whether it passes its threshold, by one judge."""

    statistic: str
    method: str
    score: float
    threshold: float
    drifted: bool


def reference_frame(profile: ReferenceProfile) -> tuple[pd.DataFrame, bool]:
    """The reference as rows Evidently can compare, and whether they are the real ones: the
    statistics, class and embedding of the clean images the profile sampled (``rows``), or,
    for a profile from before it kept them, each statistic spread evenly inside each quantile
    bin in the bin's share and the classes in their shares (marginals only, the tails
    approximate)."""
    import pandas as pd

    embeddings = profile.embeddings.float().numpy()
    frame: dict[str, Any] = {}
    if profile.rows is not None:
        values = profile.rows.double().numpy()
        for index, name in enumerate(STATISTICS):
            frame[name] = values[:, index]
        frame["predicted"] = values[:, len(STATISTICS)].astype(int)
    else:
        rows = max(len(embeddings), LAST_IMAGES)
        for index, name in enumerate(STATISTICS):
            edges = profile.edges[index].double().numpy()
            frame[name] = _spread(edges, profile.proportions[index].double().numpy(), rows)
        classes = profile.classes.double().numpy()
        frame["predicted"] = np.repeat(np.arange(len(classes)), _apportion(classes, rows))
    count = len(frame["predicted"])
    if embeddings.shape[0] == count and embeddings.shape[1] > 1:
        projected = embeddings @ embedding_projection(embeddings.shape[1])
        for column, values in zip(EMBEDDING_COLUMNS, projected.T, strict=True):
            frame[column] = values
    else:  # no embeddings kept (a network without a Linear head)
        for column in EMBEDDING_COLUMNS:
            frame[column] = np.full(count, np.nan)
    return pd.DataFrame(frame), profile.rows is not None


def _apportion(shares: np.ndarray, total: int) -> np.ndarray:
    """Counts summing to ``total`` in the given shares (largest remainders)."""
    exact = shares / max(shares.sum(), 1e-12) * total
    counts = np.floor(exact).astype(int)
    counts[np.argsort(exact - counts)[::-1][: total - counts.sum()]] += 1
    return counts


def _spread(edges: np.ndarray, shares: np.ndarray, rows: int) -> np.ndarray:
    """``rows`` values, each bin's share of them evenly inside it; the open outer bins are
    closed as wide as their neighbours, within [0, 1] where every statistic lies."""
    first = edges[1] - edges[0] if len(edges) > 1 else 0.1
    last = edges[-1] - edges[-2] if len(edges) > 1 else 0.1
    low = max(0.0, edges[0] - first) if edges[0] >= 0 else edges[0] - first
    high = min(1.0, edges[-1] + last) if edges[-1] <= 1 else edges[-1] + last
    bounds = np.concatenate([[low], edges, [high]])
    values = [
        np.linspace(bounds[i], bounds[i + 1], count + 2)[1:-1]
        for i, count in enumerate(_apportion(shares, rows))
    ]
    return np.concatenate(values)


def window_frame(
    db: Database,
    model: str,
    version: str,
    start: float | None = None,
    end: float | None = None,
    last: int | None = None,
) -> pd.DataFrame:
    """The ledger's rows of ``model``/``version``: between ``start`` and ``end`` (Unix
    seconds), or the ``last`` images; rows written before the drift columns are left out.
    Every outcome counts (served, withheld, refused), as the monitor sees every image."""
    import pandas as pd

    where = "model = ? AND version = ? AND margin IS NOT NULL"
    params: list[Any] = [model, version]
    if start is not None:
        where += " AND time >= ?"
        params.append(start)
    if end is not None:
        where += " AND time <= ?"
        params.append(end)
    limit = min(last or MAX_IMAGES, MAX_IMAGES)
    try:
        found = db.query(
            "SELECT time, confidence, margin, pixel_mean, pixel_std, predicted, embedding "
            f"FROM served WHERE {where} ORDER BY id DESC LIMIT {limit}",
            tuple(params),
        )
    except Exception as exc:
        if "margin" in str(exc):  # no such column: a ledger no gateway of this version opened
            raise ValueError(
                "this ledger has no drift statistics: it was written before they were "
                "recorded (a gateway of this version adds them when it opens the ledger)"
            ) from None
        raise
    found.reverse()
    frame = pd.DataFrame(
        [row[:6] for row in found],
        columns=["time", "confidence", "margin", "pixel_mean", "pixel_std", "predicted"],
    )
    for column in frame.columns:  # what the gateway wrote is numbers; anything else is dropped
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    width = EMBEDDING_SUMMARY * 4
    summaries = [
        np.frombuffer(row[6], "<f4")
        if isinstance(row[6], bytes | bytearray | memoryview) and len(row[6]) == width
        else np.full(EMBEDDING_SUMMARY, np.nan)
        for row in found
    ]
    embedded = np.vstack(summaries) if summaries else np.empty((0, EMBEDDING_SUMMARY))
    with np.errstate(invalid="ignore"):  # an embedding no layer computes is no embedding
        implausible = ~(np.abs(embedded) <= MAX_EMBEDDING_VALUE).all(axis=1)
    embedded[implausible] = np.nan
    for column, values in zip(EMBEDDING_COLUMNS, embedded.T, strict=True):
        frame[column] = values
    numbers = frame[["time", *STATISTICS]].to_numpy(np.float64)
    usable = np.isfinite(numbers).all(axis=1) & (frame["predicted"] >= 0).to_numpy()
    usable &= frame["predicted"].notna().to_numpy()
    frame = frame[usable].reset_index(drop=True)
    frame["predicted"] = frame["predicted"].astype(int)
    frame.attrs["unusable"] = int((~usable).sum())
    return frame


def monitor_verdicts(
    profile: ReferenceProfile, window: pd.DataFrame, psi_threshold: float, js_threshold: float
) -> list[Verdict]:
    """What the in-path monitor would say of this window: PSI of each statistic on the
    profile's own quantile bins, the Jensen-Shannon divergence (nats) of the classes."""
    # float32, as the monitor bins them
    values = torch.tensor(window[list(STATISTICS)].to_numpy(np.float32).T)
    observed = drift.proportions(drift.bin_counts(values, profile.edges.float()))
    scores = drift.psi(profile.proportions, observed).tolist()
    verdicts = [
        Verdict(name, "PSI", score, psi_threshold, score > psi_threshold)
        for name, score in zip(STATISTICS, scores, strict=True)
    ]
    classes = len(profile.classes)
    predicted = window["predicted"].to_numpy().astype(int)
    counts = np.bincount(predicted[predicted < classes], minlength=classes)
    observed = torch.tensor(counts[:classes], dtype=torch.float64)
    score = float(drift.js_divergence(profile.classes.double(), drift.proportions(observed)))
    drifted = score > js_threshold
    verdicts.append(Verdict("predicted", "JS divergence", score, js_threshold, drifted))
    return verdicts


def evidently_report(
    reference: pd.DataFrame, window: pd.DataFrame, psi_threshold: float, js_threshold: float
) -> tuple[Any, list[Verdict]]:
    """Evidently's data-drift report of ``window`` against ``reference`` (its snapshot) and
    its per-column verdicts: PSI for the statistics, Jensen-Shannon for the classes, and the
    embedding summary's drift (Evidently's MMD) when the window has embeddings."""
    os.environ.setdefault("DO_NOT_TRACK", "1")  # Evidently's usage telemetry: never from here
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    embedded = bool(len(window)) and not window[EMBEDDING_COLUMNS].isna().any().any()
    embedded = embedded and not reference[EMBEDDING_COLUMNS].isna().any().any()
    definition = DataDefinition(
        numerical_columns=list(STATISTICS) + (EMBEDDING_COLUMNS if embedded else []),
        categorical_columns=["predicted"],
    )
    columns = [*STATISTICS, "predicted"]
    summary = EMBEDDING_COLUMNS if embedded else []
    preset = DataDriftPreset(
        columns=columns + summary,
        num_method="psi",
        num_threshold=psi_threshold,
        cat_method="jensenshannon",
        cat_threshold=js_distance(js_threshold),
        # the embedding summary's dimensions: the distance between the distributions in units
        # of the reference's spread, Evidently's default for large numeric samples
        per_column_method={column: "wasserstein" for column in summary},
        per_column_threshold={column: EMBEDDING_THRESHOLD for column in summary},
    )
    keep = columns + summary
    snapshot = Report([preset]).run(
        Dataset.from_pandas(window[keep].reset_index(drop=True), data_definition=definition),
        Dataset.from_pandas(reference[keep], data_definition=definition),
    )
    verdicts = []
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        if config.get("type", "").endswith("ValueDrift") and config.get("column") in keep:
            score = float(metric["value"])
            threshold = float(config["threshold"])
            method = {
                "psi": "PSI",
                "jensenshannon": "JS distance",
                "wasserstein": "Wasserstein (normed)",
            }.get(config["method"], config["method"])
            verdicts.append(Verdict(config["column"], method, score, threshold, score >= threshold))
    return snapshot, verdicts


def js_distance(divergence_nats: float) -> float:
    """The Jensen-Shannon distance (base 2, what Evidently's ``jensenshannon`` reports) of a
    divergence in nats (the monitor's): the same threshold on Evidently's scale."""
    return math.sqrt(max(divergence_nats, 0.0) / math.log(2))


def differences(ours: list[Verdict], theirs: list[Verdict], real: bool = True) -> list[str]:
    """Where the monitor's verdict and Evidently's differ, each with the reason; ``real``:
    whether Evidently's reference is the profile's own sample of clean images."""
    by_name = {v.statistic: v for v in theirs}
    notes = []
    for mine in ours:
        other = by_name.get(mine.statistic)
        if other is None or other.drifted == mine.drifted:
            continue
        sample = (
            f"its reference is the profile's sample of {LAST_IMAGES} clean images, the "
            "monitor's the quantiles of all of them"
            if real
            else "its reference is rebuilt from the profile's quantile bins (this profile "
            "keeps no sample of clean images: `bastion profile` writes one), so its tails "
            "are approximate"
        )
        why = (
            "Evidently's PSI bins the values its own way (equal-width bins over the "
            "reference's range), the monitor on the profile's ten quantile bins, and " + sample
            if mine.method == "PSI"
            else "both compare the same Jensen-Shannon threshold (Evidently's distance is the "
            "square root of the divergence in bits, its threshold converted to match), but "
            f"Evidently's reference classes are those of the profile's {LAST_IMAGES} sampled "
            "images, the monitor's the shares of all of them"
        )
        notes.append(
            f"{mine.statistic}: the monitor says {'drift' if mine.drifted else 'no drift'} "
            f"({mine.method} {mine.score:.3g} against {mine.threshold:g}), Evidently "
            f"{'drift' if other.drifted else 'no drift'} ({other.method} {other.score:.3g} "
            f"against {other.threshold:g}): {why}."
        )
    return notes


def comparison_html(
    title: str, ours: list[Verdict], theirs: list[Verdict], notes: list[str], images: int
) -> str:
    """The section put at the top of the report: both judges' verdicts and their differences."""
    by_name = {v.statistic: v for v in theirs}

    def cell(verdict: Verdict | None) -> str:
        if verdict is None:
            return "<td>-</td>"
        mark = "drift" if verdict.drifted else "no drift"
        return (
            f"<td>{mark}: {verdict.method} {verdict.score:.3g} "
            f"(threshold {verdict.threshold:g})</td>"
        )

    rows = "".join(
        f"<tr><td>{html.escape(v.statistic)}</td>{cell(v)}{cell(by_name.get(v.statistic))}</tr>"
        for v in ours
    )
    listed = "".join(f"<li>{html.escape(note)}</li>" for note in notes) or (
        "<li>The monitor and Evidently agree on every statistic.</li>"
    )
    listed += (
        "<li>The embedding summary (an 8-dimensional random projection of each image's "
        "penultimate layer, as the ledger records it) is Evidently's alone: the monitor tests "
        "the full embeddings with MMD in the serving path, which the ledger does not keep. It "
        "is left out when an image of the window has none (an unscreened model computes "
        "none; rows from before the summary have none).</li>"
    )
    return (
        '<section id="bastion-drift" style="font-family:sans-serif;margin:16px">'
        f"<h2>{html.escape(title)}</h2><p>{images} images in the window.</p>"
        "<table border=1 cellpadding=4><tr><th>statistic</th><th>Bastion's in-path monitor"
        f"</th><th>Evidently</th></tr>{rows}</table><h3>Where they differ</h3><ul>{listed}</ul>"
        "</section>"
    )


def build(
    profile: ReferenceProfile,
    window: pd.DataFrame,
    title: str,
    psi_threshold: float,
    js_threshold: float,
) -> tuple[str, list[Verdict], list[Verdict], list[str]]:
    """The report's HTML (Evidently's page with the comparison at its top), the monitor's
    verdicts, Evidently's and their differences. Raises ValueError for an empty window."""
    if len(window) == 0:
        unusable = window.attrs.get("unusable", 0)
        raise ValueError(
            "the window holds no recorded images of this model version"
            + (f" ({unusable} rows with statistics that are not numbers)" if unusable else "")
        )
    ours = monitor_verdicts(profile, window, psi_threshold, js_threshold)
    reference, real = reference_frame(profile)
    snapshot, theirs = evidently_report(reference, window, psi_threshold, js_threshold)
    notes = differences(ours, theirs, real)
    page = snapshot.get_html_str(as_iframe=False)
    section = comparison_html(title, ours, theirs, notes, len(window))
    at = page.find("<body")
    at = page.find(">", at) + 1 if at >= 0 else 0
    return page[:at] + section + page[at:], ours, theirs, notes


LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the last time ISO 8601 dates reach


def parse_time(value: str) -> float:
    """Unix seconds from a number or an ISO 8601 time (UTC when it names no zone), between
    1970 and 9999. Raises ValueError for anything else."""
    from datetime import UTC, datetime

    try:
        stamp = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not a time: {value!r} (ISO 8601 or Unix seconds)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        stamp = moment.timestamp()
    if not (math.isfinite(stamp) and 0.0 <= stamp <= LATEST_TIME):
        raise ValueError(f"not a time between 1970 and 9999: {value!r}")
    return stamp
