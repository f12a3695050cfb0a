"""Feature-squeezing transforms (Xu, Evans, Qi, NDSS 2018): torch reference and fused Triton kernel.

The kernel runs under Triton's interpreter on CPU. ``triton.jit`` picks interpreted or compiled
mode when it decorates a function, and triton.language decorates its own helpers (``tl.sum``) on
the first ``import triton``: the variable is set here, before anything below imports triton. If
another module imported triton earlier in the same process, the kernel tests skip with a reason.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib

import numpy as np
import pytest
import torch
from scipy import ndimage

from bastion.kernels.squeeze import (
    SqueezeSpec,
    bit_depth,
    median_smooth,
    squeeze,
    squeeze_reference,
    triton_available,
)

kst = importlib.import_module("bastion.kernels.squeeze_triton") if triton_available() else None
needs_interpreter = pytest.mark.skipif(
    kst is None or not kst.INTERPRETED,
    reason="no triton, or triton was imported before TRITON_INTERPRET=1 (set it in the env)",
)

ALL_SQUEEZERS = SqueezeSpec(bits=(1, 5, 8), medians=(2, 3, 4, 5))
GRID = np.arange(1, 10, dtype=np.float32).reshape(3, 3)


def images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def scipy_median(x: torch.Tensor, window: int) -> np.ndarray:
    """scipy.ndimage.median_filter per image and channel, as the authors' code applies it."""
    planes = x.numpy().reshape(-1, *x.shape[-2:])
    out = [ndimage.median_filter(p, size=(window, window), mode="reflect") for p in planes]
    return np.stack(out).reshape(x.shape)


def test_spec_counts_bit_depths_and_medians() -> None:
    assert SqueezeSpec().count == 2
    assert ALL_SQUEEZERS.count == 7


@pytest.mark.parametrize(
    "fields", [{"bits": (0,)}, {"bits": (9,)}, {"medians": (1,)}, {"medians": (6,)}]
)
def test_spec_rejects_out_of_range_squeezers(fields: dict[str, tuple[int, ...]]) -> None:
    with pytest.raises(ValueError):
        SqueezeSpec(**fields)


@pytest.mark.parametrize(
    ("bits", "x", "expected"), [(1, 0.5, 0.0), (2, 0.5, 2 / 3), (3, 0.5, 4 / 7)]
)
def test_bit_depth_rounds_half_to_even(bits: int, x: float, expected: float) -> None:
    out = bit_depth(torch.tensor([x]), bits)
    assert out.item() == torch.tensor(expected).item()


def test_bit_depth_keeps_representable_levels() -> None:
    levels = torch.arange(32) / 31
    assert torch.equal(bit_depth(levels, 5), levels)


@pytest.mark.parametrize(
    ("window", "expected"),
    [(2, [[1, 2, 3], [4, 4, 5], [7, 7, 8]]), (3, [[2, 3, 3], [4, 5, 6], [7, 7, 8]])],
)
def test_median_takes_upper_median_with_symmetric_border(window: int, expected: list) -> None:
    x = torch.from_numpy(GRID)[None, None]
    assert median_smooth(x, window)[0, 0].tolist() == expected


def test_median_border_is_not_torch_mirror_padding() -> None:
    x = torch.from_numpy(GRID)[None, None]
    mirrored = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[0, 0, :3, :3]
    assert mirrored.median().item() == 4.0
    assert median_smooth(x, 3)[0, 0, 0, 0].item() == 2.0


@pytest.mark.parametrize("window", [2, 3, 4, 5])
@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 5), (5, 7), (7, 1), (28, 28)])
def test_median_matches_scipy_reflect(window: int, size: tuple[int, int]) -> None:
    x = images((2, 3, *size), seed=window * 100 + size[0] * 10 + size[1])
    assert np.array_equal(median_smooth(x, window).numpy(), scipy_median(x, window))


def test_median_matches_scipy_under_ties() -> None:
    x = torch.randint(0, 3, (2, 1, 9, 8), generator=torch.Generator().manual_seed(0)) / 2
    for window in (2, 3, 4, 5):
        assert np.array_equal(median_smooth(x, window).numpy(), scipy_median(x, window))


def test_median_gradient_flows_to_chosen_pixels() -> None:
    x = images((1, 1, 6, 6), seed=1).requires_grad_()
    median_smooth(x, 3).sum().backward()
    assert x.grad is not None
    assert x.grad.sum().item() == 36
    assert set(x.grad.unique().tolist()) <= set(range(10))


