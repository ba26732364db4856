"""Mixture-of-experts blocks as the pipeline sees them: one `nn.Linear` per expert linear.

transformers (5.x) keeps a block's experts as two 3-D parameters (`gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]) and converts the checkpoint's per-expert tensors
into them when loading (and back when saving). Every method here works on linears
(QuantLinear replaces an nn.Linear, GPTQ hooks a linear's input, exporters pack a
linear by name), so `prepare_model` replaces each fused experts module by `Experts`,
a ModuleList of `ExpertMLP`s whose linears carry the checkpoint's own names
(`experts.3.w1` for Mixtral, `experts.3.gate_proj` for Qwen3-MoE): the quantized
names are the names vLLM and the checkpoint use. `fused_experts(model)` puts
transformers' modules back for `save_pretrained` (so the dequantized checkpoint is
an ordinary transformers checkpoint), and the loaders call `prepare_model` again.

Routing is the model's own: the router module is untouched (and never quantized), the
experts module receives (hidden_states, top_k_index, top_k_weights) and computes what
transformers' eager loop computes, expert by expert over the tokens routed to it.

Calibration statistics: a method sees an expert through the inputs of its linears,
so an expert sees only its routed tokens. An expert that receives few tokens (or none)
would get a degenerate Hessian / activation statistic. `count_routed` counts the routed
tokens of each expert; experts below a method's `expert_min_tokens` are put in
`all_tokens`, and then run on *every* token of the block while statistics are
collected (their output still only enters the block output for routed tokens, so the
block computes the same function). This is llm-compressor's "calibrate all experts",
applied to the experts that need it: well-routed experts keep the statistics of the
tokens they really serve, starved ones get the whole block's distribution instead of
nothing. An expert no calibration token reaches is therefore calibrated like the
others (on all tokens) and is reported in the method's metrics
(`experts_all_token_calibrated`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from quant.config import ConfigError
from quant.models.arch import MoE, decoder_layers, get_module, mapping_for, set_module


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its linears named as the checkpoint names them."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inner: int, act: nn.Module,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.add_module(gate, nn.Linear(hidden, inner, **kw))
        self.add_module(up, nn.Linear(hidden, inner, **kw))
        self.add_module(down, nn.Linear(inner, hidden, **kw))
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """The experts of one MoE block, one `ExpertMLP` each; called as transformers' experts
    module is: (hidden_states [T, D], top_k_index [T, k], top_k_weights [T, k]) -> [T, D].

    `routed` (set by `count_routed`) accumulates the routed tokens per expert; experts in
    `all_tokens` run on every token (module docstring)."""

    def __init__(self, experts: list[ExpertMLP], fused_class: type, config) -> None:
        super().__init__(experts)
        self.fused_class, self.fused_config = fused_class, config
        self.routed: torch.Tensor | None = None
        self.all_tokens: frozenset[int] = frozenset()

    @torch.compiler.disable  # token counts per expert change every batch: the rest of the block compiles
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, len(self)).permute(2, 1, 0)  # [E, k, T]
            counts = mask.sum(dim=(1, 2))
            if self.routed is not None:
                self.routed += counts.to(self.routed.device)
            hit = set((counts > 0).nonzero().flatten().tolist()) | set(self.all_tokens)
        for e in sorted(hit):
            pos, tok = torch.where(mask[e])
            # an all-token expert gives statistics of every token, the output of the routed ones
            y = self[e](hidden_states)[tok] if e in self.all_tokens else self[e](hidden_states[tok])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def _check_layout(fused: nn.Module, where: str) -> None:
    gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        raise ConfigError(f"{where}: {type(fused).__name__} does not hold 3-D gate_up_proj / down_proj "
                          "expert tensors; this transformers version's MoE layout is not supported")
    for attr, ok in (("is_transposed", False), ("has_bias", False), ("is_concatenated", True),
                     ("has_gate", True)):
        if getattr(fused, attr, ok) != ok:
            raise ConfigError(f"{where}: {type(fused).__name__} has {attr}={not ok}; only "
                              "concatenated [gate; up] expert tensors without bias are supported")


@torch.no_grad()
def unfuse(fused: nn.Module, spec: MoE, where: str = "experts") -> Experts:
    """Per-expert linears holding the slices of transformers' 3-D expert tensors."""
    _check_layout(fused, where)
    gate_up, down = fused.gate_up_proj, fused.down_proj  # [E, 2I, H], [E, H, I]
    n, inner, hidden = gate_up.shape[0], down.shape[2], down.shape[1]
    experts = []
    for e in range(n):
        mlp = ExpertMLP(spec.expert_linears, hidden, inner, fused.act_fn, gate_up.device, gate_up.dtype)
        g, u, d = (getattr(mlp, name) for name in spec.expert_linears)
        g.weight.copy_(gate_up[e, :inner])
        u.weight.copy_(gate_up[e, inner:])
        d.weight.copy_(down[e])
        experts.append(mlp)
    return Experts(experts, type(fused), getattr(fused, "config", None))


