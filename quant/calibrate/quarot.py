"""QuaRot (Ashkboos et al., 2024): rotate with Hadamard matrices, then round to nearest.

Steps, each leaving the full-precision function unchanged:

1. Untie the input embedding and lm_head (SmolLM2 ties them) so each can be
   changed on its own side (before step 2, which scales lm_head).
2. Fuse every RMSNorm's scale into the linears it feeds (input norm -> q/k/v,
   post-attention norm -> gate/up, final norm -> lm_head); the norms' weights
   become 1. A norm that is not a plain RMSNorm (mean subtraction, a `1 + w`
   scale, ...) is rejected: a probe compares it with x / rms(x) * w first.
3. Rotate the residual stream by Q = H diag(s) / sqrt(d), a random orthogonal
   Hadamard matrix (seeded): embeddings E <- E Q; linears that read the
   residual (q, k, v, gate, up, lm_head) W <- W Q; linears that write it (o,
   down) W <- Q^T W (and their bias b <- b Q). A scale-free RMSNorm commutes
   with Q: rms(h Q) = rms(h).
4. Online rotations, for quantized activations / KV cache (`online`):
   - down_proj input: x <- x H_i (i = intermediate size), H_i fused into W_down;
   - V / O: a per-head Hadamard H_d fused into v_proj's rows and o_proj's
     columns, so values (and the cache) are in the rotated basis;
   - o_proj input: a full online Hadamard of size n_heads * head_dim, fused into
     W_o. QuaRot applies only an n_heads-sized Hadamard online and relies on
     H_heads (x) H_d = H_hidden with H_d from V; SmolLM2 has 9 heads and no
     Hadamard matrix of order 9 exists, so here the whole o_proj input is
     rotated online (576 = 36 x 16 has a construction). It is the same kind of
     rotation (an orthogonal Hadamard spreading outliers over all features),
     at the cost of a size-576 (or 4096) transform instead of a size-9 one;
   - queries and keys after RoPE: a per-head Hadamard H_d (online, no fusion:
     (q H_d)(k H_d)^T = q k^T), with the key quantizer after it.
   `auto`: down/o when activations are quantized, V/O when activations or the
   KV cache are, q/k when the KV cache is. Online rotations are deterministic
   (H / sqrt(n)); only Q is random, as in QuaRot.
5. The weights are quantized by the calibrate step that follows QuaRot in the recipe
   (`quarot+rtn`, `quarot+gptq`: QuaRot's strongest published variant, `quarot+fp-search`:
   the LLM-FP4 search on the rotated model). It runs after the online rotations are
   installed, so GPTQ's Hessians and fp-search's captured inputs of o_proj / down_proj
   are of their rotated inputs (the inputs their fused weights multiply), and every
   quantizer keeps a linear's online rotation on the QuantLinear that replaces it. The
   activation / KV quantizers are attached later by the stage, so GPTQ's H is of
   unquantised activations, as in QuaRot's GPTQ. What the quantizer refuses (no data, a
   non-integer grid, ...) is refused before the rotation starts (the calibrate runner
   checks every step first).

Families (data in the architecture mapping, quant.models.arch): the norms' scales are
read and reset through their kind (Gemma's 1 + w); the readers of the residual are
every module behind the input and MLP norms (a fused qkv_proj / gate_up_proj, an MoE's
router and every expert's gate/up), its writers o_proj and every down projection (each
expert's, with its own online rotation of the expert's width); the V/O rotation takes
the v rows of a fused qkv_proj; q/k norms (Qwen3) sit before RoPE and are untouched
(the residual rotation does not reach q_proj's output, the online q/k rotation comes
after RoPE). Refused, naming model_type: norms on a sub-block's output before the
residual add (`output_norms`, Gemma 2/3): their elementwise scale does not commute with
Q and no linear follows them to absorb it, so rotating the residual would need an online
hidden-size rotation after each of them that no export format can hold.

Not implemented from the paper: the fused low-bit kernels (here everything is
fake-quant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from quant.calibrate import CalibrationContext
from quant.config import Config, ConfigError
from quant.config.scheme import QuantScheme
from quant.methods import register
from quant.models.arch import (
    ArchMapping,
    decoder_layers,
    get_module,
    mapping_for,
    norm_scale,
    set_norm_scale,
)
from quant.modules.rotation import HadamardRotation, install_qk_rotation, set_input_rotation
from quant.numerics import hadamard as had

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class QuaRotOptions(Config):
    seed: int = 0  # random signs of the residual rotation Q
    online: Literal["auto", "on", "off"] = "auto"  # online rotations (see module docstring)
    fuse_dtype: Literal["float64", "float32"] = "float64"  # arithmetic of the weight fusion
    online_fp32: bool = True  # online Hadamards in float32 whatever the activation dtype


@dataclass(frozen=True)
class Plan:
    """Which rotations to apply, with the sizes they need."""

    hidden: int
    head_dim: int
    heads: int
    intermediate: int
    linears: bool  # online down_proj / o_proj inputs
    vo: bool  # per-head V / O (offline)
    qk: bool  # online q / k after RoPE


def make_plan(model: nn.Module, scheme: QuantScheme, online: str) -> Plan:
    """Decide the rotations and check every size has a Hadamard construction (before any work)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    act, kv = scheme.activation is not None, scheme.kv_cache is not None
    on = online == "on"
    m = mapping_for(model)
    widths = {m.mlp_width(b, cfg) for b in decoder_layers(model, m)}
    plan = Plan(cfg.hidden_size, head_dim, cfg.num_attention_heads, max(widths),
                linears=on or (online == "auto" and act),
                vo=on or (online == "auto" and (act or kv)),
                qk=on or (online == "auto" and kv))
    had.check_size(plan.hidden, "quarot residual rotation (hidden_size)")
    if plan.linears:
        for width in sorted(widths):
            had.check_size(width, "quarot online rotation of down_proj (intermediate_size)")
        had.check_size(plan.heads * head_dim, "quarot online rotation of o_proj (heads * head_dim)")
    if plan.vo or plan.qk:
        had.check_size(head_dim, "quarot per-head rotation (head_dim)")
    return plan


