"""Fake-quant linear layer with learnable step size and zero point.

`QuantLinear` has two states, visible in `frozen`:

- trainable (after `from_linear`): the float weight, the step size (`scale`)
  and the zero point are nn.Parameters; forward fake-quantizes the weight with
  `primitives.fake_quantize`. This is what RTN/AWQ initialise and what Block-AP
  trains (weights and quantizer parameters together).
- frozen on the grid (after `freeze()`): the integer weights live in an
  integer buffer, the zero point becomes an integer-valued buffer, and only the
  step size stays a parameter. Forward dequantizes `(q - zp) * scale`. This is
  the E2E-QP state, and the integer representation that packed export writes.

Both states compute the same function for the same (weight, scale, zero point),
and `to_linear()` turns either back into a plain `nn.Linear` with the
dequantized weight.

Floating-point formats (`FPFormat`, LLM-FP4; `mxfp4` / `nvfp4`) dispatch to
`quant.numerics.fp`: an FP layer holds its float weight and a learnable
real-valued exponent bias per group (`exp_bias`, no `scale`/`zero_point`);
block-scaled layers take their block scales from the weight (RTN, no qparams).
FP layers have no integer codes, so `freeze()` / `integer_weight()` refuse them.

An optional `input_quantizer` (a module applied to the input, e.g. per-token
dynamic activation quantization) is kept separate from the weight math.

Reference weight: the float weight of a trainable layer is normally also the
full-precision weight the layer approximates (RTN and AWQ keep the float, scaled
weight), and the block-wise engine takes its targets from it. A method that moves the
float weight itself away from that function (GPTQ puts it on the grid, codes * steps,
so that training starts at GPTQ's solution) first keeps the full-precision weight in
the buffer `reference_weight` (`keep_reference()`); `full_precision_weight()` is
the one place that chooses. The buffer is None otherwise, so other methods pay no
memory for it. It is a target, never trained, and only block-wise training reads it:
`freeze()` drops it (a frozen layer is past block-wise training; the exporters freeze
first), and `drop_reference_weights` drops it from a model that no block-wise step
follows (`quant.quantize`; end-to-end losses take their targets from labels or a teacher).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from quant.config.scheme import WeightSpec
from quant.numerics import fp as FP
from quant.numerics import grid as P
from quant.numerics.formats import FPFormat, IntFormat


class QuantLinear(nn.Module):
    # inference only: the dequantized weight, set by quant.modules.runtime.dequantize_once
    cached_weight: torch.Tensor | None = None
    # compute with the float weight, no quantizer (block-wise targets of MoE blocks)
    fp_bypass: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: WeightSpec,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        spec.check_layer(type(self).__name__, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        n_groups = 1 if spec.group_size == -1 else in_features // spec.group_size
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        # qparams are kept in float32 regardless of the weight dtype.
        is_int = isinstance(spec.format, IntFormat)
        self.scale = nn.Parameter(torch.ones(out_features, n_groups, device=device)) if is_int else None
        self.zero_point = (
            None
            if spec.symmetric or not is_int
            else nn.Parameter(torch.zeros(out_features, n_groups, device=device))
        )
        self.exp_bias = (  # FP formats: the exponent bias per group (LLM-FP4)
            nn.Parameter(torch.zeros(out_features, n_groups, device=device))
            if isinstance(spec.format, FPFormat) else None
        )
        self.register_buffer("qweight", None)
        self.register_buffer("reference_weight", None)  # see the module docstring
        self.input_quantizer: nn.Module | None = None

    # -- construction ------------------------------------------------------

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, spec: WeightSpec, name: str = "linear", clip_ratio: float = 1.0
    ) -> QuantLinear:
        """Wrap a linear layer; qparams initialised by min-max (optionally clipped)."""
        spec.check_layer(name, linear.in_features)
        w = linear.weight
        q = cls(
            linear.in_features,
            linear.out_features,
            spec,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            q.weight.copy_(w)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
            q.init_qparams(clip_ratio)
        return q

    @torch.no_grad()
    def init_qparams(self, clip_ratio: float = 1.0) -> None:
        """(Re)compute step size and zero point from the current weight by min-max."""
        if self.frozen:
            raise RuntimeError("init_qparams() on a frozen QuantLinear; qparams are final")
        if not isinstance(self.spec.format, IntFormat):
            if self.exp_bias is not None:
                self.exp_bias.copy_(FP.choose_bias(self.weight, self.spec.format, self.spec.group_size))
            return
        scale, zp = P.choose_qparams(
            self.weight, self.spec.format, self.spec.group_size, self.spec.symmetric, clip_ratio
        )
        self.scale.copy_(scale)
        if self.zero_point is not None:
            self.zero_point.copy_(zp)

    @torch.no_grad()
    def keep_reference(self) -> None:
        """Keep the current float weight as the reference weight, before a method moves
        `weight` away from the full-precision function (a second call keeps the first)."""
        if self.frozen:
            raise RuntimeError("keep_reference() on a frozen QuantLinear: its float weight is gone")
        if self.reference_weight is None:
            self.reference_weight = self.weight.detach().clone()

    def full_precision_weight(self) -> torch.Tensor:
        """The full-precision weight this layer approximates: the reference weight where one is
        kept, else the float weight (the function block-wise training reconstructs)."""
        if self.frozen:
            raise RuntimeError("a frozen QuantLinear has no full-precision weight: its float weight is gone")
        return self.weight if self.reference_weight is None else self.reference_weight

    # -- state -------------------------------------------------------------

    @property
    def frozen(self) -> bool:
        return self.qweight is not None

    def _zero_point_int(self) -> torch.Tensor | None:
        """The zero point as used by the forward pass: rounded and clamped to the grid."""
        if self.zero_point is None:
            return None
        return P.integer_zero_point(self.zero_point.detach(), self.spec.format)

    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q int32 [out, in], scale fp32 [out, groups], zero point fp32 [out, groups] or None)."""
        if not isinstance(self.spec.format, IntFormat):
            raise RuntimeError(
                f"{self.spec.format.spec()} layers have no integer codes; they are kept as float "
                "weight + exponent bias (freeze and integer export are integer-format only)"
            )
        if self.frozen:
            return self.qweight.to(torch.int32), self.scale.detach().float(), self.zero_point
        if self.spec.dynamic_minmax:  # the stored qparams are the ones the forward pass derives
            self.init_qparams()
        zp = self._zero_point_int()
        q = P.quantize(self.weight.float(), self.scale.float(), zp, self.spec.format, self.spec.group_size)
        return q, self.scale.detach().float(), zp

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the weights on the integer grid; afterwards only `scale` (and bias) can train."""
        if self.frozen:
            return
        q, _, zp = self.integer_weight()
        qdtype = torch.uint8 if not self.spec.symmetric else torch.int8
        self.qweight = q.to(qdtype)
        dtype, device = self.weight.dtype, self.weight.device
        del self.weight
        self.reference_weight = None  # a frozen layer is past block-wise training
        self.register_buffer("weight_dtype_probe", torch.empty(0, dtype=dtype, device=device))
        if zp is not None:
            del self.zero_point
            self.register_buffer("zero_point", zp)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_dtype_probe.dtype if self.frozen else self.weight.dtype

    # -- forward -----------------------------------------------------------

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (differentiable w.r.t. weight/scale/zero point)."""
        fmt, g = self.spec.format, self.spec.group_size
        if not isinstance(fmt, IntFormat):
            bias = None if self.spec.dynamic_minmax else self.exp_bias
            return FP.fake_quantize_weight(self.weight.float(), fmt, bias, g).to(self.weight.dtype)
        if self.frozen:
            return P.dequantize(self.qweight, self.scale, self.zero_point, fmt, g, self.scale.dtype).to(
                self.compute_dtype
            )
        if self.spec.dynamic_minmax:  # LLM-QAT: qparams follow the weight, no gradient to them
            w = P.fake_quantize_dynamic(self.weight.float(), fmt, g, self.spec.symmetric)
            return w.to(self.weight.dtype)
        w = P.fake_quantize(self.weight.float(), self.scale, self.zero_point, fmt, g)
        return w.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp_bypass:  # the full-precision function (quant.blockwise.passes.full_precision)
            w = self.full_precision_weight()
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.cached_weight
        if w is None or torch.is_grad_enabled():
            w = self.dequantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight."""
        w = self.dequantized_weight()
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=w.device, dtype=w.dtype,
        )
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, {self.spec.format.spec()}, "
            f"group={self.spec.group_size}, {'sym' if self.spec.symmetric else 'asym'}, "
            f"{'frozen' if self.frozen else 'trainable'}"
            f"{', with reference weight' if self.reference_weight is not None else ''}"
        )


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(qualified name, module) of every QuantLinear in `model` (the one listing of them)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def drop_reference_weights(model: nn.Module) -> int:
    """Drop every QuantLinear's reference weight (once nothing will train against it); returns
    how many layers had one."""
    n = 0
    for _, m in quant_linears(model):
        n += m.reference_weight is not None
        m.reference_weight = None
    return n
