"""Architecture knowledge as data.

Every algorithm asks an `ArchMapping` where the decoder blocks are, which linears a
block has, and which norm feeds which linears (AWQ's scale folds, QuaRot's rotations,
GPTQ's shared Hessians). A family is one entry in `MAPPINGS`; what differs between
families is said by fields, never by an `if model_type == ...` in a method:

- paths: dotted attribute paths of the model-level parts (`layers`, `embed_tokens`,
  `final_norm`, `lm_head`, `rotary_emb`) and, inside one block, of the seven logical
  projections (q, k, v, o, gate, up, down) and the norms;
- `norm_kind`: `rms` computes x / rms(x) * w; `rms_one_plus` (Gemma) computes
  x / rms(x) * (1 + w), so the stored weight is the scale minus one. A fold reads and
  writes the *scale* through `norm_scale` / `set_norm_scale`, never `.weight` directly;
- `mlp_norm`: the norm that feeds the MLP (Llama's `post_attention_layernorm`, Gemma's
  `pre_feedforward_layernorm`); `output_norms`: norms applied to a sub-block's output
  before the residual add (Gemma's `post_attention_layernorm` and
  `post_feedforward_layernorm`); `qk_norms`: per-head norms of the queries and keys
  (Qwen3, Gemma 3), which sit between q/k_proj and RoPE;
- `fused`: linears that hold several logical projections stacked along their output
  rows (Phi-3's `qkv_proj`, `gate_up_proj`) with each part's row count as a size key
  (`q` = heads x head_dim, `kv` = kv_heads x head_dim, `ffn` = intermediate_size), so a
  method can address the v rows of `qkv_proj` or the up rows of `gate_up_proj`;
- `moe`: a mixture-of-experts MLP (Mixtral, Qwen3-MoE): the router (never quantized),
  the experts module and the per-expert linear names. transformers stores experts as
  3-D tensors; `quant.models.moe.prepare_model` turns them into one `nn.Linear` per
  expert linear (named as the checkpoint names them) so that every method, checkpoint
  and export sees ordinary linears;
- `embed_scale` / `logit_softcap`: what the model does outside its linears (Gemma's
  sqrt(hidden) embedding scale, final logit soft-capping); read by the code that
  re-implements a forward (synthesis' decoder) and by exporters.

`scale_groups` say which module feeds which linears (`ScaleGroup`); MoE blocks use
`expert_groups` instead of the groups inside the MLP, with `{e}` standing for the expert
index. `groups(block, config)` gives a block's concrete groups (experts expanded, fused
rows resolved); `linears(block)` its quantizable linears in execution order.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from quant.config import ConfigError

NormKind = Literal["rms", "rms_one_plus"]
EXPERT = "{e}"  # placeholder of the expert index in a path
SIZE_KEYS = ("q", "kv", "ffn")
_EXPERT_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ScaleGroup:
    """`prev` (a norm or linear inside the block) feeds the linears `nexts`; `inputs_of`
    names the module whose input is the activation entering `nexts`; `parent` is the
    smallest module that contains every one of `nexts` and whose output depends on them
    (attention for q/k/v, the MLP for gate/up, the linear itself otherwise): AWQ's
    scale search measures the error of a candidate scale on that module's output.

    `readers`: other modules that read the same input and are not quantized (an MoE
    router): a fold scales their input columns too, a search never touches them.
    `prev_part`: when `prev` is a fused linear, the logical part whose rows feed `nexts`
    (the v rows of Phi-3's qkv_proj); `prev_rows` is that part's [start, end) row range,
    filled in by `ArchMapping.groups`.

    A per-input-channel scale of `nexts` folds into `prev` only when `prev`'s output
    width equals their input width (`foldable`): v -> o is skipped for grouped-query
    attention (SmolLM2: v_proj writes 192 channels, o_proj reads 576), as in AutoAWQ."""

    prev: str
    nexts: tuple[str, ...]
    inputs_of: str
    parent: str = ""  # "" = the single linear of `nexts`
    readers: tuple[str, ...] = ()
    prev_part: str = ""
    prev_rows: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.parent and len(self.nexts) != 1:
            raise ValueError(f"ScaleGroup({self.prev!r} -> {self.nexts}) needs a parent module")

    @property
    def parent_path(self) -> str:
        return self.parent or self.nexts[0]

    def width(self, block: nn.Module) -> int:
        """The number of channels `prev` writes into `nexts`."""
        if self.prev_rows is not None:
            return self.prev_rows[1] - self.prev_rows[0]
        prev = get_module(block, self.prev)
        return prev.out_features if isinstance(prev, nn.Linear) else prev.weight.numel()

    def foldable(self, block: nn.Module) -> bool:
        """Whether `prev`'s output width matches the input width of every linear in `nexts`."""
        width = self.width(block)
        return all(get_module(block, n).in_features == width for n in self.nexts)

    def expand(self, e: int) -> ScaleGroup:
        def sub(p: str) -> str:
            return p.replace(EXPERT, str(e))

        return dataclasses.replace(self, prev=sub(self.prev), nexts=tuple(map(sub, self.nexts)),
                                   inputs_of=sub(self.inputs_of), parent=sub(self.parent),
                                   readers=tuple(map(sub, self.readers)))


@dataclass(frozen=True)
class Fused:
    """One linear holding several logical projections stacked along its output rows."""

    path: str  # e.g. "self_attn.qkv_proj"
    parts: tuple[str, ...]  # logical projections in row order, e.g. ("q", "k", "v")
    sizes: tuple[str, ...]  # each part's row count as a size key (SIZE_KEYS)

    def __post_init__(self) -> None:
        if len(self.parts) != len(self.sizes) or any(s not in SIZE_KEYS for s in self.sizes):
            raise ValueError(f"Fused({self.path!r}): sizes {self.sizes} must name one of {SIZE_KEYS} per part")


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts MLP: `router` picks `top_k` of `num_experts` experts per token."""

    router: str  # the routing linear inside the block; never quantized
    experts: str  # the experts module inside the block
    expert_linears: tuple[str, str, str]  # (gate, up, down) names inside one expert, as the checkpoint names them
    num_experts: str  # config attribute: number of experts
    top_k: str  # config attribute: experts per token
    intermediate: str  # config attribute: one expert's hidden width

    def linear(self, which: str, e: int | str = EXPERT) -> str:
        """Path (in the block) of expert `e`'s gate, up or down linear."""
        name = self.expert_linears[("gate", "up", "down").index(which)]
        return f"{self.experts}.{e}.{name}"


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
    mlp_norm: str = "post_attention_layernorm"
    output_norms: tuple[str, ...] = ()
    qk_norms: tuple[str, ...] = ()
    norm_kind: NormKind = "rms"
    fused: tuple[Fused, ...] = ()
    moe: MoE | None = None
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden_size) in the forward
    logit_softcap: str = ""  # config attribute of the final logit soft-cap, "" = none
    scale_groups: tuple[ScaleGroup, ...] = field(default=())
    expert_groups: tuple[ScaleGroup, ...] = field(default=())

    @property
    def post_attention_norm(self) -> str:
        """The norm that feeds the MLP (the name Llama gives it); see `mlp_norm`."""
        return self.mlp_norm

    @property
    def block_linears(self) -> tuple[str, ...]:
        """Quantizable linears of a dense decoder block, in execution order (a fused linear
        once). MoE blocks: `linears(block)`."""
        paths = (self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                 self.gate_proj, self.up_proj, self.down_proj)
        return tuple(dict.fromkeys(paths))

    @property
    def attention_linears(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.q_proj, self.k_proj, self.v_proj, self.o_proj)))

    @property
    def no_clip(self) -> tuple[str, ...]:
        """Linears whose weight-range clipping AWQ leaves alone: query and key (their errors
        pass through the attention softmax; AutoAWQ skips them the same way). A fused qkv
        linear is clipped (its v rows dominate nothing; AutoAWQ clips Phi-3's qkv_proj)."""
        fused = {f.path for f in self.fused}
        return tuple(p for p in (self.q_proj, self.k_proj) if p not in fused)

    # -- MoE -------------------------------------------------------------------

    def is_moe_block(self, block: nn.Module) -> bool:
        """Whether this block's MLP is a mixture of experts (Qwen3-MoE may mix in dense MLPs)."""
        if self.moe is None:
            return False
        try:
            block.get_submodule(self.moe.experts)
        except AttributeError:
            return False
        return True

    def num_experts(self, block: nn.Module) -> int:
        experts = get_module(block, self.moe.experts)
        if not isinstance(experts, nn.ModuleList):  # quant.models.moe.Experts is one
            raise ConfigError(
                f"{self.family}: {self.moe.experts} is transformers' fused {type(experts).__name__}; "
                "call quant.models.moe.prepare_model(model) first (the loaders and the calibrate "
                "runner do), which gives every expert its own linears")
        return len(experts)

    # -- per block ---------------------------------------------------------------

    def linears(self, block: nn.Module) -> tuple[str, ...]:
        """Quantizable linears of this block in execution order (experts expanded; the
        router is not one of them)."""
        if not self.is_moe_block(block):
            return self.block_linears
        per_expert = [self.moe.linear(w, e) for e in range(self.num_experts(block))
                      for w in ("gate", "up", "down")]
        return (*self.attention_linears, *per_expert)

    def groups(self, block: nn.Module, config: Any) -> list[ScaleGroup]:
        """This block's scale groups: templates expanded over the experts, fused rows resolved."""
        groups = list(self.scale_groups)
        if self.is_moe_block(block):
            inside = f"{self.mlp}."
            groups = [g for g in groups if not g.nexts[0].startswith(inside)]
            n = self.num_experts(block)
            for g in self.expert_groups:
                if EXPERT in g.prev:  # one group per expert
                    groups += [g.expand(e) for e in range(n)]
                else:  # one group over every expert's linears
                    nexts = tuple(p.replace(EXPERT, str(e)) for p in g.nexts for e in range(n) if EXPERT in p)
                    nexts = tuple(sorted(nexts, key=_expert_order))
                    groups.append(dataclasses.replace(g, nexts=nexts))
        return [self._resolve_rows(g, config) for g in groups]

    def _resolve_rows(self, g: ScaleGroup, config: Any) -> ScaleGroup:
        if not g.prev_part:
            return g
        path, rows = self.part(config, g.prev_part)
        return dataclasses.replace(g, prev_rows=rows) if path == g.prev and rows is not None else g

    def norm_readers(self, block: nn.Module, config: Any) -> dict[str, tuple[str, ...]]:
        """{norm path: every module that reads its output} for the block's input and MLP norms
        (the MoE router included)."""
        norms = (self.input_norm, self.mlp_norm)
        return {g.prev: (*g.readers, *g.nexts) for g in self.groups(block, config) if g.prev in norms}

    def residual_writers(self, block: nn.Module) -> tuple[str, ...]:
        """The linears whose output is added to the residual stream (o_proj, the down projections)."""
        if not self.is_moe_block(block):
            return (self.o_proj, self.down_proj)
        return (self.o_proj, *(self.moe.linear("down", e) for e in range(self.num_experts(block))))

    def mlp_width(self, block: nn.Module, config: Any) -> int:
        """The input width of this block's down projection(s)."""
        if self.is_moe_block(block):
            return getattr(config, self.moe.intermediate)
        return config.intermediate_size

    def input_stages(self, block: nn.Module, config: Any) -> list[list[tuple[str, ...]]]:
        """The block's linears grouped by the input they read, in execution order: one stage per
        scale group (template), holding one group per expert in MoE blocks (an expert reads only
        the tokens routed to it). GPTQ runs the block once per stage, one Hessian per group."""
        if not self.is_moe_block(block):
            return [[g.nexts] for g in self.groups(block, config)]
        inside = f"{self.mlp}."
        stages = [[g.nexts] for g in self.scale_groups if not g.nexts[0].startswith(inside)]
        n = self.num_experts(block)
        for g in self.expert_groups:
            stages.append([tuple(p.replace(EXPERT, str(e)) for p in g.nexts if EXPERT in p) for e in range(n)])
        return stages

    def part(self, config: Any, name: str) -> tuple[str, tuple[int, int] | None]:
        """(path, [start, end) rows or None) of logical projection `name` (q, k, v, gate, up)."""
        path = getattr(self, f"{name}_proj")
        for f in self.fused:
            if f.path == path:
                start = 0
                for part, size in zip(f.parts, f.sizes, strict=True):
                    rows = size_of(config, size)
                    if part == name:
                        return path, (start, start + rows)
                    start += rows
        return path, None


