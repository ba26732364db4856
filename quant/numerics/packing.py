"""Bit packing of integer codes into int32 words: the one place that packs and unpacks.

The layout is the dense little-endian bit stream that GPTQ (AutoGPTQ / GPTQModel) and
compressed-tensors' `pack_to_int32` share: along the packed dimension, element i
occupies bits [i*b, (i+1)*b) of the stream, word j holds stream bits [32j, 32j+32).
Every 32 elements fill exactly b words. For b in {2, 4, 8} no element straddles two
words; for b in {3, 5, 6, 7} some do (for b = 3, elements 10 and 21: GPTQ's 3-bit
layout). GPTQ defines 2/3/4/8 bits, compressed-tensors 1..8 (this project's integer
formats: 2..8). The packed dimension must be a multiple of 32 (GPTQ's own
requirement), so no padding is ever stored.

Codes are unsigned [0, 2^b - 1]; converting to a signed convention is the caller's
business (compressed-tensors subtracts 2^(b-1)).
"""

from __future__ import annotations

import torch

WORD = 32
PACK_BITS = (2, 3, 4, 5, 6, 7, 8)


def _bit_positions(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the 32 elements of one block of `bits` words: (word index, bit offset)."""
    start = torch.arange(WORD, device=device, dtype=torch.int64) * bits
    return start // WORD, start % WORD


def pack(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Unsigned codes (any integer dtype) -> int32 words, packed along `dim` (2-D input)."""
    if bits not in PACK_BITS:
        raise ValueError(f"bits={bits} cannot be packed; accepted: {PACK_BITS}")
    x = (codes.t() if dim == 0 else codes).contiguous()  # transposed while narrow
    rows, n = x.shape  # pack along the last dim: [rows, n]
    if n % WORD:
        raise ValueError(f"the packed dimension ({n}) must be a multiple of {WORD}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 1 << bits):
        raise ValueError(f"codes out of the unsigned {bits}-bit range [0, {(1 << bits) - 1}]")
    if WORD % bits == 0:  # 2/4/8 bits: whole codes per word, shifts instead of a scatter (~10x faster)
        per = WORD // bits
        shifts = torch.arange(0, WORD, bits, device=x.device, dtype=torch.int32)
        # disjoint bit fields: their int32 sum is their bitwise or (the top field sets the sign bit)
        words = (x.to(torch.int32).reshape(rows, n // per, per) << shifts).sum(-1, dtype=torch.int32)
        return words.t().contiguous() if dim == 0 else words.contiguous()
    x = x.to(torch.int64)
    blocks = x.reshape(rows, n // WORD, WORD)  # [rows, blocks, 32]
    word, offset = _bit_positions(bits, x.device)
    out = torch.zeros(rows, n // WORD, bits + 1, dtype=torch.int64, device=x.device)
    shifted = blocks << offset  # up to 39 bits: the part past bit 31 belongs to the next word
    out.scatter_add_(-1, word.expand_as(blocks), shifted & 0xFFFFFFFF)
    out.scatter_add_(-1, (word + 1).expand_as(blocks), shifted >> WORD)
    words = out[..., :bits].reshape(rows, n * bits // WORD)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.t().contiguous() if dim == 0 else words.contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """int32 words -> unsigned codes (uint8), the inverse of `pack` along `dim`."""
    if bits not in PACK_BITS:
        raise ValueError(f"bits={bits} cannot be unpacked; accepted: {PACK_BITS}")
    if words.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {words.dtype}")
    w = words.t() if dim == 0 else words
    rows, m = w.shape
    if m % bits:
        raise ValueError(f"{m} packed words are not a whole number of {bits}-word blocks")
    if WORD % bits == 0:  # 2/4/8 bits: whole codes per word, shifts instead of a gather (~10x faster)
        shifts = torch.arange(0, WORD, bits, device=w.device, dtype=torch.int32)
        codes = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(rows, m * WORD // bits)
        return codes.t().contiguous() if dim == 0 else codes.contiguous()
    w = (w.to(torch.int64) & 0xFFFFFFFF).reshape(rows, m // bits, bits)
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # a zero word past the end
    word, offset = _bit_positions(bits, w.device)
    lo = w[..., word] >> offset
    hi = w[..., word + 1] << (WORD - offset)
    codes = ((lo | hi) & ((1 << bits) - 1)).to(torch.uint8).reshape(rows, m // bits * WORD)
    return codes.t().contiguous() if dim == 0 else codes.contiguous()
