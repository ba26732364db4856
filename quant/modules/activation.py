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

Where the hook goes: a `QuantLinear` has an `input_quantizer` slot that its
forward applies; a plain `nn.Linear` (weights not quantized, e.g. W16A8) gets
the same attribute plus a forward pre-hook that applies it.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.config.scheme import ActivationSpec, KVCacheSpec
from quant.modules.linear import QuantLinear
from quant.numerics import grid as P
from quant.numerics.formats import IntFormat

GRANULARITY_GROUP = {"per_token": P.PER_ROW, "per_tensor": P.PER_TENSOR}


class DynamicQuantizer(nn.Module):
    """Fake-quantize a tensor with qparams computed from the tensor itself at every call."""

    def __init__(self, fmt: IntFormat, group_size: int, symmetric: bool) -> None:
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
        return P.fake_quantize_dynamic(x.float(), self.fmt, self.group_size, self.symmetric).to(x.dtype)

    def extra_repr(self) -> str:
        g = {P.PER_ROW: "per_row", P.PER_TENSOR: "per_tensor"}.get(self.group_size, f"group={self.group_size}")
        return f"{self.fmt.spec()}, {g}, {'sym' if self.symmetric else 'asym'}"


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
        set_input_quantizer(lin, None if spec is None else DynamicQuantizer.for_activation(spec))
    return len(linears)
