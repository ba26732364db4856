"""The integer grid: the one place that rounds, clamps, or computes a scale or zero point.

Everything that rounds, clamps, or computes a scale or zero point lives here;
modules and algorithms compose these functions and never re-derive the grid.

Granularity is a group size along the last dimension of the tensor:
`group_size=-1` is one group per row (per output channel for a weight
[out, in], per token for an activation [..., hidden]), `group_size=0` is one
group for the whole tensor (per tensor), any other value splits the last
dimension into groups of that many elements. Scales and zero points have shape
`x.shape[:-1] + (n_groups,)`.

Conventions (see `IntFormat`): asymmetric = unsigned grid [0, 2^b-1] with an
integer zero point in that range; symmetric = signed grid [-2^(b-1), 2^(b-1)-1]
with no zero point (`zero_point is None`). Dequantization is
`(q - zero_point) * scale`. The zero point is kept as a float tensor holding
integer values so it can be a learnable parameter (rounded with a
straight-through estimator in the forward pass). Every function that uses a
zero point uses it as `integer_zero_point` makes it (rounded, clamped into the
grid), so quantize, dequantize and fake_quantize agree for fractional zero
points too.

Step sizes are kept in [SCALE_MIN, SCALE_MAX] by `positive_scale` (a clamp
with a straight-through gradient, as EfficientQAT clamps its learned scales to
[1e-4, 1e4]): a learned step size that trains to zero or below would divide by
zero or flip the grid. The floor here is 1e-6, not EfficientQAT's 1e-4, since
1e-4 would coarsen honest 8-bit grids of small weight groups (a 0.02-wide group
at 8 bits has a step of 7.8e-5); 1e-6 is still representable in fp16.

Min-max ranges always contain 0 (as torch's observers and the reference
quantizers do): an all-positive or all-negative group otherwise gets a zero
point outside the grid, which is clamped, and its values are clipped.
"""

from __future__ import annotations

import torch

from quant.numerics.formats import IntFormat
from quant.numerics.ste import clamp_ste, round_ste

PER_TENSOR = 0
PER_ROW = -1
SCALE_MIN = 1e-6
SCALE_MAX = 1e4


# ---------------------------------------------------------------------------
# Group reshaping


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., K] -> [..., n_groups, g] (a view where possible)."""
    if group_size == PER_TENSOR:
        return x.reshape(1, -1)
    k = x.shape[-1]
    g = k if group_size == PER_ROW else group_size
    if g <= 0 or k % g:
        raise ValueError(f"group_size={group_size} does not divide the last dimension {k}")
    return x.reshape(*x.shape[:-1], k // g, g)


def ungroup(xg: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return xg.reshape(shape)


def _expand(p: torch.Tensor) -> torch.Tensor:
    """[..., n_groups] -> [..., n_groups, 1] for broadcasting over a grouped tensor."""
    return p.unsqueeze(-1)


def positive_scale(scale: torch.Tensor) -> torch.Tensor:
    """The step size as the grid uses it: clamped into [SCALE_MIN, SCALE_MAX], with a
    straight-through gradient (a learned scale that left the range can come back)."""
    return clamp_ste(scale, SCALE_MIN, SCALE_MAX)


# ---------------------------------------------------------------------------
# Choosing quantization parameters


def choose_qparams(
    x: torch.Tensor,
    fmt: IntFormat,
    group_size: int,
    symmetric: bool,
    clip_ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero point) per group; `clip_ratio` < 1 shrinks the range.

    Returns float32 scale of shape x.shape[:-1] + (n_groups,) (or (1,) per tensor)
    and a zero point of the same shape (integer-valued float32), or None if symmetric.
    """
    xg = group_view(x.detach(), group_size).float()
    qmin, qmax = fmt.qrange(symmetric)
    if symmetric:
        absmax = xg.abs().amax(dim=-1) * clip_ratio
        scale = (absmax / qmax).clamp(SCALE_MIN, SCALE_MAX)
        return _unflat(scale, x, group_size), None
    xmax = xg.amax(dim=-1).clamp(min=0) * clip_ratio  # the range contains 0
    xmin = xg.amin(dim=-1).clamp(max=0) * clip_ratio
    scale = ((xmax - xmin) / (qmax - qmin)).clamp(SCALE_MIN, SCALE_MAX)
    zero_point = (qmin - torch.round(xmin / scale)).clamp(qmin, qmax)
    return _unflat(scale, x, group_size), _unflat(zero_point, x, group_size)


def _unflat(p: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    return p.reshape(1) if group_size == PER_TENSOR else p


# ---------------------------------------------------------------------------
# Quantize / dequantize / fake-quantize


def integer_zero_point(zero_point: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """A (possibly learned, fractional) zero point as the grid uses it: rounded and
    clamped into [0, 2^b - 1]. No gradient; `fake_quantize` does the same with STEs."""
    qmin, qmax = fmt.qrange(False)
    return zero_point.round().clamp(qmin, qmax)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    fmt: IntFormat,
    group_size: int,
) -> torch.Tensor:
    """Map x onto the integer grid: clamp(round(x / scale) + zp). Returns int32."""
    symmetric = zero_point is None
    qmin, qmax = fmt.qrange(symmetric)
    xg = group_view(x, group_size)
    q = torch.round(xg / _expand(scale.clamp(SCALE_MIN, SCALE_MAX).to(xg.dtype)))
    if not symmetric:
        q = q + _expand(integer_zero_point(zero_point.to(xg.dtype), fmt))
    return q.clamp(qmin, qmax).to(torch.int32).reshape(x.shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    fmt: IntFormat,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(q - zp) * scale, back to `dtype`, with the zero point and step size exactly as
    `quantize` uses them (integer zero point, clamped step size)."""
    qg = group_view(q, group_size).to(dtype)
    if zero_point is not None:
        qg = qg - _expand(integer_zero_point(zero_point.float(), fmt).to(dtype))
    return (qg * _expand(scale.clamp(SCALE_MIN, SCALE_MAX).to(dtype))).reshape(q.shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    fmt: IntFormat,
    group_size: int,
) -> torch.Tensor:
    """dequantize(quantize(x)) with straight-through gradients.

    Round uses the STE. The range clamp keeps its true gradient (zero for x
    outside the grid), so the scale receives the LSQ clipping gradient and can
    grow to cover outliers (as in LSQ and EfficientQAT). The zero point is
    rounded and clamped into the grid with STEs, so a learnable zero point keeps
    a gradient. The forward value equals `dequantize(quantize(x, ...), ...)`
    exactly.
    """
    symmetric = zero_point is None
    qmin, qmax = fmt.qrange(symmetric)
    xg = group_view(x, group_size)
    s = _expand(positive_scale(scale).to(xg.dtype))
    q = round_ste(xg / s)
    if symmetric:
        return (q.clamp(qmin, qmax) * s).reshape(x.shape)
    zp = _expand(clamp_ste(round_ste(zero_point.to(xg.dtype)), qmin, qmax))
    q = (q + zp).clamp(qmin, qmax)
    return ((q - zp) * s).reshape(x.shape)


def fake_quantize_dynamic(
    x: torch.Tensor, fmt: IntFormat, group_size: int, symmetric: bool
) -> torch.Tensor:
    """Fake-quantize with qparams computed from x itself (per-token activations, KV cache).

    The qparams are computed without gradient, as in LLM-QAT; x gets the STE gradient.
    """
    scale, zero_point = choose_qparams(x, fmt, group_size, symmetric)
    return fake_quantize(x, scale.to(x.dtype), zero_point, fmt, group_size)