def _norms(model: nn.Module, m: ArchMapping) -> list[tuple[str, nn.Module]]:
    out = []
    for i, block in enumerate(decoder_layers(model, m)):
        for path in (m.input_norm, m.mlp_norm):
            out.append((f"{m.layers}.{i}.{path}", get_module(block, path)))
    return [*out, (m.final_norm, get_module(model, m.final_norm))]


def check_family(model: nn.Module, m: ArchMapping) -> None:
    """Refuse the families whose residual stream cannot be rotated offline (module docstring)."""
    if m.output_norms:
        raise ConfigError(
            f"quarot cannot rotate model_type={model.config.model_type!r}: its norms "
            f"{list(m.output_norms)} scale the attention / MLP outputs elementwise just before the "
            "residual add; no linear follows them to absorb the residual rotation, so it would need "
            "an online hidden-size rotation after each, which no export format holds. Use awq or "
            "gptq without quarot for this family")


@torch.no_grad()
def check_rms_norms(model: nn.Module, m: ArchMapping) -> None:
    """Every norm must compute x / sqrt(mean(x^2) + eps) * scale (no mean, no bias), with the
    scale stored as the mapping's norm kind says (w, or 1 + w)."""
    check_family(model, m)
    for name, norm in _norms(model, m):
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        w = getattr(norm, "weight", None)
        if eps is None or w is None or getattr(norm, "bias", None) is not None:
            raise ConfigError(f"quarot needs RMSNorm; {name} is {type(norm).__name__} (no eps/weight "
                              "or has a bias): quarot accepts RMSNorm models only")
        x = torch.randn(4, w.numel(), generator=torch.Generator().manual_seed(0)) + 3.0
        x = x.to(w.device, w.dtype)
        ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * norm_scale(norm, m.norm_kind)
        if not torch.allclose(norm(x).float(), ref, rtol=1e-3, atol=1e-3):
            raise ConfigError(f"quarot needs RMSNorm (x / rms(x) * w, no mean subtraction); {name} "
                              f"({type(norm).__name__}) computes something else: "
                              "quarot accepts RMSNorm models only")


def _fuse(lin: nn.Linear, fn, dtype: torch.dtype, bias_fn=None) -> None:
    """lin.weight <- fn(weight) computed in `dtype` (and bias <- bias_fn(bias))."""
    w = lin.weight
    w.data = fn(w.data.to(dtype)).to(w.dtype)
    if bias_fn is not None and getattr(lin, "bias", None) is not None:  # an MoE router has none
        lin.bias.data = bias_fn(lin.bias.data.to(dtype)).to(lin.bias.dtype)


@torch.no_grad()
def fuse_norms(model: nn.Module, m: ArchMapping, dtype: torch.dtype) -> None:
    pairs = []
    for b in decoder_layers(model, m):  # every reader of a norm: q/k/v, gate/up, an MoE's router and experts
        for norm, readers in m.norm_readers(b, model.config).items():
            pairs.append((get_module(b, norm), [get_module(b, p) for p in readers]))
    pairs.append((get_module(model, m.final_norm), [get_module(model, m.lm_head)]))
    for norm, linears in pairs:  # one product per weight: float32 is exact enough
        g = norm_scale(norm, m.norm_kind)
        for lin in linears:
            _fuse(lin, lambda w, g=g: w * g.to(w.device), torch.float32)
        set_norm_scale(norm, torch.ones_like(g), m.norm_kind)


def untie_embeddings(model: nn.Module, m: ArchMapping) -> bool:
    embed, head = get_module(model, m.embed_tokens), get_module(model, m.lm_head)
    tied = head.weight is embed.weight or getattr(model.config, "tie_word_embeddings", False)
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return tied


