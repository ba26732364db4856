"""llama.cpp block types written from this project's integer codes (no re-quantisation).

A llama.cpp weight row is a sequence of 32-element blocks, each with its own fp16
step `d` (and, for the `_1` types, an fp16 offset `m`). This project's integer grid is
`w = (q - z) * s` per group of `g` inputs. When `g` is a multiple of 32 (or the whole
row, `g = -1`, with the row a multiple of 32), every block lies inside one group, and
the block types below hold the grid exactly with `d = s`:

| scheme                | block type | codes stored             | value in llama.cpp   | bits/weight |
|-----------------------|------------|--------------------------|----------------------|-------------|
| int2/3/4, asymmetric  | Q4_1       | q (0..15)                | d*q + m, m = -s*z    | 5.0         |
| int2/3/4, symmetric   | Q4_0       | q + 8 (0..15)            | d*(q' - 8)           | 4.5         |
| int5, asymmetric      | Q5_1       | q (0..31)                | d*q + m, m = -s*z    | 6.0         |
| int5, symmetric       | Q5_0       | q + 16 (0..31)           | d*(q' - 16)          | 5.5         |
| int6/7, asymmetric    | Q8_0       | q - z (|q - z| <= 127)   | d*q'                 | 8.5         |
| int6/7/8, symmetric   | Q8_0       | q (-128..127)            | d*q'                 | 8.5         |

Exactness: `d = s` is exact whenever `s` is an fp16 value (convert.dtype float16; a
bfloat16 step converts exactly unless it lies below fp16's normal range, 6.1e-5). The
offset `m = -s*z` needs up to 4 more mantissa bits than fp16 has, so it is rounded
once to fp16: the only difference from the fake-quant weights, at most half an fp16
ulp of `s*z` (<= 2^-12 * 15 * s at 4 bits) per weight, and zero where `s*z` happens to
be an fp16 value. Everything else is bit-exact (tests dequantize the blocks with the
gguf package's own code).

Why not smaller types for 2/3 bits: llama.cpp's 2/3-bit types are k-quants (Q2_K,
Q3_K: 16-element sub-blocks whose scales are themselves 4/6-bit multiples of one fp16
super-block scale). A per-group fp16 step of this project cannot be expressed in them,
so they would re-quantise the trained grid (RTN W3 g64 is already ~3x the fp PPL on the
embedded model; a second rounding on top of it is a large change). Q4_1 / Q4_0 keep
the trained 2/3-bit grid exactly at 4-bit size.

Refused: int8 asymmetric (q - z spans -255..255; no llama.cpp type holds it: use
symmetric int8 -> Q8_0), group sizes that are not a multiple of 32 (a block would
straddle two groups with different steps).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quant.config import ConfigError

BLOCK = 32  # elements per block of every type used here


def block_type(bits: int, symmetric: bool) -> GGMLQuantizationType:
    """The llama.cpp type that holds a `bits`-bit grid exactly (table in the docstring)."""
    if bits <= 4:
        return GGMLQuantizationType.Q4_0 if symmetric else GGMLQuantizationType.Q4_1
    if bits == 5:
        return GGMLQuantizationType.Q5_0 if symmetric else GGMLQuantizationType.Q5_1
    if bits == 8 and not symmetric:
        raise ConfigError("scheme.weight.format=int8 with scheme.weight.symmetric=false cannot be exported "
                          "to 'gguf': q - z spans -255..255 and no llama.cpp type holds it; accepted: "
                          "int8 with symmetric: true (Q8_0), or int2..int7 either way")
    return GGMLQuantizationType.Q8_0


def check_group(group_size: int, in_features: int, name: str) -> None:
    """Every 32-block of a row must lie inside one quantization group."""
    g = in_features if group_size == -1 else group_size
    if g % BLOCK or in_features % BLOCK:
        raise ConfigError(
            f"scheme.weight.group_size={group_size} cannot be exported to 'gguf' for {name} "
            f"(in_features={in_features}): llama.cpp blocks are {BLOCK} inputs with one step each, so "
            f"the group size must be a multiple of {BLOCK} (e.g. 32, 64, 128) or -1 with in_features "
            f"a multiple of {BLOCK}")


def _fp16_bytes(x: torch.Tensor, what: str) -> torch.Tensor:
    """[n] float -> [n, 2] uint8 of the fp16 value (little endian), refusing overflow."""
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ConfigError(f"a quantization {what} exceeds the fp16 range of llama.cpp blocks "
                          f"(max {float(x.abs().max()):.4g}); the step sizes are not exportable to 'gguf'")
    return h.view(torch.uint8).reshape(-1, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] codes -> [n, 16] bytes: byte j = low 4 bits of q[j] | low 4 bits of q[j+16] << 4."""
    lo, hi = q[:, :16] & 0xF, q[:, 16:] & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] 5-bit codes -> [n, 4] bytes: bit j of the little-endian uint32 = bit 4 of q[j]."""
    bits = ((q >> 4) & 1).reshape(-1, 4, 8)  # byte k holds elements 8k..8k+7, bit i = element 8k+i
    return (bits << torch.arange(8)).sum(-1).to(torch.uint8)


def encode(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
           group_size: int) -> tuple[GGMLQuantizationType, np.ndarray]:
    """Integer codes q [N, K] (unsigned if `zero_point` else signed), step sizes and integer
    zero points [N, G] -> (block type, uint8 [N, K/32 * type_size]) in llama.cpp's layout."""
    n, k = q.shape
    qtype = block_type(bits, zero_point is None)
    check_group(group_size, k, "this layer")
    per_block = (k if group_size == -1 else group_size) // BLOCK
    q = q.to(torch.int32).reshape(-1, BLOCK)  # [N * K/32, 32]: one row per block
    s = scale.float().repeat_interleave(per_block, dim=1).reshape(-1)  # [N * K/32]
    z = None if zero_point is None else zero_point.float().repeat_interleave(per_block, dim=1).reshape(-1)
    d = _fp16_bytes(s, "step size")
    if qtype == GGMLQuantizationType.Q4_1:
        parts = [d, _fp16_bytes(-s * z, "offset -s*z"), _nibbles(q)]
    elif qtype == GGMLQuantizationType.Q4_0:
        parts = [d, _nibbles(q + 8)]
    elif qtype == GGMLQuantizationType.Q5_1:
        parts = [d, _fp16_bytes(-s * z, "offset -s*z"), _high_bits(q), _nibbles(q)]
    elif qtype == GGMLQuantizationType.Q5_0:
        parts = [d, _high_bits(q + 16), _nibbles(q + 16)]
    else:  # Q8_0: signed codes, or q - z of a 6/7-bit asymmetric grid (|q - z| <= 127)
        signed = q if z is None else q - z.to(torch.int32)[:, None]
        parts = [d, signed.to(torch.int8).view(torch.uint8)]
    blocks = torch.cat(parts, dim=1)
    assert blocks.shape[1] == GGML_QUANT_SIZES[qtype][1], (qtype, blocks.shape)
    return qtype, blocks.reshape(n, -1).numpy()
