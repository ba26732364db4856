"""Online Hadamard rotations (QuaRot) as modules of the model.

Offline rotations are fused into weights and need nothing at run time. The
online ones rotate an activation that no weight can absorb on its own side,
and the rotation's transpose is fused into the weight that consumes it:

- `input_rotation` of a linear (down_proj: size = intermediate; o_proj: size
  = n_heads * head_dim): `HadamardRotation` applied to the linear's input by a
  forward pre-hook registered *first*, so it runs before any activation
  quantizer (a QuantLinear applies its `input_quantizer` inside forward, a
  plain linear in a later pre-hook);
- `qk_rotation` of an attention module: `QKRotation`, a per-head Hadamard of
  the queries and keys *after* RoPE, with the key quantizer of the KV cache
  after it (`key_quantizer`, set by `quant.modules.kv_cache`), so keys are
  quantized in the rotated basis. Scores are unchanged: (q H)(k H)^T = q k^T.

Where the keys are reached: transformers' Llama-family attention applies RoPE
and updates the cache inside one forward, then calls the attention function
named by `config._attn_implementation`. `install_qk_rotation` registers
`quarot_<impl>` (same mask function as `<impl>`) whose function applies the
module's `qk_rotation` to the post-RoPE query and key and then calls `<impl>`,
and points the config at it. The cache therefore holds post-RoPE keys before
rotation; the rotation and the per-token key quantizer are applied to every
cached key when it is read. Both are token-local and deterministic, so the
attention sees exactly the keys a cache of rotated, quantized keys would give
(the cost is re-quantizing the cache per step, not a different function).

The modules hold no persistent state (the Hadamard base matrix is a
non-persistent buffer rebuilt from the size), so `state_dict` and the saved
checkpoint are those of the plain model; `rotation_config(model)` describes
what is installed and `install_rotations(model, config)` puts it back, which
`quant.checkpoint` does on save/load.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from quant.models.arch import decoder_layers, get_module, mapping_for
from quant.numerics import hadamard as had

_PREFIX = "quarot_"


class HadamardRotation(nn.Module):
    """x -> x @ (H_n / sqrt(n)) on each consecutive block of n features of the last dim."""

    def __init__(self, size: int, fp32: bool = True) -> None:
        super().__init__()
        k, _ = had.factor(size)
        self.size = size
        self.fp32 = fp32
        self.register_buffer("base", had.base_matrix(k, torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., F], F a multiple of size
        dtype = torch.float32 if self.fp32 else x.dtype
        y = x.to(dtype).reshape(*x.shape[:-1], -1, self.size)
        y = had.hadamard_transform(y, self.size, self.base.to(dtype))
        return y.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, fp32={self.fp32}"


class QKRotation(nn.Module):
    """Per-head Hadamard of post-RoPE queries and keys; then the key quantizer, if any."""

    def __init__(self, head_dim: int, fp32: bool = True) -> None:
        super().__init__()
        self.rotation = HadamardRotation(head_dim, fp32)
        self.key_quantizer: nn.Module | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # query: [B, H, S, D], key: [B, KVH, S, D]
        query, key = self.rotation(query), self.rotation(key)
        if self.key_quantizer is not None:  # KV quantizers see [B, S, KVH * D]
            b, h, s, d = key.shape
            flat = key.transpose(1, 2).reshape(b, s, h * d)
            key = self.key_quantizer(flat).reshape(b, s, h, d).transpose(1, 2)
        return query, key


# ---------------------------------------------------------------------------
# Linear inputs


def _rotate_input_hook(module: nn.Module, args: tuple) -> tuple | None:
    rotation = getattr(module, "input_rotation", None)
    if rotation is None:
        return None
    return (rotation(args[0]), *args[1:])


def set_input_rotation(linear: nn.Module, rotation: nn.Module | None) -> None:
    """Install (or with None remove) an online rotation of a linear's input; idempotent.
    The hook is prepended: the rotation runs before any activation quantizer."""
    linear.input_rotation = rotation
    if rotation is not None and _rotate_input_hook not in linear._forward_pre_hooks.values():
        linear.register_forward_pre_hook(_rotate_input_hook, prepend=True)


def move_input_rotation(old: nn.Module, new: nn.Module) -> None:
    """Carry an online input rotation over when a linear is replaced (e.g. by a QuantLinear)."""
    set_input_rotation(new, getattr(old, "input_rotation", None))


# ---------------------------------------------------------------------------
# Queries and keys after RoPE


def _rotated_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    rotation = getattr(module, "qk_rotation", None)
    if rotation is not None:
        query, key = rotation(query, key)
    base = module.config._attn_implementation.removeprefix(_PREFIX)
    from transformers import AttentionInterface

    default = inspect.getmodule(type(module)).eager_attention_forward
    fn = AttentionInterface().get_interface(base, default)
    return fn(module, query, key, value, attention_mask, **kwargs)


def _register_attention(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _rotated_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def install_qk_rotation(model: nn.Module, head_dim: int | None, fp32: bool = True) -> None:
    """Give every attention module a `QKRotation` (None removes them) and route the
    attention through the function that applies it. A key quantizer already on k_proj's
    output (pre-RoPE) moves to the rotation (post-RoPE, rotated)."""
    from quant.modules.kv_cache import set_output_quantizer

    mapping = mapping_for(model)
    current = model.config._attn_implementation
    base = current.removeprefix(_PREFIX)
    for block in decoder_layers(model, mapping):
        attn = get_module(block, mapping.attention)
        old = getattr(attn, "qk_rotation", None)
        k_proj = get_module(block, mapping.k_proj)
        if head_dim is None:
            attn.qk_rotation = None
            if old is not None and old.key_quantizer is not None:
                set_output_quantizer(k_proj, old.key_quantizer)
            continue
        rot = QKRotation(head_dim, fp32).to(next(attn.parameters()).device)
        rot.key_quantizer = old.key_quantizer if old is not None else None
        if getattr(k_proj, "output_quantizer", None) is not None:
            rot.key_quantizer = k_proj.output_quantizer
            set_output_quantizer(k_proj, None)
        attn.qk_rotation = rot
    model.config._attn_implementation = base if head_dim is None else _register_attention(base)


def drop_key_quantizers(module: nn.Module) -> None:
    """Keep the q/k rotations of `module` but remove their key quantizers (a full-precision
    copy, e.g. Block-AP's target block)."""
    for m in module.modules():
        if isinstance(m, QKRotation):
            m.key_quantizer = None


# ---------------------------------------------------------------------------
# Whole-model description, for checkpoints


def rotation_config(model: nn.Module) -> dict[str, Any] | None:
    """What online rotations the model carries: {"linears": {name: size}, "qk": head_dim,
    "fp32": bool}, or None when there are none."""
    linears, fp32, qk = {}, True, None
    for name, mod in model.named_modules():
        rot = getattr(mod, "input_rotation", None)
        if isinstance(rot, HadamardRotation):
            linears[name] = rot.size
            fp32 = rot.fp32
        if isinstance(getattr(mod, "qk_rotation", None), QKRotation):
            qk = mod.qk_rotation.rotation.size
            fp32 = mod.qk_rotation.rotation.fp32
    if not linears and qk is None:
        return None
    return {"linears": dict(sorted(linears.items())), "qk": qk, "fp32": fp32}


@torch.no_grad()
def fold_input_rotations(model: nn.Module) -> int:
    """Remove every online input rotation, folding it into its linear: W <- W R^T, so the
    model computes the same function as a plain transformers model (no hooks). Only valid
    where no activation quantizer sits between rotation and linear (a plain export: the
    weights leave the integer grid). The q/k rotation is dropped: without a key quantizer
    it does not change the scores. Returns the number of linears folded."""
    n = 0
    for mod in list(model.modules()):
        rot = getattr(mod, "input_rotation", None)
        if isinstance(rot, HadamardRotation):
            w = mod.weight
            folded = had.hadamard_transform(w.data.float(), rot.size, transpose=True)
            w.data = folded.to(w.dtype)
            set_input_rotation(mod, None)
            n += 1
    if getattr(model.config, "_attn_implementation", "").startswith(_PREFIX):
        install_qk_rotation(model, None)
    return n


def install_rotations(model: nn.Module, config: dict[str, Any] | None) -> int:
    """Install the online rotations `rotation_config` described; returns how many modules."""
    if not config:
        return 0
    fp32 = bool(config.get("fp32", True))
    device = next(model.parameters()).device
    for name, size in config["linears"].items():
        set_input_rotation(get_module(model, name), HadamardRotation(int(size), fp32).to(device))
    if config.get("qk") is not None:
        install_qk_rotation(model, int(config["qk"]), fp32)
    return len(config["linears"]) + (len(decoder_layers(model)) if config.get("qk") else 0)
