"""Storage footprint of a (quantized) model as it would be deployed.

The papers' "bits" axis is the weight format, but what a group size costs is
the step sizes and zero points stored beside the integers, so the comparison
report plots *effective* bits per weight: for a quantized linear
`bits + (16 + zp_bits) / group_size` (fp16 step size per group; the zero point
stored on the integer grid, as packed formats such as AWQ/GPTQ keep it; none
when symmetric). Everything that is not a quantized linear (embeddings, norms,
an unquantized lm_head) counts at 16 bits, as a half-precision deployment
stores it. Tied weights count once. Sizes are in GB = 1e9 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quant.modules.linear import QuantLinear, quant_linears
from quant.modules.packed import PackedLinear

HALF_BITS = 16


@dataclass(frozen=True)
class Footprint:
    size_gb: float
    bits_per_weight: float  # effective bits of the quantized linears' weights (16 if none)
    quantized_weights: int  # weights held by quantized linears
    parameters: int  # every parameter, tied ones once

    def to_dict(self) -> dict[str, float]:
        return {"size_gb": self.size_gb, "bits_per_weight": self.bits_per_weight}


def _quant_linear_bits(m: QuantLinear | PackedLinear) -> tuple[int, int]:
    """(bits of the weight with its step sizes and zero points, bits of the bias)."""
    packed = isinstance(m, PackedLinear)  # a packed layer stores what it says (GPTQ: zero points always)
    bits = m.bits if packed else m.spec.bits
    groups = m.scales.numel() if packed else m.scale.numel()  # [out, n_groups]
    weight = m.in_features * m.out_features * bits + groups * HALF_BITS
    if not (m.symmetric if packed else m.spec.symmetric):
        weight += groups * bits
    bias = m.out_features * HALF_BITS if m.bias is not None else 0
    return weight, bias


def footprint(model: nn.Module) -> Footprint:
    qlinears = dict(quant_linears(model))
    qlinears.update((n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear))
    other_bits = other_params = 0
    for name, p in model.named_parameters():  # tied parameters appear once
        owner = name.rpartition(".")[0]
        if owner in qlinears:
            continue
        other_bits += p.numel() * HALF_BITS
        other_params += p.numel()
    q_weight_bits = q_bias_bits = q_weights = 0
    for m in qlinears.values():
        w, b = _quant_linear_bits(m)
        q_weight_bits += w
        q_bias_bits += b
        q_weights += m.in_features * m.out_features
    total_bits = other_bits + q_weight_bits + q_bias_bits
    bpw = q_weight_bits / q_weights if q_weights else float(HALF_BITS)
    params = other_params + q_weights + sum(m.out_features for m in qlinears.values() if m.bias is not None)
    return Footprint(size_gb=total_bits / 8 / 1e9, bits_per_weight=bpw, quantized_weights=q_weights,
                     parameters=params)