@torch.no_grad()
def fuse(experts: Experts) -> nn.Module:
    """transformers' experts module holding the current weights of `experts` (plain linears)."""
    first = experts[0]
    g0 = getattr(first, first.names[0]).weight
    fused = experts.fused_class(experts.fused_config).to(g0.device, g0.dtype)
    for e, mlp in enumerate(experts):
        g, u, d = (getattr(mlp, name) for name in mlp.names)
        for lin in (g, u, d):
            if type(lin) is not nn.Linear:
                raise RuntimeError(f"expert {e}: {type(lin).__name__} cannot be fused back; swap in "
                                   "plain linears first (quant.checkpoint.save_quantized does)")
        fused.gate_up_proj[e].copy_(torch.cat([g.weight, u.weight]))
        fused.down_proj[e].copy_(d.weight)
    return fused


def moe_blocks(model: nn.Module) -> Iterator[tuple[int, nn.Module, str]]:
    """(index, block, experts path) of every MoE block of `model`."""
    mapping = mapping_for(model)
    for i, block in enumerate(decoder_layers(model, mapping)):
        if mapping.is_moe_block(block):
            yield i, block, mapping.moe.experts


def prepare_model(model: nn.Module) -> int:
    """Give every MoE block per-expert linears (idempotent); returns the blocks changed.
    Raises ConfigError for a model_type without a mapping."""
    mapping = mapping_for(model)
    changed = 0
    for i, block, path in moe_blocks(model):
        experts = get_module(block, path)
        if not isinstance(experts, Experts):
            set_module(block, path, unfuse(experts, mapping.moe, f"{mapping.layers}.{i}.{path}"))
            changed += 1
    return changed


@contextmanager
def fused_experts(model: nn.Module):
    """Inside: transformers' own experts modules (for save_pretrained); restored afterwards."""
    swapped = []
    for _, block, path in moe_blocks(model):
        experts = get_module(block, path)
        if isinstance(experts, Experts):
            set_module(block, path, fuse(experts))
            swapped.append((block, path, experts))
    try:
        yield model
    finally:
        for block, path, experts in swapped:
            set_module(block, path, experts)


@contextmanager
def count_routed(block: nn.Module, path: str):
    """Inside: block's experts count their routed tokens into `experts.routed` ([E], int64)."""
    experts = get_module(block, path)
    experts.routed = torch.zeros(len(experts), dtype=torch.long)
    yield experts  # `routed` stays readable afterwards; the next count resets it


@contextmanager
def calibrate_all_tokens(block: nn.Module, path: str, experts_ids):
    """Inside: the experts `experts_ids` of block's MoE run on every token (module docstring)."""
    experts = get_module(block, path)
    experts.all_tokens = frozenset(int(e) for e in experts_ids)
    try:
        yield experts
    finally:
        experts.all_tokens = frozenset()


@torch.no_grad()
def starved_experts(block: nn.Module, path: str, run, min_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Run `run()` (a forward of the block over the calibration inputs) counting routed tokens;
    returns (experts with fewer than `min_tokens` tokens, tokens per expert)."""
    with count_routed(block, path) as experts:
        run()
        counts = experts.routed.clone()
    experts.routed = None
    return [e for e, c in enumerate(counts.tolist()) if c < min_tokens], counts
