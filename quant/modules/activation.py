"""Dynamic activation quantization (LLM-QAT): every quantized linear's input.

LLM-QAT quantizes the input of every decoder linear per token, with the range
taken from the token itself at every call (min-max, no calibration, no learned
clipping): activations of LLMs have a few outlier channels whose size changes
from token to token, so a static per-tensor range wastes most of the grid on
ordinary tokens. `DynamicQuantizer` is that operation as a module; it holds no
state, so a model's `state_dict` is unchanged by it, and it is re-applied from
the scheme whenever a model is loaded (see `quant.modules.runtime`).

Granularity is the primitives' group size along the last dimension:
`per_token` = one range per row (`PER_ROW`), `per_tensor` = one range for the
whole tensor (`PER_TENSOR`), and the KV cache's `per_head` = one range per
`head_dim` slice of a token. Symmetric and asymmetric grids follow the spec.

The qparams are computed without gradient (as in LLM-QAT); the input receives
the straight-through gradient of `primitives.fake_quantize`. The arithmetic is
done in float32 whatever the activation dtype: in bf16, `x / scale` would be
rounded to 8 mantissa bits before it is rounded to the grid.

Floating-point formats dispatch to `quant.numerics.fp` (the bias, or the
MXFP4/NVFP4 block scales, taken from the tensor at every call). A layer
calibrated by `fp-search` instead carries a `CalibratedFPQuantizer`: a static,
searched per-tensor bias (and the integer pre-shifts of LLM-FP4's pre-shifted
exponent bias); `apply_activation_quantizers` keeps such a quantizer in place,
and the checkpoint stores its state (`quant.checkpoint`).

Where the hook goes: a `QuantLinear` has an `input_quantizer` slot that its
forward applies; a plain `nn.Linear` (weights not quantized, e.g. W16A8) gets
the same attribute plus a forward pre-hook that applies it.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.config.scheme import ActivationSpec, KVCacheSpec
from quant.modules.linear import QuantLinear
from quant.numerics import fp as FP
from quant.numerics import grid as P
from quant.numerics.formats import FPFormat, IntFormat, NumberFormat

GRANULARITY_GROUP = {"per_token": P.PER_ROW, "per_tensor": P.PER_TENSOR}


class DynamicQuantizer(nn.Module):
    """Fake-quantize a tensor with qparams computed from the tensor itself at every call."""

    def __init__(self, fmt: NumberFormat, group_size: int, symmetric: bool) -> None:
        super().__init__()
        self.fmt = fmt
        self.group_size = group_size
        self.symmetric = symmetric

    @classmethod
    def for_activation(cls, spec: ActivationSpec) -> DynamicQuantizer:
        return cls(spec.format, GRANULARITY_GROUP[spec.granularity], spec.symmetric)

    @classmethod
    def for_kv(cls, spec: KVCacheSpec, head_dim: int) -> DynamicQuantizer:
        group = P.PER_ROW if spec.granularity == "per_token" else head_dim
        return cls(spec.format, group, spec.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., features]; one range per group of the last dim (per token: the whole row)
        if not isinstance(self.fmt, IntFormat):
            return FP.fake_quantize_dynamic(x.float(), self.fmt, self.group_size).to(x.dtype)
        return P.fake_quantize_dynamic(x.float(), self.fmt, self.group_size, self.symmetric).to(x.dtype)

    def extra_repr(self) -> str:
        g = {P.PER_ROW: "per_row", P.PER_TENSOR: "per_tensor"}.get(self.group_size, f"group={self.group_size}")
        return f"{self.fmt.spec()}, {g}, {'sym' if self.symmetric else 'asym'}"


class CalibratedFPQuantizer(nn.Module):
    """A searched (static) FP activation quantizer: per-tensor bias `bias`; with
    pre-shifted exponent bias, channel c is multiplied by 2^shift[c] before the
    per-tensor rounding (the layer's weight column c holds the matching 2^-shift[c])."""

    calibrated = True

    def __init__(self, fmt: FPFormat, bias: torch.Tensor, shift: torch.Tensor | None = None,
                 unshift: bool = False) -> None:
        super().__init__()
        self.fmt, self.unshift = fmt, unshift  # unshift: 2^-shift applied here, weight unfolded
        self.register_buffer("bias", bias.detach().float().reshape(()), persistent=False)
        self.register_buffer("shift", None if shift is None else shift.detach().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # x: [..., in_features]
        if self.shift is not None:
            x32 = x32 * torch.exp2(self.shift)
        q = FP.fake_quantize_fp(x32, self.fmt, self.bias)
        if self.shift is not None and self.unshift:
            q = q * torch.exp2(-self.shift)
        return q.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.fmt.spec()}, per_tensor bias={float(self.bias):.3f}, pre_shift={self.shift is not None}"


def _quantize_input_hook(module: nn.Module, args: tuple) -> tuple | None:
    quantizer = getattr(module, "input_quantizer", None)
    if quantizer is None:
        return None
    return (quantizer(args[0]), *args[1:])


def set_input_quantizer(linear: nn.Module, quantizer: nn.Module | None) -> None:
    """Install (or with None remove) `quantizer` on a linear's input; idempotent."""
    linear.input_quantizer = quantizer
    if isinstance(linear, QuantLinear):
        return  # its forward applies the slot
    if quantizer is not None and _quantize_input_hook not in linear._forward_pre_hooks.values():
        linear.register_forward_pre_hook(_quantize_input_hook)


def apply_activation_quantizers(linears: list[tuple[str, nn.Module]], spec: ActivationSpec | None) -> int:
    """Give every linear in `linears` a per-token (or per-tensor) input quantizer, or
    remove them when `spec` is None. Returns the number of linears changed."""
    for _, lin in linears:
        if spec is not None and getattr(getattr(lin, "input_quantizer", None), "calibrated", False):
            continue  # a searched quantizer (fp-search) stays; its state is part of the model
        set_input_quantizer(lin, None if spec is None else DynamicQuantizer.for_activation(spec))
    return len(linears)
