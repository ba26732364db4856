"""The floating-point grids: the one place that rounds a value to an FP format.

LLM-FP4's quantizer, shared by weights, activations and the KV cache. For a format
with E exponent and M mantissa bits (one sign bit, subnormals, no inf/NaN codes)
and a real-valued exponent bias b:

    maxval = (2 - 2^-M) * 2^(2^E - 1 - b)
    x_c    = clamp(x, -maxval, maxval)
    p      = max(floor(log2|x_c| + b), 1)          # the binade; 1 = subnormal range
    step   = 2^(p - M - b)
    Q(x)   = round(x_c / step) * step              # round half to even

(the floor is taken of `log2|x| + b`, as the reference implementation does, so a
real-valued bias is exactly a power-of-two-free rescaling of the grid:
Q_b(x) = 2^-b Q_0(2^b x); an integer shift k of the bias scales the grid by
2^-k, which is what the pre-shifted activation bias relies on).

The initial bias maps max|x| onto maxval: b = 2^E - 1 - log2(max|x|) + log2(2 - 2^-M).
Granularity is the integer grid's group size along the last dimension
(`quant.numerics.grid.group_view`): -1 per row (per output channel / per token),
0 per tensor, g > 0 groups of g elements; a bias has shape
`x.shape[:-1] + (n_groups,)` (one element per tensor).

Fake quantization uses the straight-through estimator of `ste.round_ste` for the
rounding; the clamp keeps its true gradient (as in LLM-FP4 and LSQ) so the bias
receives a gradient through maxval and step.

Block-scaled FP4 (`mxfp4`, `nvfp4`) reuses the same rounding for the E2M1
elements (bias 1) and for NVFP4's E4M3 block scales (bias 7, saturated at the
OCP E4M3 maximum 448, whose all-ones code is NaN and so is never produced).
"""

from __future__ import annotations

import math

import torch

from quant.numerics.formats import BlockFPFormat, FPFormat, MXFP4Format, NumberFormat
from quant.numerics.grid import PER_TENSOR, group_view
from quant.numerics.ste import round_ste

E2M1 = FPFormat(2, 1)
E4M3 = FPFormat(4, 3)
E4M3_MAX = 448.0  # OCP E4M3 (S.1111.111 is NaN): 1.75 * 2^8
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
TINY = 1e-30


def maxval(fmt: FPFormat, bias: torch.Tensor | float) -> torch.Tensor | float:
    """Largest magnitude of `fmt` with exponent bias `bias`."""
    top = 2**fmt.exponent - 1
    if isinstance(bias, torch.Tensor):
        return (2 - 2.0**-fmt.mantissa) * torch.exp2(top - bias)
    return (2 - 2.0**-fmt.mantissa) * 2.0 ** (top - bias)


