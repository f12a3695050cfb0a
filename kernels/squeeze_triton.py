"""One fused Triton kernel that writes every feature-squeezed copy in a single pass.

Feature squeezing (Xu, Evans, Qi, NDSS 2018) compares a model's output on the input with its
outputs on several squeezed copies; making all copies in one launch reads the input from global
memory once instead of once per squeezer. Semantics match ``kernels.squeeze.squeeze_reference``
bit for bit.

Layout: the input is viewed as ``N·C`` contiguous planes of ``H·W`` float32 pixels. Program
``(p, t)`` owns pixels ``t·BLOCK … t·BLOCK+BLOCK-1`` of plane ``p``, loads them once, and stores
copy ``s`` of them at ``out[s, p, pixel]`` of the ``(count, N·C, H·W)`` output: bit depths first,
then medians, each in ``SqueezeSpec`` order. A median's neighbours are reloaded from the same
plane, so they come from cache rather than from a second pass over memory.

Borders follow scipy's ``mode='reflect'``: half-sample symmetric (``d c b a | a b c d | d c b a``).

The kernel is specialised per spec (bit depths and windows are ``tl.constexpr`` tuples). Triton
chooses compiled or interpreted mode when ``@triton.jit`` runs, so to run on CPU tensors set
``TRITON_INTERPRET=1`` before the process first imports triton (``tl.sum`` is itself a jit
function decorated then) and before it imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bastion.kernels.squeeze import SqueezeSpec, window_offsets

MAX_BLOCK = 256
# Elements of the (BLOCK, TAPS) neighbourhood tile. Offline sm_90 builds (ptxas resource usage):
# 256x32 for a 5x5 window takes 254 registers per thread, 64x32 about 128 with no spills.
TILE_BUDGET = 2048


@triton.jit
def _reflect(i, n):
    """Index ``i`` in [-2n, 2n) mapped into [0, n) half-sample symmetrically (period 2n).

    ``%`` truncates towards zero in Triton (C semantics), so ``i`` is shifted to be non-negative.
    """
    m = (i + 2 * n) % (2 * n)
    return tl.where(m >= n, 2 * n - 1 - m, m)


@triton.jit
def _round_half_even(y):
    """``torch.round`` without libdevice: exact in float32 for |y| < 2**23."""
    f = tl.floor(y)
    frac = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _bit_depth(v, LEVELS: tl.constexpr):
    """``round(v·L) / L`` with IEEE division (Triton's ``/`` is approximate on NVIDIA GPUs)."""
    return tl.div_rn(_round_half_even(v * LEVELS), LEVELS)


@triton.jit
def _neighbour(row, col, H, W, DY, DX):
    """Offsets into ``plane`` of the pixel at (row + DY, col + DX) after symmetric reflection."""
    return _reflect(row + DY, H) * W + _reflect(col + DX, W)


@triton.jit
def _median(
    plane,
    row,
    col,
    inside,
    centre,
    H,
    W,
    WINDOW: tl.constexpr,
    BEFORE: tl.constexpr,
    TAPS: tl.constexpr,
):
    """Element of rank ⌊w²/2⌋ of each pixel's window (scipy's choice: upper median if w even).

    Selection by counting, as Triton has no per-row sort: the window sits in a (BLOCK, TAPS)
    tile and tap ``t`` is the answer when #(window < t) <= RANK < #(window <= t). Under ties
    several taps qualify, all with the same value. O(w^4) compares, unrolled at compile time.
    """
    RANK: tl.constexpr = WINDOW * WINDOW // 2
    tap = tl.arange(0, TAPS)
    used = (tap < WINDOW * WINDOW)[None, :]
    offs = _neighbour(
        row[:, None],
        col[:, None],
        H,
        W,
        (tap // WINDOW - BEFORE)[None, :],
        (tap % WINDOW - BEFORE)[None, :],
    )
    hood = tl.load(plane + offs, mask=inside[:, None] & used, other=0.0)
    result = centre
    for t in tl.static_range(WINDOW * WINDOW):
        cand_offs = _neighbour(row, col, H, W, t // WINDOW - BEFORE, t % WINDOW - BEFORE)
        cand = tl.load(plane + cand_offs, mask=inside, other=0.0)
        below = tl.sum((used & (hood < cand[:, None])).to(tl.int32), axis=1)
        upto = tl.sum((used & (hood <= cand[:, None])).to(tl.int32), axis=1)
        result = tl.where((below <= RANK) & (upto > RANK), cand, result)
    return result


@triton.jit
def _squeeze_kernel(
    x_ptr,
    out_ptr,
    H,
    W,
    LEVELS: tl.constexpr,
    WINDOWS: tl.constexpr,
    BEFORES: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (plane, tile): one load of the tile, one store per squeezed copy."""
    hw = H * W
    plane_start = tl.program_id(0).to(tl.int64) * hw
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < hw
    row = offs // W
    col = offs % W
    plane = x_ptr + plane_start
    dest = out_ptr + plane_start + offs
    stride = tl.num_programs(0).to(tl.int64) * hw  # one copy = all N·C planes
    centre = tl.load(plane + offs, mask=inside, other=0.0)
    for i in tl.static_range(len(LEVELS)):
        tl.store(dest + i * stride, _bit_depth(centre, LEVELS[i]), mask=inside)
    for j in tl.static_range(len(WINDOWS)):
        med = _median(plane, row, col, inside, centre, H, W, WINDOWS[j], BEFORES[j], TAPS[j])
        tl.store(dest + (len(LEVELS) + j) * stride, med, mask=inside)


def _interpreted(fn: object) -> bool:
    return not isinstance(fn, triton.runtime.JITFunction)


# triton.jit reads TRITON_INTERPRET when it decorates: for this module's kernel that is at import,
# for triton.language's own jit helpers (tl.sum) when triton is first imported. Both must agree.
INTERPRETED: bool = _interpreted(_squeeze_kernel) and _interpreted(tl.sum)


def _check_input(x: Tensor) -> None:
    """Rejects what the kernel cannot take rather than computing something else."""
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise TypeError(f"the fused kernel takes float32, got {x.dtype}")
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton and "
            "kernels.squeeze_triton are first imported"
        )


def block_size(pixels: int, spec: SqueezeSpec) -> int:
    """Pixels per program: up to MAX_BLOCK, fewer for wide windows to bound register use."""
    taps = max((triton.next_power_of_2(k * k) for k in spec.medians), default=1)
    return min(MAX_BLOCK, TILE_BUDGET // taps, triton.next_power_of_2(pixels))


def squeeze_triton(x: Tensor, spec: SqueezeSpec) -> Tensor:
    """All squeezed copies of float32 ``x`` (N, C, H, W) as (spec.count, N, C, H, W), one launch."""
    _check_input(x)
    x = x.contiguous()
    out = torch.empty((spec.count, *x.shape), dtype=x.dtype, device=x.device)
    n, c, h, w = x.shape
    if x.numel() == 0 or spec.count == 0:
        return out
    block = block_size(h * w, spec)
    grid = (n * c, triton.cdiv(h * w, block))
    with torch.cuda.device_of(x):
        _launch(x, out, spec, block, grid)
    return out


def _launch(x: Tensor, out: Tensor, spec: SqueezeSpec, block: int, grid: tuple[int, int]) -> None:
    """Specialises the kernel on the spec: one compiled variant per (bits, windows, block)."""
    _squeeze_kernel[grid](
        x,
        out,
        x.shape[2],
        x.shape[3],
        LEVELS=tuple(2**b - 1 for b in spec.bits),
        WINDOWS=spec.medians,
        BEFORES=tuple(window_offsets(k)[0] for k in spec.medians),
        TAPS=tuple(triton.next_power_of_2(k * k) for k in spec.medians),
        BLOCK=block,
    )
