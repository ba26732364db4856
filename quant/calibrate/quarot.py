"""QuaRot (Ashkboos et al., 2024): rotate with Hadamard matrices, then quantize.

Every step leaves the full-precision function unchanged. The RMSNorm scales are treated
one of two ways (`norms`):

- `online` (the default): every norm keeps its scale and the residual stream is not
  rotated. Each quantized linear that reads a norm's output (q/k/v, gate/up, every
  expert's gate/up; lm_head when the scheme quantizes it, untied first) gets an online
  Hadamard of its input fused into its weight (W <- W H, x <- x H, as for down_proj in
  step 4), so its weight and activation quantizers see the rotated, *scaled* norm output.
  An MoE router reads the norm's output unrotated (it is not quantized).
- `fuse` (QuaRot as published), steps 1-3:
  1. Untie the input embedding and lm_head (SmolLM2 ties them) so each can be changed on
     its own side (before step 2, which scales lm_head).
  2. Fuse every RMSNorm's scale into the linears it feeds (input norm -> q/k/v,
     post-attention norm -> gate/up, final norm -> lm_head); the norms' scales become 1.
     A norm that is not a plain RMSNorm (mean subtraction, a bias, ...) is rejected: a
     probe compares it with x / rms(x) * scale first.
  3. Rotate the residual stream by Q = H diag(s) / sqrt(d), a random orthogonal Hadamard
     matrix (`seed`): embeddings E <- E Q; linears that read the residual (q, k, v, gate,
     up, lm_head) W <- W Q; linears that write it (o, down) W <- Q^T W (and their bias
     b <- b Q). A scale-free RMSNorm commutes with Q: rms(h Q) = rms(h).

Then, with either:

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
   (H / sqrt(n)); only Q is random, as in QuaRot. `norms: online` is itself an
   online rotation, so it refuses `online: off`.
5. The weights are quantized by the calibrate step that follows QuaRot in the recipe
   (`quarot+rtn`, `quarot+gptq`: QuaRot's strongest published variant, `quarot+fp-search`:
   the LLM-FP4 search on the rotated model). It runs after the online rotations are
   installed, so GPTQ's Hessians and fp-search's captured inputs are of the rotated
   inputs (the inputs the fused weights multiply), and every quantizer keeps a linear's
   online rotation on the QuantLinear that replaces it. The activation / KV quantizers
   are attached later by the stage, so GPTQ's H is of unquantised activations, as in
   QuaRot's GPTQ. What the quantizer refuses (no data, a non-integer grid, ...) is
   refused before the rotation starts (the calibrate runner checks every step first).

Why `online` is the default. Fusing the norm scales is exact in full precision but moves
them out of the path of the weights' rounding error: a reader's output error becomes
x_n E^T with x_n = h / rms(h), instead of (x_n * g) E^T. Where a residual channel is
massive and its norm all but switches it off, that matters. SmolLM2-135M's residual
channels 17, 247 and 507 hold 49% of every normalised token's energy (507: mean 10.3,
std 3.4), while the post-attention norms scale 507 by |g| < 1e-3 in 17 of 30 layers and
the input norms by 0.15 (median); after fusion and rotation 48-49% of the gate/up
readers' rounding error reaches their outputs through those three of 576 directions,
against 19% with `online` (benches/quality/quarot_weight_error.py). Measured with that
bench on the embedded model, llm-qat W4A8KV4 (per-channel W4 by min-max, per-token A8,
KV4), PPL on 2 held-out calibration windows of 2048 tokens, CPU
(docs/results/quarot_norms_cpu.json): fp 15.88, RTN 53.78, quarot+rtn with `fuse`
121.37, with `online` 45.00; the diagnostics RTN of the norm-fused (unrotated) weights
196.57 and `fuse` with the readers' error along the three directions removed 35.48.
At W4A4KV4 (docs/results/quarot_norms_cpu_w4a4kv4.json): RTN 8677, `fuse` 427.0,
`online` 86.86, `fuse` without that error 80.27.
Weight-only W4 on the same model (docs/results/quarot_weight_error_cpu.json, 512-token
windows): RTN 46.6, `fuse` 117.1, `fuse` without that error 36.8. GPTQ sees the massive
channels through its Hessian: quarot{fuse}+gptq was not hurt there (wiki PPL 24.3 vs
GPTQ's 36.0 at W4 in an earlier run, docs/results/quarot_cpu_fixed.json). `online` +
GPTQ on the evaluation texts (docs/results/quarot_recipes_cpu.json, _w4a4kv4.json):
1.34 / 1.39 x fp at W4A8KV4 and 2.24 / 2.29 x at W4A4KV4 (RTN 3.36 / 4.26 and
716 / 507). The cost of `online`: one size-hidden Hadamard per quantized reader at run time (q, k, v, gate, up:
five per layer, on two distinct inputs; a forward pre-hook each) where `fuse`'s residual
rotation is free, and a checkpoint with online rotations at every scheme, which the
packed formats cannot hold yet (`fuse` with `online: off` converts).

Families (data in the architecture mapping, quant.models.arch). `online` never reads or
writes a norm and leaves the residual stream alone, so it runs on every mapped family:
the readers are the quantized modules behind the input and MLP norms (a fused qkv_proj /
gate_up_proj once, every expert's gate/up), Gemma's `1 + w` norms and its norms on the
sub-block outputs (`output_norms`, Gemma 2/3) stay as they are. `fuse` reads and resets
the norms' scales through their kind (Gemma's 1 + w); the readers of the residual are
every module behind the input and MLP norms (an MoE's router included), its writers
o_proj and every down projection (each expert's, with its own online rotation of the
expert's width). `fuse` refuses, naming model_type, the output norms of Gemma 2/3: their
elementwise scale does not commute with Q and no linear follows them to absorb it, so
rotating the residual would need an online hidden-size rotation after each of them. With
either, the V/O rotation takes the v rows of a fused qkv_proj, and q/k norms (Qwen3,
Gemma 3) sit before RoPE and are untouched (nothing rotates q_proj's output; the online
q/k rotation comes after RoPE).

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
    target_linears,
)
from quant.modules.rotation import HadamardRotation, install_qk_rotation, set_input_rotation
from quant.numerics import hadamard as had

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class QuaRotOptions(Config):
    seed: int = 0  # random signs of the residual rotation Q (norms: fuse)
    # RMSNorm scales: fused into the readers + residual rotated, or kept + norm outputs rotated online
    norms: Literal["fuse", "online"] = "online"
    online: Literal["auto", "on", "off"] = "auto"  # online rotations (see module docstring)
    fuse_dtype: Literal["float64", "float32"] = "float64"  # arithmetic of the weight fusion
    online_fp32: bool = True  # online Hadamards in float32 whatever the activation dtype

    def __post_init__(self) -> None:
        if self.norms == "online" and self.seed != 0:
            raise ConfigError(f"quarot: seed={self.seed} sets the signs of the residual rotation, which "
                              "norms: online does not make (its online Hadamards are fixed); remove seed "
                              "or set norms: fuse")
        if self.norms == "online" and self.online == "off":
            raise ConfigError("quarot: norms: online rotates every norm reader's input online, which "
                              "online: off rules out; for a model without online rotations (one that "
                              "convert can pack) set norms: fuse")


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


def make_plan(model: nn.Module, scheme: QuantScheme, options: QuaRotOptions) -> Plan:
    """Decide the rotations and check every size has a Hadamard construction (before any work)."""
    online = options.online
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
    what = "residual rotation" if options.norms == "fuse" else "online rotation of the norm outputs"
    had.check_size(plan.hidden, f"quarot {what} (hidden_size)")
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
    """`norms: fuse`: refuse the families whose residual stream cannot be rotated offline
    (module docstring)."""
    if m.output_norms:
        raise ConfigError(
            f"quarot.norms=fuse cannot rotate model_type={model.config.model_type!r}: its norms "
            f"{list(m.output_norms)} scale the attention / MLP outputs elementwise just before the "
            "residual add; no linear follows them to absorb the residual rotation, so it would need "
            "an online hidden-size rotation after each, which no export format holds. Use quarot's "
            "default norms: online (no residual rotation), or awq or gptq without quarot")


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


def norm_output_readers(model: nn.Module, m: ArchMapping, scheme: QuantScheme) -> list[tuple[str, nn.Module]]:
    """(name, module) of every quantized linear that reads a norm's output: q/k/v (a fused
    qkv_proj once), gate/up (gate_up_proj; every expert's), and lm_head when the scheme
    quantizes it. An MoE router reads the MLP norm too but is not quantized: it keeps its
    input as it is (nothing to gain, and one Hadamard less per layer)."""
    targets = dict(target_linears(model, scheme.quantize_lm_head))
    out = []
    for i, block in enumerate(decoder_layers(model, m)):
        for readers in m.norm_readers(block, model.config).values():
            names = (f"{m.layers}.{i}.{p}" for p in readers)
            out += [(n, targets[n]) for n in names if n in targets]
    if m.lm_head in targets:
        out.append((m.lm_head, targets[m.lm_head]))
    return out


@torch.no_grad()
def rotate_norm_outputs(model: nn.Module, m: ArchMapping, scheme: QuantScheme, dtype: torch.dtype,
                        fp32: bool) -> int:
    """`norms: online`: x <- x H online at every quantized norm reader's input, W <- W H fused."""
    readers = norm_output_readers(model, m, scheme)
    for _, lin in readers:
        _fuse(lin, lambda w, n=lin.in_features: had.hadamard_transform(w, n), dtype)
        set_input_rotation(lin, HadamardRotation(lin.in_features, fp32).to(lin.weight.device))
    return len(readers)


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
    plan = make_plan(model, scheme, options)
    check_norms(model, m, scheme, options)
    dtype = DTYPES[options.fuse_dtype]
    if options.norms == "fuse":
        tied = untie_embeddings(model, m)  # first: fusing the final norm into a tied lm_head
        fuse_norms(model, m, dtype)        # would scale the embeddings too
        q = had.random_hadamard(plan.hidden, options.seed, dtype)
        rotate_residual(model, m, q, dtype)
        n_norm = 0
    else:  # a quantized lm_head gets W H: a tied one would rotate the embeddings with it
        tied = untie_embeddings(model, m) if scheme.quantize_lm_head else False
        n_norm = rotate_norm_outputs(model, m, scheme, dtype, options.online_fp32)
    if plan.vo:
        rotate_vo(model, m, plan.head_dim, dtype)
    if plan.linears:
        fuse_online_inputs(model, m, dtype)
    n_online = n_norm + install_online(model, m, plan, options.online_fp32)
    return {"residual_rotation": float(plan.hidden) if options.norms == "fuse" else 0.0,
            "untied_embeddings": float(tied), "online_rotations": float(n_online),
            "norm_output_rotations": float(n_norm), "vo_rotated": float(plan.vo)}


def check_norms(model: nn.Module, m: ArchMapping, scheme: QuantScheme, options: QuaRotOptions) -> None:
    """`fuse`: the family's residual can be rotated and every norm is a plain RMSNorm.
    `online`: every quantized reader of a norm reads hidden_size features (no change)."""
    if options.norms == "fuse":
        check_rms_norms(model, m)
        return
    hidden = model.config.hidden_size
    for name, lin in norm_output_readers(model, m, scheme):
        width = getattr(getattr(lin, "weight", None), "shape", (0, 0))[-1]
        if width != hidden:
            raise ConfigError(
                f"quarot.norms=online cannot rotate the input of {name} (model_type="
                f"{model.config.model_type!r}): it reads a norm's output but its weight has {width} "
                f"input columns, not hidden_size={hidden}; set quarot norms: fuse")


def check_inputs(model: nn.Module, options: QuaRotOptions, ctx: CalibrationContext) -> None:
    """Every size has a Hadamard construction and the norms allow `options.norms` (no change)."""
    make_plan(model, ctx.scheme, options)
    check_norms(model, mapping_for(model), ctx.scheme, options)


@register("quarot", kind="calibrate", options=QuaRotOptions, role="transform", check_inputs=check_inputs)
@torch.no_grad()
def quarot(model: nn.Module, options: QuaRotOptions, ctx: CalibrationContext) -> dict:
    """Hadamard rotations of the norm outputs or the residual stream (and online ones), function-preserving."""
    return rotate(model, ctx.scheme, options)