@torch.no_grad()
def rotate_residual(model: nn.Module, m: ArchMapping, q: torch.Tensor, dtype: torch.dtype) -> None:
    """h <- h Q on the whole residual stream."""
    def right(w):
        return w @ q.to(w.device)

    def left(w):  # Q^T W on a [out, in] weight
        return q.to(w.device).t() @ w

    embed = get_module(model, m.embed_tokens)
    embed.weight.data = right(embed.weight.data.to(dtype)).to(embed.weight.dtype)
    for block in decoder_layers(model, m):
        for readers in m.norm_readers(block, model.config).values():
            for p in readers:
                _fuse(get_module(block, p), right, dtype)
        for p in m.residual_writers(block):
            _fuse(get_module(block, p), left, dtype, bias_fn=right)
    _fuse(get_module(model, m.lm_head), right, dtype)


@torch.no_grad()
def rotate_vo(model: nn.Module, m: ArchMapping, head_dim: int, dtype: torch.dtype) -> None:
    """Per-head H_d on values: v_proj rows (and bias) and o_proj columns."""
    def v_rows(w):  # [kvh * d, in]: each head's block W_h <- H_d^T W_h
        return had.hadamard_transform(w.t().reshape(w.shape[1], -1, head_dim), head_dim) \
            .reshape(w.shape[1], -1).t()

    def bias(b):
        return had.hadamard_transform(b.reshape(-1, head_dim), head_dim).reshape(-1)

    def o_cols(w):  # [out, h * d]: W <- W blockdiag(H_d)
        return had.hadamard_transform(w.reshape(w.shape[0], -1, head_dim), head_dim).reshape(w.shape)

    path, rows = m.part(model.config, "v")  # the v rows of a fused qkv_proj
    for block in decoder_layers(model, m):
        _fuse_rows(get_module(block, path), rows, v_rows, dtype, bias_fn=bias)
        _fuse(get_module(block, m.o_proj), o_cols, dtype)


def _fuse_rows(lin: nn.Linear, rows: tuple[int, int] | None, fn, dtype: torch.dtype, bias_fn=None) -> None:
    """`_fuse` on the rows [start, end) of lin's weight (and bias); all rows when None."""
    if rows is None:
        _fuse(lin, fn, dtype, bias_fn)
        return
    lo, hi = rows
    w = lin.weight.data
    w[lo:hi] = fn(w[lo:hi].to(dtype)).to(w.dtype)
    if bias_fn is not None and lin.bias is not None:
        lin.bias.data[lo:hi] = bias_fn(lin.bias.data[lo:hi].to(dtype)).to(lin.bias.dtype)


@torch.no_grad()
def fuse_online_inputs(model: nn.Module, m: ArchMapping, dtype: torch.dtype) -> None:
    """W <- W H_n for down_proj and o_proj, whose inputs get x <- x H_n online."""
    for block in decoder_layers(model, m):
        for p in m.residual_writers(block):
            lin = get_module(block, p)
            _fuse(lin, lambda w, n=lin.in_features: had.hadamard_transform(w, n), dtype)


def install_online(model: nn.Module, m: ArchMapping, plan: Plan, fp32: bool) -> int:
    n = 0
    if plan.linears:
        for block in decoder_layers(model, m):
            for p in m.residual_writers(block):
                lin = get_module(block, p)
                set_input_rotation(lin, HadamardRotation(lin.in_features, fp32).to(lin.weight.device))
                n += 1
    if plan.qk:
        install_qk_rotation(model, plan.head_dim, fp32)
        n += len(decoder_layers(model, m))
    return n


@torch.no_grad()
def rotate(model: nn.Module, scheme: QuantScheme, options: QuaRotOptions) -> dict[str, float]:
    """Steps 1-4 (no quantization): the model computes the same function afterwards."""
    m = mapping_for(model)
    plan = make_plan(model, scheme, options.online)
    check_rms_norms(model, m)
    dtype = DTYPES[options.fuse_dtype]
    tied = untie_embeddings(model, m)  # first: fusing the final norm into a tied lm_head
    fuse_norms(model, m, dtype)        # would scale the embeddings too
    q = had.random_hadamard(plan.hidden, options.seed, dtype)
    rotate_residual(model, m, q, dtype)
    if plan.vo:
        rotate_vo(model, m, plan.head_dim, dtype)
    if plan.linears:
        fuse_online_inputs(model, m, dtype)
    n_online = install_online(model, m, plan, options.online_fp32)
    return {"residual_rotation": float(plan.hidden), "untied_embeddings": float(tied),
            "online_rotations": float(n_online), "vo_rotated": float(plan.vo)}


def check_inputs(model: nn.Module, options: QuaRotOptions, ctx: CalibrationContext) -> None:
    """Every size has a Hadamard construction and every norm is a plain RMSNorm (no change)."""
    make_plan(model, ctx.scheme, options.online)
    check_rms_norms(model, mapping_for(model))


@register("quarot", kind="calibrate", options=QuaRotOptions, role="transform", check_inputs=check_inputs)
@torch.no_grad()
def quarot(model: nn.Module, options: QuaRotOptions, ctx: CalibrationContext) -> dict:
    """Hadamard rotations of the residual stream (and online ones), function-preserving."""
    return rotate(model, ctx.scheme, options)
