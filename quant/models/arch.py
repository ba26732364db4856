"""Architecture knowledge as data.

Every algorithm asks an `ArchMapping` where the decoder blocks are, which
linears a block has, and which norm feeds which linears (needed by AWQ /
SmoothQuant-style scaling and QuaRot rotations). A new Llama-like family is a
new entry in `MAPPINGS`, not new code. Paths are dotted attribute paths
relative to the model (for model-level parts) or to one decoder block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ScaleGroup:
    """`prev` (a norm or linear inside the block) feeds the linears `nexts`; `inputs_of`
    names the module whose input is the activation entering `nexts`; `parent` is the
    smallest module that contains every one of `nexts` and whose output depends on them
    (attention for q/k/v, the MLP for gate/up, the linear itself otherwise): AWQ's
    scale search measures the error of a candidate scale on that module's output.

    A per-input-channel scale of `nexts` folds into `prev` only when `prev`'s output
    width equals their input width (`foldable`): v -> o is skipped for grouped-query
    attention (SmolLM2: v_proj writes 192 channels, o_proj reads 576), as in AutoAWQ."""

    prev: str
    nexts: tuple[str, ...]
    inputs_of: str
    parent: str = ""  # "" = the single linear of `nexts`

    def __post_init__(self) -> None:
        if not self.parent and len(self.nexts) != 1:
            raise ValueError(f"ScaleGroup({self.prev!r} -> {self.nexts}) needs a parent module")

    @property
    def parent_path(self) -> str:
        return self.parent or self.nexts[0]

    def foldable(self, block: nn.Module) -> bool:
        """Whether `prev`'s output width matches the input width of every linear in `nexts`."""
        prev = get_module(block, self.prev)
        width = prev.out_features if isinstance(prev, nn.Linear) else prev.weight.numel()
        return all(get_module(block, n).in_features == width for n in self.nexts)


@dataclass(frozen=True)
class ArchMapping:
    family: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary_emb: str = "model.rotary_emb"
    attention: str = "self_attn"
    mlp: str = "mlp"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    scale_groups: tuple[ScaleGroup, ...] = field(default=())

    @property
    def block_linears(self) -> tuple[str, ...]:
        """Quantizable linears of one decoder block, in execution order."""
        return (
            self.q_proj, self.k_proj, self.v_proj, self.o_proj,
            self.gate_proj, self.up_proj, self.down_proj,
        )

    @property
    def no_clip(self) -> tuple[str, ...]:
        """Linears whose weight-range clipping AWQ leaves alone: query and key (their errors
        pass through the attention softmax; AutoAWQ skips them the same way)."""
        return (self.q_proj, self.k_proj)


def _llama_like(family: str, model_types: tuple[str, ...]) -> ArchMapping:
    base = ArchMapping(family=family, model_types=model_types)
    groups = (
        ScaleGroup(base.input_norm, (base.q_proj, base.k_proj, base.v_proj), base.q_proj,
                   base.attention),
        ScaleGroup(base.v_proj, (base.o_proj,), base.o_proj),
        ScaleGroup(base.post_attention_norm, (base.gate_proj, base.up_proj), base.gate_proj,
                   base.mlp),
        ScaleGroup(base.up_proj, (base.down_proj,), base.down_proj),
    )
    return ArchMapping(family=family, model_types=model_types, scale_groups=groups)


MAPPINGS: tuple[ArchMapping, ...] = (
    # SmolLM / SmolLM2, Llama-2, Llama-3.x, TinyLlama: `llama`
    _llama_like("llama", ("llama",)),
    _llama_like("mistral", ("mistral",)),
    # Qwen2 is Llama-shaped with q/k/v biases; the mapping is the same.
    _llama_like("qwen2", ("qwen2",)),
)


def mapping_for(model: nn.Module) -> ArchMapping:
    """The mapping for a transformers model, by `config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for m in MAPPINGS:
        if model_type in m.model_types:
            return m
    known = sorted(t for m in MAPPINGS for t in m.model_types)
    raise ValueError(
        f"model_type={model_type!r} has no architecture mapping; known: {known}. "
        "Add an ArchMapping to quant/models/arch.py:MAPPINGS for a new Llama-like family."
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def decoder_layers(model: nn.Module, mapping: ArchMapping | None = None) -> nn.ModuleList:
    mapping = mapping or mapping_for(model)
    return get_module(model, mapping.layers)  # type: ignore[return-value]


def iter_block_linears(model: nn.Module, mapping: ArchMapping | None = None):
    """Yield (qualified name, block index, path in block, module) for every decoder linear."""
    mapping = mapping or mapping_for(model)
    for i, block in enumerate(decoder_layers(model, mapping)):
        for path in mapping.block_linears:
            yield f"{mapping.layers}.{i}.{path}", i, path, get_module(block, path)


def target_linears(model: nn.Module, lm_head: bool) -> list[tuple[str, nn.Module]]:
    """(name, module) of every decoder linear, plus the lm_head when `lm_head` is true: the
    layers a scheme quantizes (weights) and whose inputs it quantizes (activations)."""
    mapping = mapping_for(model)
    out = [(name, mod) for name, _, _, mod in iter_block_linears(model, mapping)]
    if lm_head:
        out.append((mapping.lm_head, get_module(model, mapping.lm_head)))
    return out


def quantizable_linears(model: nn.Module, scheme) -> list[tuple[str, nn.Linear]]:
    """Every decoder linear (plus lm_head if the scheme says so), checked against the scheme
    (`quant.config.scheme.QuantScheme`) before any work starts."""
    out = target_linears(model, scheme.quantize_lm_head)
    if scheme.weight is not None:
        for name, mod in out:
            scheme.weight.check_layer(name, mod.in_features)
    return out
