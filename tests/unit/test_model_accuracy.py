"""The committed digits weights and their ONNX export: accuracy and torch/onnxruntime agreement."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bastion.models.data import load_split, to_float
from bastion.models.weights import DEFAULT_REPOSITORY, load_digits
from bastion.models.zoo import ServedClassifier

ONNX_PATH = DEFAULT_REPOSITORY / "digits_onnx" / "1" / "model.onnx"
MIN_TEST_ACCURACY = 0.975


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return load_digits()


@pytest.fixture(scope="module")
def test_pixels() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_split("test")
    return to_float(images), labels


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])


def test_committed_weights_reach_required_test_accuracy(
    net: nn.Module, test_pixels: tuple[np.ndarray, np.ndarray]
) -> None:
    pixels, labels = test_pixels
    with torch.no_grad():
        predictions = net(torch.from_numpy(pixels)).argmax(1).numpy()
    assert (predictions == labels).mean() >= MIN_TEST_ACCURACY


def test_loaded_model_is_in_eval_mode_and_deterministic(
    net: nn.Module, test_pixels: tuple[np.ndarray, np.ndarray]
) -> None:
    batch = torch.from_numpy(test_pixels[0][:16])
    assert not net.training
    with torch.no_grad():
        torch.testing.assert_close(net(batch), net(batch), rtol=0, atol=0)
        torch.testing.assert_close(net(batch[:1]), net(batch)[:1], rtol=0, atol=1e-5)


def test_onnx_export_matches_torch_on_64_test_images(
    net: nn.Module, session: ort.InferenceSession, test_pixels: tuple[np.ndarray, np.ndarray]
) -> None:
    pixels = test_pixels[0][::16][:64]
    with torch.no_grad():
        expected = [t.numpy() for t in ServedClassifier(net)(torch.from_numpy(pixels))]
    logits, probabilities = session.run(["logits", "probabilities"], {"images": pixels})
    np.testing.assert_allclose(logits, expected[0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(probabilities, expected[1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_onnx_export_has_dynamic_batch_axis(
    session: ort.InferenceSession, test_pixels: tuple[np.ndarray, np.ndarray], batch: int
) -> None:
    logits, probabilities = session.run(None, {"images": test_pixels[0][:batch]})
    assert logits.shape == probabilities.shape == (batch, 10)
    assert [i.name for i in session.get_inputs()] == ["images"]
