"""Applies a model's screening policy to one request's rows, after the fused batch ran.

Records verdict and score metrics, stores quarantined inputs durably (the response that names a
quarantine id is built only after its record is committed; an image whose record a store quota
drops is withheld all the same, and counted), hands review copies of suspicious images to the
background writer (``review.py``; the response never waits for them), and shapes what the
client sees:
by default a request with any withheld image is refused whole with 403; a client that sets the
request parameter ``screening_report`` gets per-image verdicts and scores as extra outputs, with
NaN in place of every withheld image's prediction.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass

import numpy as np

from bastion.gateway.backends import COMBINED, SCORES
from bastion.gateway.errors import Blocked, Unavailable
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.protocol.types import InferRequest, OutputTensor
from bastion.gateway.quarantine.retention import UsageMetrics
from bastion.gateway.quarantine.store import QUARANTINED, REVIEW, NewItem, QuarantineStore, Usage
from bastion.gateway.screening.pipeline import ScreenedClassifier
from bastion.gateway.screening.policy import CLEAN, SUSPICIOUS, Decision, decide
from bastion.gateway.screening.review import ReviewWriter

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
    def __init__(
        self, store: QuarantineStore, metrics: Metrics, review_backlog: int = 1024
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.publish_usage = UsageMetrics(metrics)
        self.reviews = ReviewWriter(store, metrics, review_backlog, on_usage=self.publish_usage)

    def close(self) -> None:
        """Writes the queued review copies, then stops the writer (before the store closes)."""
        self.reviews.close()

    def publish_calibration(self, model: str, version: str, job: ScreenedClassifier) -> None:
        """Publishes each tier's clean flag rate (the alert baseline), never a threshold:
        thresholds are admin-only, since knowing them is a head start for an adaptive attacker.
        (A tier's rate is public anyway: it is what clean traffic sees.)"""
        if job.targets is None:
            return
        for tier, fpr in job.targets.items():
            self.metrics.screening_target_fpr.labels(model, version, tier).set(fpr)

    async def apply(
        self,
        job: ScreenedClassifier,
        action: str,
        model: str,
        version: str,
        request: InferRequest,
        inputs: dict[str, np.ndarray],
        results: dict[str, np.ndarray],
        review_action: str = "review",
    ) -> Screened:
        scores, combined = results[SCORES], results[COMBINED]
        decision = decide(combined, job.thresholds, action, review_action)
        columns = (*(d.name for d in job.detectors), "combined")
        self._observe(model, version, columns, scores, decision)
        evidence = Evidence(model, version, request, inputs, columns, scores, combined, job)
        if decision.reviewed:
            self.reviews.submit([evidence.item(i, decision, REVIEW) for i in decision.reviewed])
        ids: dict[int, str] = {}
        dropped = 0
        if decision.quarantined:
            items = [evidence.item(i, decision, QUARANTINED) for i in decision.quarantined]
            try:
                stored, usage = await asyncio.to_thread(self._store, items)
            except (OSError, sqlite3.Error) as exc:  # not committed: no id to name; withheld
                raise Unavailable(
                    f"request {request.id or '(no id)'}: the quarantine store is unavailable; "
                    "retry later"
                ) from exc
            pairs = zip(decision.quarantined, stored, strict=True)
            ids = {i: id_ for i, id_ in pairs if id_ is not None}
            dropped = len(stored) - len(ids)
            if usage is not None:
                self.publish_usage(usage)
        return Screened(decision, ids, np.column_stack([scores, combined]), columns, dropped)

    def _store(self, items: list[NewItem]) -> tuple[list[str | None], Usage | None]:
        """Off the event loop: the write (raises when it could not commit: the caller must not
        acknowledge a record it does not have), then the usage the metrics mirror."""
        ids = self.store.add_many(items)
        try:
            usage = self.store.usage()
        except (OSError, sqlite3.Error):
            usage = None  # the ids are committed: acknowledge them; the gauges wait
        return ids, usage

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
            self.metrics.screening_tiers.labels(model, version, verdict, action).inc()
            if verdict == SUSPICIOUS:  # served: publicly indistinguishable from clean
                verdict, action = CLEAN, "allow"
            self.metrics.screening_verdicts.labels(model, version, verdict, action).inc()


@dataclass(frozen=True)
class Evidence:
    """One request's screening results, from which stored records are cut per image."""

    model: str
    version: str
    request: InferRequest
    inputs: dict[str, np.ndarray]
    columns: tuple[str, ...]
    scores: np.ndarray
    combined: np.ndarray
    job: ScreenedClassifier

    def item(self, index: int, decision: Decision, status: str) -> NewItem:
        values = [*self.scores[index].tolist(), float(self.combined[index])]
        name = next(iter(self.inputs))
        return NewItem(
            model=self.model,
            version=self.version,
            client_id=self.request.client_id,
            request_id=self.request.id,
            image_index=index,
            input=self.inputs[name][index].copy(),
            scores=dict(zip(self.columns, values, strict=True)),
            thresholds=dict(self.job.thresholds or {}),
            verdict=decision.verdicts[index],
            status=status,
        )


def tighten(screened: Screened) -> None:
    """The ``strict`` rung: a contained client's suspicious images are withheld as well."""
    decision = screened.decision
    for i in decision.reviewed:
        decision.actions[i] = "block"
    decision.withheld = sorted({*decision.withheld, *decision.reviewed})


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