def test_reference_stacks_bit_depths_then_medians_in_spec_order() -> None:
    x = images((2, 3, 5, 4), seed=2)
    spec = SqueezeSpec(bits=(5, 1), medians=(3, 2))
    out = squeeze_reference(x, spec)
    expected = [bit_depth(x, 5), bit_depth(x, 1), median_smooth(x, 3), median_smooth(x, 2)]
    assert out.shape == (4, 2, 3, 5, 4)
    assert all(torch.equal(o, e) for o, e in zip(out, expected, strict=True))


@needs_interpreter
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1), (2, 3, 5, 7), (3, 1, 7, 5), (4, 3, 2, 3), (5, 1, 9, 9), (5, 3, 3, 1)],
)
def test_fused_kernel_equals_reference_for_every_squeezer(shape: tuple[int, ...]) -> None:
    x = images(shape, seed=sum(shape))
    assert torch.equal(kst.squeeze_triton(x, ALL_SQUEEZERS), squeeze_reference(x, ALL_SQUEEZERS))


@needs_interpreter
@pytest.mark.parametrize(
    ("spec", "shape"),
    [(SqueezeSpec(), (2, 1, 28, 28)), (SqueezeSpec(bits=(5,), medians=(2,)), (1, 3, 32, 32))],
)
def test_fused_kernel_equals_reference_for_paper_settings(
    spec: SqueezeSpec, shape: tuple[int, ...]
) -> None:
    x = images(shape, seed=3)
    assert torch.equal(kst.squeeze_triton(x, spec), squeeze_reference(x, spec))


@needs_interpreter
def test_fused_kernel_rounds_halves_to_even_at_every_bit_depth() -> None:
    half = torch.tensor(0.5)
    edges = [
        0.0,
        1.0,
        0.5,
        half.nextafter(torch.tensor(0.0)).item(),
        half.nextafter(half + 1).item(),
    ]
    x = torch.tensor(edges + [k / 255 for k in range(251)]).reshape(2, 2, 8, 8)
    spec = SqueezeSpec(bits=tuple(range(1, 9)), medians=())
    out = kst.squeeze_triton(x, spec)
    assert torch.equal(out, squeeze_reference(x, spec))
    even = torch.tensor([round(0.5 * (2**b - 1)) / (2**b - 1) for b in spec.bits])
    assert torch.equal(out[:, 0, 0, 0, 2], even)


@needs_interpreter
def test_fused_kernel_picks_the_same_median_under_ties() -> None:
    x = torch.randint(0, 3, (3, 3, 6, 5), generator=torch.Generator().manual_seed(4)) / 2
    spec = SqueezeSpec(bits=(), medians=(2, 3, 4, 5))
    assert torch.equal(kst.squeeze_triton(x, spec), squeeze_reference(x, spec))


@needs_interpreter
def test_fused_kernel_accepts_non_contiguous_input() -> None:
    x = images((3, 4, 5, 2), seed=5).permute(0, 3, 1, 2)
    spec = SqueezeSpec(bits=(3,), medians=(3,))
    assert torch.equal(kst.squeeze_triton(x, spec), squeeze_reference(x, spec))


@needs_interpreter
def test_fused_kernel_rejects_other_dtypes() -> None:
    with pytest.raises(TypeError):
        kst.squeeze_triton(torch.rand(1, 1, 3, 3, dtype=torch.float64), SqueezeSpec())


def test_squeeze_uses_reference_on_cpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> torch.Tensor:
        raise AssertionError("the Triton kernel must not run for CPU tensors by default")

    monkeypatch.setattr(kst, "squeeze_triton", refuse)
    x = images((2, 1, 4, 4), seed=6)
    assert torch.equal(squeeze(x, SqueezeSpec()), squeeze_reference(x, SqueezeSpec()))


@needs_interpreter
def test_squeeze_runs_kernel_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[SqueezeSpec] = []
    kernel = kst.squeeze_triton

    def spy(x: torch.Tensor, spec: SqueezeSpec) -> torch.Tensor:
        calls.append(spec)
        return kernel(x, spec)

    monkeypatch.setattr(kst, "squeeze_triton", spy)
    x = images((1, 1, 4, 4), seed=7)
    assert torch.equal(
        squeeze(x, SqueezeSpec(), use_triton=True), squeeze_reference(x, SqueezeSpec())
    )
    assert calls == [SqueezeSpec()]
    assert triton_available()
