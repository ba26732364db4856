"""A linear layer that computes from packed low-bit weights.

`PackedLinear` stores what a packed checkpoint stores, in the GPTQ layout (the one
both export formats map onto without loss): `qweight` int32 [in*b/32, out] (codes
packed along the input dimension), `scales` [groups, out] in half precision, and for
asymmetric schemes `qzeros` int32 [groups, out*b/32] (exact zero points, packed along
the output dimension). Symmetric codes are stored with the offset 2^(b-1), so the
dequantised weight is always `(q - z) * s`.

Where the product is computed is a *backend*, chosen once with `use_backend`:

- `torch` (default; any device): unpack, dequantise in float32 exactly as
  `QuantLinear` does, matmul. On CPU this is the reference: the packed model's
  logits equal the fake-quant model's bit for bit.
- `triton` (CUDA; 2/4/8 bits): this project's kernel (quant/modules/triton_gemv.py),
  reading the GPTQ-layout words as stored; batches above 16 rows (prefill) dequantise
  and use cuBLAS.
- `gemlite` (CUDA; 1/2/4/8 bits, groups, `(q - z) * s`): gemlite's Triton kernels,
  an optional dependency (`pip install gemlite`); the packed weights are repacked
  into gemlite's layout once.
- `torch-int4` (4 bits, groups 32..256): torch's own tinygemm kernel
  (`aten._weight_int4pack_mm`, what torchao's int4 weight-only path runs). It
  dequantises as `(q - 8) * s + m` in bfloat16, so the zero point is folded into a
  float offset `m = (8 - z) * s`: close to, not bit-equal with, the reference.

A kernel backend keeps its own copy of the weights; `keep_packed=False` drops the
packed buffers afterwards (what a deployment and the decode benchmark do).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from torch.nn import functional as F

from quant.config import MissingDependencyError
from quant.numerics import grid as P
from quant.numerics.formats import IntFormat
from quant.numerics.packing import PACK_BITS, WORD, unpack

BACKENDS = ("torch", "triton", "gemlite", "torch-int4")
TRITON_MAX_ROWS = 16  # above this (prefill) the triton backend dequantises and calls cuBLAS
GEMLITE_BITS = (1, 2, 4, 8)
INT4_GROUPS = (32, 64, 128, 256)
GEMLITE_INSTALL = "pip install 'gemlite==0.6.0.post2' (or: pip install '.[gpu]')"


class PackedLinear(nn.Module):
    # inference only, torch backend: the dequantized weight (quant.modules.runtime.dequantize_once)
    cached_weight: torch.Tensor | None = None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 symmetric: bool, bias: bool = False, scale_dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in PACK_BITS:
            raise ValueError(f"bits={bits} cannot be packed; accepted: {PACK_BITS}")
        if in_features % WORD or (not symmetric and out_features % WORD):
            raise ValueError(f"in_features={in_features} (and out_features={out_features} when "
                             f"asymmetric) must be multiples of {WORD} to pack")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.group_size = in_features if group_size == -1 else group_size
        groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(in_features * bits // WORD, out_features,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scale_dtype, device=device))
        self.register_buffer("qzeros", None if symmetric else torch.zeros(
            groups, out_features * bits // WORD, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype, device=device)
                             if bias else None)
        self.backend = "torch"
        self._kernel = None

    # -- the integer state -------------------------------------------------

    def codes(self) -> torch.Tensor:
        """Unsigned codes [out, in] (uint8)."""
        return unpack(self.qweight, self.bits, dim=0).t().contiguous()

    def zeros(self) -> torch.Tensor:
        """Integer zero points [out, groups] as float32 (2^(b-1) when symmetric)."""
        if self.qzeros is None:
            return torch.full((self.out_features, self.scales.shape[0]), float(1 << (self.bits - 1)),
                              device=self.scales.device)
        return unpack(self.qzeros, self.bits, dim=1).t().float().contiguous()

    def dequantized_weight(self) -> torch.Tensor:
        """(q - z) * s in float32, [out, in]; the same arithmetic as QuantLinear's."""
        return P.dequantize(self.codes(), self.scales.t().float().contiguous(), self.zeros(), IntFormat(self.bits),
                            self.group_size)

    # -- backends ----------------------------------------------------------

    def use_backend(self, name: str, keep_packed: bool = True) -> PackedLinear:
        if name not in BACKENDS:
            raise ValueError(f"backend={name!r} is not known; accepted: {list(BACKENDS)}")
        if name == "gemlite":
            self._kernel = self._gemlite()
        elif name == "triton":
            self._kernel = self._triton()
        elif name == "torch-int4":
            self._kernel = self._tinygemm()
        else:
            self._kernel = None
        self.backend = name
        if name not in ("torch", "triton") and not keep_packed:  # triton reads the packed words
            self.qweight = self.qzeros = None
        return self

    def _gemlite(self):
        if importlib.util.find_spec("gemlite") is None:
            raise MissingDependencyError(f"backend='gemlite' needs the gemlite package: {GEMLITE_INSTALL}")
        if self.bits not in GEMLITE_BITS:
            raise ValueError(f"backend='gemlite' has no {self.bits}-bit kernel; it accepts bits "
                             f"{list(GEMLITE_BITS)} (use backend='torch')")
        from gemlite.helper import A16Wn

        dtype = self.scales.dtype
        return A16Wn(device=str(self.qweight.device)).from_weights(
            self.codes().contiguous(), self.scales.t().contiguous(), self.zeros().to(dtype).contiguous(),
            self.bits, self.group_size, None if self.bias is None else self.bias)

    def _triton(self):
        from quant.modules import triton_gemv

        if not triton_gemv.available() or not self.qweight.is_cuda:
            raise MissingDependencyError("backend='triton' needs a CUDA device and the triton package "
                                         "(installed with a CUDA build of torch: pip install triton)")
        if self.bits not in triton_gemv.KERNEL_BITS:
            raise ValueError(f"backend='triton' has no {self.bits}-bit kernel; it accepts bits "
                             f"{list(triton_gemv.KERNEL_BITS)} (use backend='torch')")
        zeros = self.zeros().t().contiguous().to(self.scales.dtype)  # [G, N]
        return (triton_gemv.packed_matmul, zeros, self.dequantized_weight)

    def _tinygemm(self):
        if self.bits != 4 or self.group_size not in INT4_GROUPS:
            raise ValueError(f"backend='torch-int4' needs 4 bits and a group size in {list(INT4_GROUPS)}; "
                             f"this layer has {self.bits} bits, group {self.group_size}")
        q = self.codes().to(torch.int32)  # [N, K]
        s = self.scales.t().float()  # [N, G]
        m = (8.0 - self.zeros()) * s  # (q - z) * s = (q - 8) * s + (8 - z) * s
        sz = torch.stack([s, m], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, N, 2]
        if q.is_cuda:
            qu8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            w = torch.ops.aten._convert_weight_to_int4pack(qu8, 8)
            return ("cuda", w, sz)
        return ("cpu", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        if self.backend == "torch":
            w = self.cached_weight
            if w is None or torch.is_grad_enabled():
                w = self.dequantized_weight()
            w = w.to(x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        if self.backend == "gemlite":
            return self._kernel(x)
        if self.backend == "triton":
            matmul, zeros, dequant = self._kernel
            x2 = x.reshape(-1, self.in_features)
            if x2.shape[0] > TRITON_MAX_ROWS:
                y = F.linear(x2, dequant().to(x.dtype))
            else:
                y = matmul(x2, self.qweight, self.scales, zeros, self.bits, self.group_size)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        kind, w, sz = self._kernel
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if kind == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, w, self.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w, self.group_size, sz)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={self.group_size}, "
                f"{'sym' if self.symmetric else 'asym'}, backend={self.backend}")
