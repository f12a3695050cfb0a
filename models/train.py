"""Trains DigitsNet on the train split and writes the bundled model repository.

Usage: ``python -m bastion.models.train [--epochs N] [--seed S] [--out models/repository]``

Everything random (initialisation, batch order, augmentation) is drawn from generators seeded by
``--seed`` on the CPU, so a run is reproducible and does not depend on the device it trains on.
Only the train split is used for fitting; the test split is evaluated once at the end and the
calibration split is left untouched for later screening calibration.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from bastion.gateway.progress import Progress
from bastion.models.data import SplitName, load_split, to_float
from bastion.models.digits import DigitsNet
from bastion.models.weights import DEFAULT_REPOSITORY, digits_weights_path
from bastion.models.zoo import ServedClassifier

ONNX_MODEL = "digits_onnx"
ONNX_OPSET = 17
ONNX_ATOL = 1e-4
MAX_ROTATION_DEG = 12.0
MAX_SHIFT_PX = 2.5
SCALE_RANGE = (0.9, 1.1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bastion.models.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args(argv)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_tensors(split: SplitName, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split(split)
    return torch.from_numpy(to_float(images)).to(device), torch.from_numpy(labels).to(device)


def random_affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random rotations, scalings and shifts: the variation real handwriting has."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEG)
    low, high = SCALE_RANGE
    scale = low + torch.rand(n, generator=generator) * (high - low)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * MAX_SHIFT_PX / images.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    ).to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def train_epoch(
    net: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> float:
    """One pass over the train split in a seeded order; returns the mean loss. ``progress``
    advances by one per batch."""
    images, labels = data
    net.train()
    order = torch.randperm(images.shape[0], generator=generator).to(images.device)
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        batch = order[start : start + batch_size]
        loss = F.cross_entropy(net(random_affine(images[batch], generator)), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * batch.numel()
        if progress is not None:
            progress.advance()
    return total / images.shape[0]


@torch.no_grad()
def accuracy(
    net: nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 500
) -> float:
    images, labels = data
    net.eval()
    correct = sum(
        int((net(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, images.shape[0], batch_size)
    )
    return correct / images.shape[0]


def save_weights(net: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in net.state_dict().items()}
    save_file(state, str(path))
    path.chmod(0o644)


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Exports ServedClassifier(net); returns which exporter produced the file.

    The legacy TorchScript exporter gives a plain, small graph with a symbolic batch axis; the
    torch.export-based one is the fallback should the legacy path ever be removed. The legacy
    exporter's deprecation notices are expected and silenced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    served = ServedClassifier(net).eval()
    names = {"input_names": ["images"], "output_names": ["logits", "probabilities"]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                served,
                (example,),
                str(path),
                dynamo=False,
                opset_version=ONNX_OPSET,
                dynamic_axes={name: {0: "batch"} for name in ["images", "logits", "probabilities"]},
                **names,
            )
        return f"torchscript (legacy), opset {ONNX_OPSET}"
    except Exception as error:
        print(f"legacy ONNX export failed ({error}); using torch.export", file=sys.stderr)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        served, (example,), dynamo=True, dynamic_shapes=({0: batch},), external_data=False, **names
    )
    program.save(str(path))
    return "torch.export (dynamo)"


def verify_onnx(net: nn.Module, images: torch.Tensor, path: Path) -> float:
    """Max |onnxruntime - torch| over both outputs, checked at several batch sizes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = ServedClassifier(net).eval()
    worst = 0.0
    for size in (1, 7, images.shape[0]):
        batch = images[:size]
        with torch.no_grad():
            expected = [t.numpy() for t in served(batch)]
        got = session.run(["logits", "probabilities"], {"images": batch.numpy()})
        worst = max(
            worst, *(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
        )
    if worst > ONNX_ATOL:
        raise RuntimeError(f"onnxruntime differs from torch by {worst:.2e} > {ONNX_ATOL}")
    return worst


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.command = shlex.join(["python", "-m", "bastion.models.train", *argv])
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    device = pick_device()
    train, test = as_tensors("train", device), as_tensors("test", device)

    net = DigitsNet().to(device)
    steps = args.epochs * math.ceil(train[0].shape[0] / args.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    started = time.perf_counter()
    with Progress("train digits", steps, "batches") as progress:
        for epoch in range(1, args.epochs + 1):
            loss = train_epoch(
                net, train, optimizer, scheduler, args.batch_size, generator, progress
            )
            print(f"epoch {epoch:3d}/{args.epochs}  loss {loss:.4f}", flush=True)
    train_seconds = time.perf_counter() - started

    net = net.cpu().eval()
    train, test = (train[0].cpu(), train[1].cpu()), (test[0].cpu(), test[1].cpu())
    metrics = record(args, net, train, test, device, train_seconds)
    print(json.dumps(metrics, indent=2))
    return metrics


def record(
    args: argparse.Namespace,
    net: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    train_seconds: float,
) -> dict[str, object]:
    """Writes weights, the ONNX export and metrics.json; returns the metrics."""
    weights = digits_weights_path(args.out)
    save_weights(net, weights)
    onnx_path = Path(args.out) / ONNX_MODEL / "1" / "model.onnx"
    exporter = export_onnx(net, test[0][:2], onnx_path)
    onnx_max_abs_diff = verify_onnx(net, test[0], onnx_path)
    metrics: dict[str, object] = {
        "train_accuracy": accuracy(net, train),
        "test_accuracy": accuracy(net, test),
        "train_size": int(train[0].shape[0]),
        "test_size": int(test[0].shape[0]),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_lr": args.lr,
        "device": str(device),
        "train_seconds": round(train_seconds, 1),
        "torch_version": torch.__version__,
        "onnx_exporter": exporter,
        "onnx_max_abs_diff": onnx_max_abs_diff,
        "command": args.command,
    }
    (weights.parent / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
