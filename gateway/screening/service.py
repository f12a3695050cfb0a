"""Applies a model's screening policy to one request's rows, after the fused batch ran.

Records verdict and score metrics, stores quarantined inputs durably (the response that names a
quarantine id is built only after its record is committed; an image whose record a store quota
drops is withheld all the same, and counted), and shapes what the client sees:
by default a request with any withheld image is refused whole with 403; a client that sets the
request parameter ``screening_report`` gets per-image verdicts and scores as extra outputs, with
NaN in place of every withheld image's prediction.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from gateway.backends import COMBINED, SCORES
from gateway.errors import Blocked
from gateway.monitoring.metrics import Metrics
from gateway.protocol.types import InferRequest, OutputTensor
from gateway.quarantine.retention import UsageMetrics
from gateway.quarantine.store import NewItem, QuarantineStore, Usage
from gateway.screening.calibration import Calibration
from gateway.screening.pipeline import ScreenedClassifier
from gateway.screening.policy import Decision, decide

REPORT_PARAMETER = "screening_report"
VERDICT_OUTPUT = "screening_verdict"
SCORES_OUTPUT = "screening_scores"


@dataclass
class Screened:
    decision: Decision
    quarantine_ids: dict[int, str]  # only the stored ones: a quota may drop a record
    scores: np.ndarray  # (n, D + 1): detectors, then the combined score
    columns: tuple[str, ...]
    quarantine_dropped: int = 0  # quarantined images whose record a quota dropped (withheld)


class ScreeningService:
    def __init__(self, store: QuarantineStore, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.publish_usage = UsageMetrics(metrics)

    def publish_calibration(self, model: str, version: str, job: ScreenedClassifier) -> None:
        """Publishes the calibrated clean flag rate (the alert baseline), never a threshold:
        thresholds are admin-only, since knowing them is a head start for an adaptive attacker."""
        calibration = job.calibration
        if calibration is None:
            return
        self.metrics.screening_target_fpr.labels(model, version).set(calibration.target_fpr)

    async def apply(
        self,
        job: ScreenedClassifier,
        action: str,
        model: str,
        version: str,
        request: InferRequest,
        inputs: dict[str, np.ndarray],
        results: dict[str, np.ndarray],
    ) -> Screened:
        calibration = job.calibration
        scores, combined = results[SCORES], results[COMBINED]
        threshold = calibration.combined_threshold if calibration else None
        decision = decide(combined, threshold, action)
        columns = (*(d.name for d in job.detectors), "combined")
        self._observe(model, version, columns, scores, decision)
        ids: dict[int, str] = {}
        dropped = 0
        if decision.quarantined:
            items = [
                _item(
                    model,
                    version,
                    request,
                    i,
                    inputs,
                    columns,
                    scores,
                    combined,
                    calibration,
                    decision.verdicts[i],
                )
                for i in decision.quarantined
            ]
            stored, usage = await asyncio.to_thread(self._store, items)
            pairs = zip(decision.quarantined, stored, strict=True)
            ids = {i: id_ for i, id_ in pairs if id_ is not None}
            dropped = len(stored) - len(ids)
            self.publish_usage(usage)
        return Screened(decision, ids, np.column_stack([scores, combined]), columns, dropped)

    def _store(self, items: list[NewItem]) -> tuple[list[str | None], Usage]:
        """Off the event loop: the write, then the usage the metrics mirror (one O(1) read)."""
        return self.store.add_many(items), self.store.usage()

    def _observe(
        self,
        model: str,
        version: str,
        columns: tuple[str, ...],
        scores: np.ndarray,
        decision: Decision,
    ) -> None:
        for column, name in enumerate(columns[:-1]):
            histogram = self.metrics.screening_score.labels(model, version, name)
            for value in scores[:, column].tolist():
                histogram.observe(value)
        for verdict, action in zip(decision.verdicts, decision.actions, strict=True):
            self.metrics.screening_verdicts.labels(model, version, verdict, action).inc()


def _item(
    model: str,
    version: str,
    request: InferRequest,
    index: int,
    inputs: dict[str, np.ndarray],
    columns: tuple[str, ...],
    scores: np.ndarray,
    combined: np.ndarray,
    calibration: Calibration | None,
    verdict: str,
) -> NewItem:
    row = dict(zip(columns, [*scores[index].tolist(), float(combined[index])], strict=True))
    thresholds = dict(calibration.thresholds) if calibration else {}
    if calibration:
        thresholds["combined"] = calibration.combined_threshold
    (name,) = inputs if len(inputs) == 1 else (next(iter(inputs)),)
    return NewItem(
        model=model,
        version=version,
        client_id=request.client_id,
        request_id=request.id,
        image_index=index,
        input=inputs[name][index].copy(),
        scores=row,
        thresholds=thresholds,
        verdict=verdict,
    )


def refuse_if_withheld(screened: Screened, request: InferRequest) -> None:
    """The default: a request with any withheld image gets 403 and no prediction at all."""
    decision = screened.decision
    if not decision.withheld or request.parameters.get(REPORT_PARAMETER) is True:
        return
    ids = [screened.quarantine_ids[i] for i in decision.withheld if i in screened.quarantine_ids]
    message = (
        f"request {request.id or '(no id)'}: images {decision.withheld} withheld: screening "
        f"flagged them as adversarial"
    )
    if ids:
        message += f"; quarantine ids {ids}"
    raise Blocked(
        message,
        {
            "request_id": request.id,
            "withheld": decision.withheld,
            "reason": "adversarial",
            "quarantine_ids": ids,
        },
    )


def report_outputs(screened: Screened, outputs: list[OutputTensor], binary: bool) -> None:
    """For a client that asked: withheld rows become NaN; verdicts and scores are added."""
    withheld = screened.decision.withheld
    for out in outputs:
        if withheld and out.data.dtype.kind == "f":
            out.data = out.data.copy()
            out.data[withheld] = np.nan
        elif withheld:
            out.data = out.data.copy()
            out.data[withheld] = b""
    labels = []
    for i, action in enumerate(screened.decision.actions):
        label = f"{screened.decision.verdicts[i]}:{action}"
        if i in screened.quarantine_ids:
            label += f":{screened.quarantine_ids[i]}"
        labels.append(label.encode())
    outputs.append(OutputTensor(VERDICT_OUTPUT, "BYTES", np.array(labels, dtype=object), binary))
    outputs.append(OutputTensor(SCORES_OUTPUT, "FP32", screened.scores.astype(np.float32), binary))
