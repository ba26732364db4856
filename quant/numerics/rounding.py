"""Learned rounding on the integer grid (AdaRound / TesseraQ): the one place for soft codes.

A weight x with step size s sits between the grid points floor(x/s) and
floor(x/s) + 1; a rounding variable alpha decides where it goes through the
rectified sigmoid h(alpha) = clamp(1.2 * sigmoid(alpha) - 0.1, 0, 1), whose
ends are reached at finite alpha (so a variable can become exactly 0 or 1).
The code is clamp(floor(x/s) + h(alpha) + z, qmin, qmax); once every h is 0 or
1 this is an ordinary integer code and `dequantize` of it is the weight.

Shapes follow quant.numerics.grid: a weight [out, in] is viewed as
[out, n_groups, g]; scales and zero points are [out, n_groups].
"""

from __future__ import annotations

import torch

from quant.numerics.formats import IntFormat
from quant.numerics.grid import group_view, positive_scale

STRETCH_LOW, STRETCH_HIGH = -0.1, 1.1  # h = sigmoid stretched to (-0.1, 1.1), then clamped


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """h(alpha) = clamp(1.2 * sigmoid(alpha) - 0.1, 0, 1)."""
    return (torch.sigmoid(alpha) * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0.0, 1.0)


def rectified_sigmoid_inverse(h: torch.Tensor) -> torch.Tensor:
    """alpha with h(alpha) = h for h in [0, 1] (finite at both ends)."""
    h = h.clamp(0.0, 1.0)
    return -torch.log((STRETCH_HIGH - STRETCH_LOW) / (h - STRETCH_LOW) - 1.0)


def hard_alpha() -> float:
    """A finite alpha far past the point where h saturates (ln 11 ~ 2.4): h is exactly 0 or 1
    there and its gradient exactly 0, so a hardened variable stays put under Adam."""
    return 100.0


def grid_split(x: torch.Tensor, scale: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(floor(x/s), x/s - floor(x/s)) as [out, n_groups, g] float32 tensors (s as the grid
    uses it: `positive_scale`)."""
    xs = group_view(x.detach().float(), group_size) / positive_scale(scale.detach().float()).unsqueeze(-1)
    base = torch.floor(xs)
    return base, xs - base


def soft_dequantize(base: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    fmt: IntFormat, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(clamp(base + h + z, qmin, qmax) - z) * s * out_scale, grouped [out, n_groups, g].

    `out_scale` (per group) multiplies the step size in dequantisation only; the codes
    use the original step size (TesseraQ's dequantisation-scale tuning)."""
    qmin, qmax = fmt.qrange(zero_point is None)
    s = positive_scale(scale if out_scale is None else scale * out_scale)
    if zero_point is None:
        return (base + h).clamp(qmin, qmax) * s.unsqueeze(-1)
    z = zero_point.unsqueeze(-1)
    return ((base + h + z).clamp(qmin, qmax) - z) * s.unsqueeze(-1)


def hard_codes(base: torch.Tensor, up: torch.Tensor, zero_point: torch.Tensor | None,
               fmt: IntFormat) -> torch.Tensor:
    """Integer codes clamp(base + up + z, qmin, qmax) (int32, grouped) for decisions `up` in {0, 1}."""
    qmin, qmax = fmt.qrange(zero_point is None)
    q = base + up.to(base.dtype)
    if zero_point is not None:
        q = q + zero_point.unsqueeze(-1)
    return q.clamp(qmin, qmax).to(torch.int32)

