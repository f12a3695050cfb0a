"""Feature-squeezing transforms (Xu, Evans, Qi, "Feature Squeezing", NDSS 2018).

The pure-torch functions here are the reference semantics and the CPU path; ``squeeze`` hands
float32 CUDA inputs to the fused Triton kernel in ``kernels.squeeze_triton``. Semantics follow the
authors' code (mzweilin/EvadeML-Zoo): bit depth uses round-half-to-even, and the median matches
``scipy.ndimage.median_filter(size=(w, w), mode='reflect')`` per image and channel, i.e.
half-sample symmetric borders and the upper median for even windows.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 1, 8
MIN_WINDOW, MAX_WINDOW = 2, 5


@dataclass(frozen=True)
class SqueezeSpec:
    """Which squeezed copies to make; defaults are the paper's MNIST setting (1 bit, 2x2)."""

    bits: tuple[int, ...] = (1,)
    medians: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        if any(not MIN_BITS <= b <= MAX_BITS for b in self.bits):
            raise ValueError(f"bit depths must lie in {MIN_BITS}..{MAX_BITS}: {self.bits}")
        if any(not MIN_WINDOW <= w <= MAX_WINDOW for w in self.medians):
            raise ValueError(
                f"median windows must lie in {MIN_WINDOW}..{MAX_WINDOW}: {self.medians}"
            )

    @property
    def count(self) -> int:
        """Number of squeezed copies: bit depths first, then medians."""
        return len(self.bits) + len(self.medians)


def bit_depth(x: Tensor, bits: int) -> Tensor:
    """Reduces ``x`` in [0, 1] to ``bits`` bits; ``torch.round`` rounds half to even (= np.rint)."""
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def window_offsets(window: int) -> tuple[int, int]:
    """Cells before and after the centre; even windows lean back, as scipy's origin=0 does."""
    before = window // 2
    return before, window - 1 - before


def symmetric_index(length: int, before: int, after: int, device: torch.device) -> Tensor:
    """Source indices of a half-sample symmetric pad (``d c b a | a b c d | d c b a``).

    This is scipy's ``mode='reflect'`` (numpy's ``symmetric``); torch's ``reflect`` repeats no edge
    sample and ``replicate`` repeats only one, so neither matches. Period 2·length covers any pad.
    """
    idx = torch.arange(-before, length + after, device=device) % (2 * length)
    return torch.where(idx >= length, 2 * length - 1 - idx, idx)


def symmetric_pad(x: Tensor, before: int, after: int) -> Tensor:
    """Pads the last two dims of ``x`` symmetrically by index gathering (keeps autograd)."""
    rows = symmetric_index(x.shape[-2], before, after, x.device)
    cols = symmetric_index(x.shape[-1], before, after, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def median_smooth(x: Tensor, window: int) -> Tensor:
    """Median over ``window``x``window`` neighbourhoods of each (N, C) plane, as scipy computes it.

    Takes rank ⌊w²/2⌋ (0-based) of the sorted window: the upper median for even w. ``kthvalue``
    gathers an input element, so the gradient flows to the chosen pixel.
    """
    if not MIN_WINDOW <= window <= MAX_WINDOW:
        raise ValueError(f"median window must lie in {MIN_WINDOW}..{MAX_WINDOW}: {window}")
    padded = symmetric_pad(x, *window_offsets(window))
    patches = padded.unfold(-2, window, 1).unfold(-2, window, 1)
    flat = patches.reshape(*x.shape, window * window)
    return flat.kthvalue(window * window // 2 + 1, dim=-1).values


def squeeze_reference(x: Tensor, spec: SqueezeSpec) -> Tensor:
    """Every squeezed copy of ``x`` (N, C, H, W), stacked as (spec.count, N, C, H, W).

    Squeezers act on the original input in parallel, not chained (Xu et al. 2018, §4).
    """
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {tuple(x.shape)}")
    copies = [bit_depth(x, b) for b in spec.bits] + [median_smooth(x, w) for w in spec.medians]
    return torch.stack(copies)


def triton_available() -> bool:
    """Whether the Triton language package can be imported (it needs a GPU or TRITON_INTERPRET)."""
    return importlib.util.find_spec("triton") is not None


def squeeze(x: Tensor, spec: SqueezeSpec, use_triton: bool | None = None) -> Tensor:
    """All squeezed copies of ``x``, shape (spec.count, N, C, H, W).

    ``use_triton=None`` picks the fused kernel for float32 CUDA tensors when Triton is importable
    and no gradient is wanted (the kernel has no backward; adaptive attacks need the torch path),
    and the torch reference otherwise. ``True`` forces the kernel (on CPU it then needs
    ``TRITON_INTERPRET=1`` before triton is first imported); ``False`` forces torch.
    """
    if use_triton is None:
        wants_grad = x.requires_grad and torch.is_grad_enabled()
        use_triton = x.is_cuda and x.dtype == torch.float32 and not wants_grad
        use_triton = use_triton and triton_available()
    if not use_triton:
        return squeeze_reference(x, spec)
    from bastion.kernels.squeeze_triton import squeeze_triton

    return squeeze_triton(x, spec)
