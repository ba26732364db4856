"""Half precision, as EfficientQAT's conversion step, and the `half` format.

After training, a quantized model still carries float32 parts: step sizes, norms,
embeddings, and (before freezing) the float master weights. `to_half` freezes every
quantized linear on its integer grid (the integer codes are the ones the forward
pass already used, so nothing changes there) and casts every float tensor to
fp16/bf16. Zero points are integers <= 255, exact in both half types; step sizes
are rounded once to the half type. Dequantisation `(q - z) * s` of a b-bit code and
a half step size is exact in float32, so the half model computes what a packed
runtime computes from the same codes and step sizes.

The `half` format is this project's own checkpoint (quant.checkpoint) written
from the half model: everything `load_quantized` restores, activation/KV-cache schemes
included, at half the bytes, with the float master copies gone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quant.checkpoint import save_quantized
from quant.config.scheme import QuantScheme
from quant.export.base import NoOptions, check_int_weights
from quant.methods import register
from quant.modules.linear import quant_linears

HALF_DTYPES = (torch.float16, torch.bfloat16)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, shared tensors once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def to_half(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Freeze every quantized linear and cast the model's float parts to `dtype` (in place)."""
    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype={dtype} is not a half type; accepted: {HALF_DTYPES}")
    before = tensor_bytes(model)
    for _, ql in quant_linears(model):
        ql.freeze()
    # non-persistent buffers (RoPE's inv_freq) are recomputed, not stored: keep them exact
    keep = [(m, n, b) for m in model.modules() for n, b in m._buffers.items()
            if b is not None and n in m._non_persistent_buffers_set]
    model.to(dtype)
    for m, n, b in keep:
        m._buffers[n] = b
    return {"bytes_before": before, "bytes_after": tensor_bytes(model)}


@register("half", kind="export", options=NoOptions)
class HalfExporter:
    """This project's checkpoint format, in half precision (any scheme it can hold)."""

    name = "half"

    def check(self, scheme: QuantScheme, layers: dict) -> None:
        if scheme.weight is not None:
            check_int_weights(scheme, self.name, tuple(range(2, 9)))

    def write(self, model: nn.Module, tokenizer, scheme: QuantScheme, out: Path, dtype: torch.dtype) -> None:
        save_quantized(model, tokenizer, scheme, out, extra={"converted": {"dtype": str(dtype)[6:]}})

    def load_snippets(self, path: str, scheme: QuantScheme) -> dict[str, str]:
        """How runtimes load it (model card): transformers sees a plain half-precision model."""
        return {
            "transformers": ("from transformers import AutoModelForCausalLM\n"
                             f"model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=\"auto\")\n"
                             "# the dequantised weights as a plain model: the fake-quant function, stored "
                             "at 16 bits"),
            "quant-pipeline": ("from quant import load_model\n"
                               f"model, tokenizer = load_model({path!r})  # QuantLinear layers, exact codes"
                               + ("; activation/KV quantizers" if scheme.activation or scheme.kv_cache else "")),
        }