def _expert_order(path: str) -> tuple[int, str]:
    m = _EXPERT_INDEX.search(path)
    return (int(m.group(1)) if m else -1, path)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def size_of(config: Any, key: str) -> int:
    """Row count of a fused part (`Fused.sizes`) for this config."""
    if key == "q":
        return config.num_attention_heads * head_dim(config)
    if key == "kv":
        return (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim(config)
    return config.intermediate_size


def _default_groups(m: ArchMapping) -> tuple[tuple[ScaleGroup, ...], tuple[ScaleGroup, ...]]:
    """The scale groups of a block of attention plus a gated MLP (dense and MoE)."""
    qkv = tuple(dict.fromkeys((m.q_proj, m.k_proj, m.v_proj)))
    gate_up = tuple(dict.fromkeys((m.gate_proj, m.up_proj)))
    dense = (
        ScaleGroup(m.input_norm, qkv, qkv[0], m.attention),
        ScaleGroup(m.v_proj, (m.o_proj,), m.o_proj, prev_part="v"),
        ScaleGroup(m.mlp_norm, gate_up, gate_up[0], m.mlp),
        ScaleGroup(m.up_proj, (m.down_proj,), m.down_proj, prev_part="up"),
    )
    if m.moe is None:
        return dense, ()
    e = m.moe
    experts = (
        # the norm feeds the router and every expert; the scale is shared by all of them
        ScaleGroup(m.mlp_norm, (e.linear("gate"), e.linear("up")), m.mlp, m.mlp, readers=(e.router,)),
        ScaleGroup(e.linear("up"), (e.linear("down"),), e.linear("down")),
    )
    return dense, experts


def family(name: str, model_types: tuple[str, ...], **fields: Any) -> ArchMapping:
    """A mapping with the default paths overridden by `fields` and its scale groups derived."""
    base = ArchMapping(family=name, model_types=model_types, **fields)
    dense, experts = _default_groups(base)
    return dataclasses.replace(base, scale_groups=base.scale_groups or dense,
                               expert_groups=base.expert_groups or experts)


_GEMMA = dict(mlp_norm="pre_feedforward_layernorm",
              output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
              norm_kind="rms_one_plus", embed_scale=True, logit_softcap="final_logit_softcapping")
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")

MAPPINGS: tuple[ArchMapping, ...] = (
    # SmolLM / SmolLM2, Llama-2, Llama-3.x (GQA, llama3 RoPE scaling, tied embeddings), TinyLlama
    family("llama", ("llama",)),
    family("mistral", ("mistral",)),
    # Qwen2 / Qwen2.5: q/k/v biases (they move with their rows; nothing to map)
    family("qwen2", ("qwen2",)),
    family("qwen3", ("qwen3",), qk_norms=_QK_NORMS),
    family("gemma2", ("gemma2",), **_GEMMA),
    family("gemma3", ("gemma3_text",), qk_norms=_QK_NORMS, **_GEMMA),
    # Phi-3 / Phi-3.5 / Phi-4: q/k/v in one linear, gate/up in one linear
    family("phi3", ("phi3",), q_proj="self_attn.qkv_proj", k_proj="self_attn.qkv_proj",
           v_proj="self_attn.qkv_proj", gate_proj="mlp.gate_up_proj", up_proj="mlp.gate_up_proj",
           fused=(Fused("self_attn.qkv_proj", ("q", "k", "v"), ("q", "kv", "kv")),
                  Fused("mlp.gate_up_proj", ("gate", "up"), ("ffn", "ffn")))),
    family("mixtral", ("mixtral",),
           moe=MoE("mlp.gate", "mlp.experts", ("w1", "w3", "w2"), "num_local_experts",
                   "num_experts_per_tok", "intermediate_size")),
    family("qwen3_moe", ("qwen3_moe",), qk_norms=_QK_NORMS,
           moe=MoE("mlp.gate", "mlp.experts", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                   "num_experts_per_tok", "moe_intermediate_size")),
)


def supported_model_types() -> list[str]:
    return sorted(t for m in MAPPINGS for t in m.model_types)


def mapping_for_type(model_type: Any, where: str = "model") -> ArchMapping:
    """The mapping of a `config.model_type`; a ConfigError naming it and the supported list."""
    for m in MAPPINGS:
        if model_type in m.model_types:
            return m
    raise ConfigError(
        f"{where}: model_type={model_type!r} has no architecture mapping; known: "
        f"{supported_model_types()}. Add an ArchMapping to quant/models/arch.py:MAPPINGS for a new "
        "family (docs/extending.md, 'A new model family')."
    )


def mapping_for(model: nn.Module) -> ArchMapping:
    """The mapping for a transformers model, by `config.model_type`."""
    return mapping_for_type(getattr(getattr(model, "config", None), "model_type", None))


def norm_scale(norm: nn.Module, kind: NormKind):
    """The per-channel scale a norm multiplies by (w, or 1 + w for `rms_one_plus`), fp32."""
    w = norm.weight.detach().float()
    return w + 1.0 if kind == "rms_one_plus" else w


def set_norm_scale(norm: nn.Module, scale, kind: NormKind) -> None:
    """Make `norm` multiply by `scale` (stored as scale - 1 for `rms_one_plus`)."""
    value = scale - 1.0 if kind == "rms_one_plus" else scale
    norm.weight.data.copy_(value.to(norm.weight.dtype))


def untie_lm_head(model: nn.Module) -> bool:
    """Give the lm_head its own weight when it shares the input embedding's (Llama 3.2 1B/3B,
    Gemma, SmolLM2), and say so in the config; returns whether they were tied."""
    m = mapping_for(model)
    embed, head = get_module(model, m.embed_tokens), get_module(model, m.lm_head)
    tied = head.weight is embed.weight or bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
        model.config.tie_word_embeddings = False
        text = getattr(model.config, "get_text_config", lambda: None)()
        if text is not None and text is not model.config:
            text.tie_word_embeddings = False
    return tied


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
        for path in mapping.linears(block):
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
