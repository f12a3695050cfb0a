"""The stateful defence's part in one screened request: its evidence, the repeats its probes
get, the rung applied to its answer, and the record of what its queries were given."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bastion.gateway.backends import EMBEDDINGS
from bastion.gateway.defence.answers import put_back, served_answers
from bastion.gateway.defence.evidence import STRICT
from bastion.gateway.defence.observation import Embedded, Observation
from bastion.gateway.defence.service import DefenceService
from bastion.gateway.protocol.types import InferRequest
from bastion.gateway.screening.policy import ADVERSARIAL, SUSPICIOUS
from bastion.gateway.screening.service import REPORT_PARAMETER, Screened, tighten

if TYPE_CHECKING:
    from bastion.gateway.registry import LoadedModel


def defend(
    defence: DefenceService,
    model: LoadedModel,
    request: InferRequest,
    arrays: dict[str, np.ndarray],
    results: dict[str, np.ndarray],
    screened: Screened,
    prints: np.ndarray,
    charged: str | None,
    shared: bool,
) -> Observation:
    """The stateful defence's evidence, repeats and rung for this request (403 or 429
    raised here), and the record of what its queries were given; returns the observation
    (its ``repeats``: the images given a remembered answer)."""
    assert model.backend.screening is not None
    job = model.backend.screening
    rows = next(iter(arrays.values()))
    outputs = [spec.name for spec in model.config.outputs]
    answers, answer_key = served_answers(outputs, (model.config.name, model.version), results)
    targets = job.targets or {}
    embeddings = results.get(EMBEDDINGS)
    embedded = None
    if job.knn is not None and embeddings is not None:
        embedded = Embedded(f"{model.config.name}:{model.version}", job.knn, embeddings)
    observed = defence.observe(
        request.client_id,
        prints,
        screened.decision.verdicts,
        rows,
        answers,
        answer_key,
        targets.get(SUSPICIOUS),
        embedded,
        targets.get(ADVERSARIAL),
        request.id,
        f"{model.config.name}:{model.version}",
        pending=model.upstream is not None,  # a remote model's upstream answers later
    )
    put_back(outputs, results, observed.repeats)
    served = False
    try:
        # e.g. a new identity its probes just linked to a contained campaign: 403 or 429
        defence.enforce(request.client_id, observed, charged, shared)
        if (observed.rung == STRICT or observed.tightened) and not shared:  # suspicious too
            tighten(screened)
        served = not screened.decision.withheld or request.parameters.get(REPORT_PARAMETER) is True
    finally:  # a refused query's near-duplicates are refused in turn
        defence.settle(observed, served)
    return observed
