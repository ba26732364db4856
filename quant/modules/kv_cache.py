"""KV-cache quantization (LLM-QAT): keys and values quantized where they are produced.

A forward hook on each block's `k_proj` and `v_proj` (found through the
architecture mapping) fake-quantizes the projection's output, per token (one
range over all KV heads of a token, the LLM-QAT reference) or per head (one
range per `head_dim` slice of a token, `granularity: per_head`), with the
range taken from the token itself at every call. Because it acts on the
projection output, the same quantized tensors flow into training, perplexity
evaluation and `generate`: the attention computes `past_key_values.update(k, v)`
from them, so every entry a generation-time KV cache holds is a quantized one
(tests/quant/modules/test_kv_quant.py checks the cache contents token by token).

Keys are quantized BEFORE RoPE, as the LLM-QAT reference does (it quantizes
`k_proj`'s output, then rotates). Consequences:
- values in the cache lie exactly on their per-token grid;
- keys in the cache are `RoPE(dequant(q_k))`: a rotation of grid values. A
  runtime that stores the integer pre-RoPE keys and rotates them when it reads
  the cache computes exactly the same attention; one that stores integer
  *post*-RoPE keys (KIVI/KVQuant style) would round a different tensor.
Post-RoPE key quantization is not implemented: in transformers' Llama
attention RoPE and the cache update sit inside one forward with no module
boundary between them, so it would need a patched attention forward (one per
family) instead of a hook found through the mapping.

With QuaRot's online rotation of queries and keys installed
(`quant.modules.rotation.QKRotation` on the attention module), the key
quantizer sits on that rotation instead: post-RoPE, after the Hadamard, so
keys are quantized in the rotated basis (see quant/modules/rotation.py).

Hooks and quantizer modules hold no state: `state_dict` is unchanged, and
`quant.modules.runtime.apply_runtime_quantizers` re-installs them from the scheme
whenever a quantized model is loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.config import ConfigError
from quant.config.scheme import KVCacheSpec
from quant.models.arch import decoder_layers, get_module, mapping_for
from quant.modules.activation import DynamicQuantizer


def _quantize_output_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    quantizer = getattr(module, "output_quantizer", None)
    if quantizer is None:
        return None
    return quantizer(output)  # output: [B, S, n_kv_heads * head_dim]


def set_output_quantizer(module: nn.Module, quantizer: nn.Module | None) -> None:
    """Install (or with None remove) `quantizer` on a module's output; idempotent."""
    module.output_quantizer = quantizer
    if quantizer is not None and _quantize_output_hook not in module._forward_hooks.values():
        module.register_forward_hook(_quantize_output_hook)


def kv_head_dim(model: nn.Module) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def check_kv_cache(model: nn.Module, spec: KVCacheSpec | None) -> None:
    """Refuse, before any work, KV-cache quantization of a family whose keys and values come
    out of a fused qkv_proj (Phi-3): the quantizer would have to act on slices of its output,
    which is not implemented."""
    mapping = mapping_for(model)
    fused = {f.path for f in mapping.fused}
    if spec is not None and (mapping.k_proj in fused or mapping.v_proj in fused):
        raise ConfigError(f"scheme.kv_cache={spec.to_dict()}: model_type={model.config.model_type!r} "
                          f"computes keys and values in the fused {mapping.k_proj}; quantizing their "
                          "slices of its output is not implemented; use scheme.kv_cache: null")


def kv_projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every block's key and value projection."""
    mapping = mapping_for(model)
    out = []
    for i, block in enumerate(decoder_layers(model, mapping)):
        for path in (mapping.k_proj, mapping.v_proj):
            out.append((f"{mapping.layers}.{i}.{path}", get_module(block, path)))
    return out


def apply_kv_quantizers(model: nn.Module, spec: KVCacheSpec | None) -> int:
    """Quantize every block's keys and values as they are produced (None removes it).
    Returns the number of projections changed."""
    check_kv_cache(model, spec)
    head_dim = kv_head_dim(model)
    projections = kv_projections(model)
    mapping = mapping_for(model)
    rotations = [getattr(get_module(b, mapping.attention), "qk_rotation", None)
                 for b in decoder_layers(model, mapping)]
    for i, (name, proj) in enumerate(projections):
        if spec is not None and spec.granularity == "per_head" and proj.out_features % head_dim:
            raise ValueError(f"{name}: out_features={proj.out_features} is not a multiple of head_dim={head_dim}")
        quantizer = None if spec is None else DynamicQuantizer.for_kv(spec, head_dim)
        rotation = rotations[i // 2]
        if i % 2 == 0 and rotation is not None:  # key, rotated after RoPE: quantize there
            rotation.key_quantizer = quantizer
            quantizer = None
        set_output_quantizer(proj, quantizer)
    return len(projections)