def bias_for_absmax(absmax: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """The bias that maps `absmax` to the top of the grid (LLM-FP4's min-max init)."""
    top = 2**fmt.exponent - 1
    return top - torch.log2(absmax.float().clamp(min=TINY)) + math.log2(2 - 2.0**-fmt.mantissa)


def fake_quantize_fp(x: torch.Tensor, fmt: FPFormat, bias: torch.Tensor | float) -> torch.Tensor:
    """Round `x` to `fmt` with exponent bias `bias` (broadcast against x); STE gradient."""
    if not isinstance(bias, torch.Tensor):
        bias = torch.tensor(float(bias), device=x.device, dtype=x.dtype)
    bias = bias.to(x.dtype)
    mv = maxval(fmt, bias)
    xc = torch.maximum(torch.minimum(x, mv), -mv)
    p = torch.floor(torch.log2(xc.detach().abs()) + bias.detach()).clamp(min=1.0)
    step = torch.exp2(p - fmt.mantissa - bias)
    return round_ste(xc / step) * step


def _expand(p: torch.Tensor) -> torch.Tensor:
    return p.unsqueeze(-1)


def choose_bias(x: torch.Tensor, fmt: FPFormat, group_size: int) -> torch.Tensor:
    """Min-max bias per group (shape x.shape[:-1] + (n_groups,), or (1,) per tensor)."""
    xg = group_view(x.detach(), group_size).float()
    bias = bias_for_absmax(xg.abs().amax(dim=-1), fmt)
    return bias.reshape(1) if group_size == PER_TENSOR else bias


def fake_quantize_grouped(x: torch.Tensor, fmt: FPFormat, bias: torch.Tensor, group_size: int) -> torch.Tensor:
    """`fake_quantize_fp` with one bias per group of the last dimension."""
    xg = group_view(x, group_size)
    b = bias.reshape(1, 1) if group_size == PER_TENSOR else _expand(bias)
    return fake_quantize_fp(xg, fmt, b).reshape(x.shape)


# ---------------------------------------------------------------------------
# Block-scaled FP4 (MXFP4, NVFP4)


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round to OCP FP8 E4M3 (saturating at 448): the NVFP4 block-scale format."""
    return fake_quantize_fp(x.clamp(-E4M3_MAX, E4M3_MAX), E4M3, E4M3.standard_bias)


def e8m0_scale(absmax: torch.Tensor) -> torch.Tensor:
    """OCP MX shared scale: 2^(floor(log2 absmax) - emax(E2M1)=2), within E8M0's range."""
    e = torch.floor(torch.log2(absmax.clamp(min=TINY))) - 2
    return torch.exp2(e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP))


def block_scales(x: torch.Tensor, fmt: BlockFPFormat) -> torch.Tensor:
    """Decoded per-block scales [..., n_blocks] (NVFP4: E4M3 block scale x tensor scale)."""
    absmax = group_view(x.detach(), fmt.block_size).float().abs().amax(dim=-1)
    if isinstance(fmt, MXFP4Format):
        return e8m0_scale(absmax)
    e2m1_max = float(maxval(E2M1, E2M1.standard_bias))
    tensor_amax = absmax.max()
    tensor_scale = torch.where(tensor_amax > 0, tensor_amax / (e2m1_max * E4M3_MAX), 1.0)
    return e4m3_round(absmax / e2m1_max / tensor_scale) * tensor_scale


def fake_quantize_block(x: torch.Tensor, fmt: BlockFPFormat) -> torch.Tensor:
    """RTN of `x` to a block-scaled FP4 format along the last dimension; STE gradient."""
    xg = group_view(x, fmt.block_size)  # [..., n_blocks, block]
    s = _expand(block_scales(x, fmt)).to(xg.dtype)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero (or underflowed) block stays 0
    q = fake_quantize_fp(xg / safe, E2M1, E2M1.standard_bias) * safe
    return torch.where(s > 0, q, torch.zeros_like(q)).reshape(x.shape)


# ---------------------------------------------------------------------------
# Entry points by format type


def fake_quantize_dynamic(x: torch.Tensor, fmt: NumberFormat, group_size: int) -> torch.Tensor:
    """Fake-quantize with the bias (or block scales) taken from x itself, without gradient
    to them; x gets the STE gradient. Block formats use their own block size."""
    if isinstance(fmt, BlockFPFormat):
        return fake_quantize_block(x, fmt)
    if not isinstance(fmt, FPFormat):
        raise TypeError(f"{fmt} is not a floating-point format")
    return fake_quantize_grouped(x, fmt, choose_bias(x, fmt, group_size).to(x.dtype), group_size)


def fake_quantize_weight(w: torch.Tensor, fmt: NumberFormat, bias: torch.Tensor | None,
                         group_size: int) -> torch.Tensor:
    """A weight on its FP grid: stored bias per group, or dynamic when `bias` is None."""
    if bias is None or isinstance(fmt, BlockFPFormat):
        return fake_quantize_dynamic(w, fmt, group_size)
    return fake_quantize_grouped(w, fmt, bias, group_size)
