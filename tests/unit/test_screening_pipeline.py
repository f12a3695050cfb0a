"""The fused screening job: originals with autograd, squeezed copies in one batch without it,
one backward, and the same scores as each detector computed on its own."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bastion.gateway.screening import mahalanobis
from bastion.gateway.screening.calibrate import layer_features
from bastion.gateway.screening.calibration import fit, threshold
from bastion.gateway.screening.pipeline import ScreenedClassifier
from bastion.kernels.squeeze import SqueezeSpec, squeeze_reference
from bastion.models.data import load_split, to_float
from bastion.models.weights import load_digits
from bastion.models.zoo import ServedClassifier

NAMES = ("feature_squeezing", "confidence_margin", "gradient_norm")
SPEC = SqueezeSpec(bits=(1,), medians=(2, 3))


def digits(n: int = 12) -> torch.Tensor:
    return torch.from_numpy(to_float(load_split("test")[0][:n]))


def separate_scores(module: ServedClassifier, x: torch.Tensor) -> np.ndarray:
    """Each detector computed on its own, with its own passes: the reference."""
    with torch.no_grad():
        _, probs = module(x)
        copies = squeeze_reference(x, SPEC)
        squeezed = torch.stack([module(copy)[1] for copy in copies])
    fs = (squeezed - probs).abs().sum(-1).amax(0)
    top = probs.topk(2, dim=1).values
    margin = 1 - (top[:, 0] - top[:, 1])
    x_grad = x.clone().requires_grad_(True)
    logits, _ = module(x_grad)
    loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
    (gradient,) = torch.autograd.grad(loss, x_grad)
    return torch.stack([fs, margin, gradient.flatten(1).norm(dim=1)], 1).detach().numpy()


def test_fused_batch_gives_the_scores_of_each_detector_run_alone() -> None:
    module = ServedClassifier(load_digits()).eval()
    x = digits()
    expected = separate_scores(module, x)
    job = ScreenedClassifier(module, NAMES, SPEC, None, torch.device("cpu"))
    result = job(x)
    np.testing.assert_allclose(result.scores.numpy(), expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        _, probs = module(x)
    np.testing.assert_allclose(result.probs.numpy(), probs.numpy(), atol=1e-6)
    assert (result.combined == -1).all()  # uncalibrated


def test_squeezed_copies_run_as_one_batch_beside_the_originals_that_need_a_gradient() -> None:
    module = ServedClassifier(load_digits()).eval()
    calls: list[tuple[int, bool]] = []
    module.register_forward_hook(
        lambda _m, args, _out: calls.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    ScreenedClassifier(module, NAMES, SPEC, None, torch.device("cpu"))(digits(5))
    assert calls == [(5, True), (5 * SPEC.count, False)]  # autograd for the originals only
    calls.clear()
    no_gradient = ("feature_squeezing", "confidence_margin")
    ScreenedClassifier(module, no_gradient, SPEC, None, torch.device("cpu"))(digits(5))
    assert calls == [(5 * (1 + SPEC.count), False)]  # one fused batch


def test_scores_of_an_image_do_not_depend_on_its_batch() -> None:
    module = ServedClassifier(load_digits(), channels_last=True).eval()
    job = ScreenedClassifier(module, NAMES, SPEC, None, torch.device("cpu"))
    x = digits(8)
    together = job(x).scores.numpy()
    alone = np.concatenate([job(x[i : i + 1]).scores.numpy() for i in range(8)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_combined_score_is_the_calibrated_clean_surprise() -> None:
    module = ServedClassifier(load_digits()).eval()
    images = torch.from_numpy(to_float(load_split("calibration")[0][:600]))
    clean = ScreenedClassifier(module, NAMES, SPEC, None, torch.device("cpu"))(images)
    calibration = fit(clean.scores.numpy(), NAMES, SPEC.bits, SPEC.medians, (0.05,))
    job = ScreenedClassifier(module, NAMES, SPEC, calibration, torch.device("cpu"))
    result = job(digits(200))
    assert (result.combined >= 0).all()
    flagged = (result.combined > threshold(0.05)).float().mean().item()
    assert flagged <= 0.12  # 200 unseen digits at a 5 % target
    broken = job(torch.full((2, 1, 28, 28), float("nan")))  # unscorable: most suspicious
    assert (broken.combined > threshold(0.001)).all()


def test_mahalanobis_reads_the_named_layer_in_the_same_pass() -> None:
    """The tapped layer's features are caught during the job's own forward (no second pass)
    and score the same as features computed separately."""
    module = ServedClassifier(load_digits()).eval()
    train, labels = load_split("train")
    layer = "net.features.2"
    features = layer_features(module, to_float(train[::5]), layer, torch.device("cpu"))
    gaussian = mahalanobis.fit(features, torch.from_numpy(labels[::5]), 10, layer)
    calls: list[int] = []
    module.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    names = ("confidence_margin", "mahalanobis")
    job = ScreenedClassifier(module, names, SPEC, None, torch.device("cpu"), gaussian)
    x = digits(9)
    scores = job(x).scores[:, 1]
    assert calls == [9]
    alone = layer_features(module, x.numpy(), layer, torch.device("cpu"))
    torch.testing.assert_close(scores, mahalanobis.score(alone, gaussian), rtol=1e-4, atol=1e-3)


def test_the_gradient_over_the_originals_alone_equals_the_one_through_the_fused_batch() -> None:
    """The job differentiates only the original rows; the former job built its graph through
    the whole fused batch (originals and squeezed copies) and sliced: same gradient, cheaper."""
    module = ServedClassifier(load_digits())
    x = digits(16)
    job = ScreenedClassifier(module, ("gradient_norm",), SPEC, None, torch.device("cpu"))
    ours = job(x).scores[:, 0]
    original = x.clone().requires_grad_(True)
    copies = squeeze_reference(x, SPEC).flatten(0, 1)
    logits = module(torch.cat([original, copies]))[0][: len(x)]
    loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
    (fused,) = torch.autograd.grad(loss, original)
    torch.testing.assert_close(ours, fused.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)
