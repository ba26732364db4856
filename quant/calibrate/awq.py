"""AWQ: activation-aware per-channel scaling and weight clip search (Lin et al., 2024).

What runs, block by block (the inputs of block 0 are captured once; block i+1
receives block i's full-precision output, as in AutoAWQ):

1. Scale search, one `ScaleGroup` of the architecture mapping at a time
   (input norm -> q/k/v, v -> o, post-attention norm -> gate/up, up -> down):
   per-input-channel activation mean |x| over the calibration tokens, weight
   statistic mean over output rows of |W| / (group max of |W|), candidate
   s = x^r / w^(1-r) ("duo") or x^r, normalised by sqrt(max(s) * min(s)),
   r = 0, 1/n, ..., (n-1)/n. The loss of a candidate is the MSE of the group's
   parent module (attention, MLP, or the linear) when its linears use
   Q(W * s) / s; the first r with the least loss wins (ties keep the smaller r,
   so uniform activations without duo scaling give r = 0 and s = 1).
2. The winning s folds in exactly: `prev` (norm weight, or the previous linear's
   rows and bias) is divided by s, the next linears' columns multiplied by s.
   The full-precision function is unchanged up to float rounding. A group whose
   `prev` output width differs from the next input width (v -> o under grouped-
   query attention) is skipped, as AutoAWQ does.
3. Clip search per (output channel, group) of every linear except query/key
   (`ArchMapping.no_clip`): the range becomes [max(min w, -m), min(max w, m)]
   with m = ratio * max|w| of the group, ratio = 1, 1 - 1/n, ... down to
   1 - max_shrink (exclusive, AutoAWQ's loop), and the ratio with the least
   MSE of that group's partial output sum over a strided sample of the scaled
   inputs wins.
4. Each linear becomes a `QuantLinear` whose step size / zero point are the
   grid's min-max qparams of the clipped range (`grid.choose_qparams` applied to
   the [lo, hi] pair of every group), so Block-AP, E2E and export start from the
   searched qparams.

Families (data in the architecture mapping, quant.models.arch):
- a norm that scales by 1 + w (Gemma) folds 1/s into its scale, w <- (1 + w) / s - 1;
- a fused `prev` (Phi-3's qkv_proj for v -> o, gate_up_proj for up -> down) is scaled on
  the rows of its part only (the v rows, the up rows; AutoAWQ scales the last rows the
  same way); a fused `next` (qkv_proj, gate_up_proj) is one linear of its group;
- mixture of experts (Mixtral, Qwen3-MoE): the MLP norm feeds the router and every
  expert's gate/up, so one scale is searched for all of them on the MoE block's output
  (the router's columns are scaled with it and never quantized, as AutoAWQ does for
  Mixtral); each expert's up -> down is its own group on the tokens routed to it. An
  expert with fewer than `expert_min_tokens` routed calibration tokens is calibrated on
  every token of the block (quant.models.moe); `experts_all_token_calibrated` counts them.
  Device memory: the block's original gate/up weights are kept once (to restore after
  each candidate) beside the candidate's fake-quantized ones: one fp and one quantized
  copy of each expert, never more.

Differences from AutoAWQ, on purpose:
- The clip is stored as qparams; the float weight is not clamped (Block-AP
  and E2E then start from the unclipped weight and the clipped grid). The
  qparams equal those of AutoAWQ's clamped weight, and so does the
  fake-quantized weight inside the range; a weight beyond the bound may round
  to a grid level that lies past it (the rounded zero point shifts the grid by
  up to half a step; symmetric grids have the extra level -2^(b-1)), which
  AutoAWQ's clamp forbids. That level is the closer one, and the search
  measures exactly what is applied.
- Losses accumulate on the device and are read once per group (one host sync),
  and the clip search evaluates all groups of a channel batch with one batched
  matmul instead of a broadcast product.

Results (scales per folded `prev`, clip ratios per linear) are returned as
`awq_results.safetensors` with the model fingerprint and weight scheme in its
metadata; `options.results` reuses such a file (search skipped, same model bit
for bit). A file of another model or scheme is refused before any work.
"""

from __future__ import annotations

import inspect
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quant.blockwise.cache import ActivationCache
from quant.blockwise.passes import capture_block_inputs, layer_kwargs
from quant.calibrate import (
    CalibrationContext,
    check_calibration_ids,
    check_integer_scheme,
    static_qparams,
)
from quant.calibrate.saved import clock, model_fingerprint, read_results, spec_dict
from quant.config import Config, ConfigError
from quant.config.scheme import QuantScheme, WeightSpec
from quant.methods import register
from quant.models.arch import (
    ArchMapping,
    NormKind,
    ScaleGroup,
    decoder_layers,
    get_module,
    mapping_for,
    norm_scale,
    quantizable_linears,
    set_module,
    set_norm_scale,
)
from quant.models.moe import calibrate_all_tokens, starved_experts
from quant.modules.linear import QuantLinear
from quant.numerics import grid as P

RESULTS_FILE = "awq_results.safetensors"
RESULTS_VERSION = "1"


@dataclass(frozen=True)
class AWQOptions(Config):
    n_grid: int = 20  # scale ratios r = 0, 1/n_grid, ..., (n_grid - 1) / n_grid
    duo_scaling: bool = True  # s = x^r / w^(1-r); false: s = x^r
    clip: bool = True  # clip search after scaling
    clip_grid: int = 20  # clip ratios step by 1 / clip_grid
    max_shrink: float = 0.5  # down to (not reaching) 1 - max_shrink of the group max
    n_sample_token: int = 512  # calibration tokens (strided sample) for the clip search
    expert_min_tokens: int = 128  # MoE: an expert routed fewer calibration tokens is calibrated on all tokens
    batch_size: int = 16  # calibration sequences per forward pass
    results: str | None = None  # awq_results.safetensors (or a directory holding it) to reuse

    def __post_init__(self) -> None:
        for name in ("n_grid", "clip_grid", "n_sample_token", "batch_size", "expert_min_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 < self.max_shrink < 1.0:
            raise ConfigError(f"max_shrink={self.max_shrink} must be in (0, 1)")

    @property
    def clip_ratios(self) -> list[float]:
        return [1 - i / self.clip_grid for i in range(max(1, int(self.max_shrink * self.clip_grid)))]


@dataclass
class AWQResults:
    """Searched scales (by qualified `prev` name, [in]) and clip ratios (by qualified linear
    name, [out, n_groups]) of one model and weight scheme."""

    fingerprint: str
    spec: dict
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)  # chosen r per scale group (metrics)
    capture_seconds: float = 0.0  # not saved: timing of the run that produced these
    block_seconds: list[float] = field(default_factory=list)
    starved_experts: int = 0  # not saved: MoE experts calibrated on every token (too few routed)

    def save(self, path: str | Path) -> None:
        tensors = {f"scale:{k}": v.contiguous().cpu() for k, v in self.scales.items()}
        tensors |= {f"clip:{k}": v.contiguous().cpu() for k, v in self.clips.items()}
        meta = {"awq_version": RESULTS_VERSION, "fingerprint": self.fingerprint,
                "weight_scheme": json.dumps(self.spec, sort_keys=True),
                "ratios": json.dumps(self.ratios, sort_keys=True)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str, spec: WeightSpec, where: str = "awq") -> AWQResults:
        """Read saved results, refusing a file of another model or weight scheme."""
        _, meta, tensors = read_results(
            path, RESULTS_FILE, "AWQ", "awq_version", RESULTS_VERSION, fingerprint, spec, where,
            missing=f"an {RESULTS_FILE} written by an awq calibrate step, or null to search", redo="search again")
        saved_spec = json.loads(meta["weight_scheme"])
        out = cls(fingerprint, saved_spec, ratios=json.loads(meta.get("ratios", "{}")))
        for key, t in tensors.items():
            kind, _, name = key.partition(":")
            (out.scales if kind == "scale" else out.clips)[name] = t
        return out


# ---------------------------------------------------------------------------
# Checks before any work


def check_mapping(model: nn.Module, mapping: ArchMapping) -> None:
    """Every path the AWQ mapping names exists in every block with the expected kind."""
    if not mapping.scale_groups:
        raise ConfigError(f"architecture mapping {mapping.family!r} has no scale_groups; "
                          "AWQ needs them (quant/models/arch.py)")
    for i, block in enumerate(decoder_layers(model, mapping)):
        for g in _groups(block, model.config, mapping):
            for path in (g.prev, g.inputs_of, g.parent_path, *g.nexts, *g.readers):
                try:
                    module = get_module(block, path)
                except AttributeError:
                    children = [n for n, _ in block.named_modules() if n]
                    raise ConfigError(
                        f"architecture mapping {mapping.family!r} names {path!r}, which block {i} "
                        f"lacks; its modules: {children[:40]}") from None
                if path in g.nexts and (type(module) is not nn.Linear):
                    raise ConfigError(f"block {i}: {path} is a {type(module).__name__}, AWQ needs "
                                      "a plain nn.Linear (a full-precision model)")
            prev = get_module(block, g.prev)
            if not isinstance(prev, nn.Linear) and getattr(prev, "weight", None) is None:
                raise ConfigError(f"block {i}: {g.prev} has no weight to fold scales into")


def _groups(block: nn.Module, config, mapping: ArchMapping) -> list[ScaleGroup]:
    try:
        return mapping.groups(block, config)
    except AttributeError as exc:  # a path of the mapping the block lacks
        children = [n for n, _ in block.named_modules() if n]
        raise ConfigError(f"architecture mapping {mapping.family!r}: {exc}; the block's modules: "
                          f"{children[:40]}") from None


def check_scheme(scheme: QuantScheme, options: AWQOptions, where: str = "awq") -> None:
    """What AWQ refuses before any model is loaded."""
    check_integer_scheme(scheme, "AWQ", where)


def check_inputs(model: nn.Module, options: AWQOptions, ctx: CalibrationContext) -> None:
    """What AWQ refuses on the loaded model and data, before any step changes the model."""
    check_scheme(ctx.scheme, options, ctx.where)
    quantizable_linears(model, ctx.scheme)  # group sizes divide every width
    check_mapping(model, mapping_for(model))
    check_calibration_ids(ctx, options.results, "AWQ")


# ---------------------------------------------------------------------------
# Scale search


def _call(module: nn.Module, kwargs: dict):
    """module(x, **the kwargs its forward accepts) -> its (first) output tensor."""
    params = inspect.signature(module.forward).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}

    def f(x: torch.Tensor) -> torch.Tensor:
        out = module(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return f


def weight_stat(linears: list[nn.Linear], group_size: int) -> torch.Tensor:
    """Mean over output rows of |W| / (max |W| of its group) -> [in] (AutoAWQ's w_mean)."""
    w = torch.cat([lin.weight.detach() for lin in linears]).float().abs()  # [sum out, in]
    wg = P.group_view(w, group_size)
    return (wg / (wg.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)


def activation_stat(x: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Mean |x| per channel over every token of x [N, L, C] -> [C] (fp32, chunked)."""
    total = torch.zeros(x.shape[-1], device=x.device)
    for i in range(0, x.shape[0], chunk):
        total += x[i : i + chunk].float().abs().sum(dim=(0, 1))
    return total / (x.shape[0] * x.shape[1])


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo: bool) -> torch.Tensor:
    if duo:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _qdq(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, spec: WeightSpec) -> torch.Tensor:
    """dequantize(quantize(w)): the value `fake_quantize` computes, without its STE graph."""
    q = P.quantize(w, scale, zp, spec.format, spec.group_size)
    return P.dequantize(q, scale, zp, spec.format, spec.group_size, w.dtype)


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Q(W * s) / s in fp32, back in w's dtype (min-max qparams of the scaled weight)."""
    ws = w.float() * s
    scale, zp = P.choose_qparams(ws, spec.format, spec.group_size, spec.symmetric)
    return (_qdq(ws, scale, zp, spec) / s).to(w.dtype)


@torch.no_grad()
def search_scale(parent: nn.Module, linears: list[nn.Linear], x: torch.Tensor, kwargs: dict,
                 spec: WeightSpec, options: AWQOptions) -> tuple[torch.Tensor, float]:
    """The best per-input-channel scale of `linears` (inputs x [N, L, in]) by `parent`'s output
    MSE; returns (s [in] fp32, chosen ratio). The linears' weights are restored."""
    fwd, bs = _call(parent, kwargs), options.batch_size
    x_mean, w_mean = activation_stat(x), weight_stat(linears, spec.group_size)
    ref = [fwd(x[i : i + bs]) for i in range(0, x.shape[0], bs)]
    originals = [lin.weight.detach().clone() for lin in linears]
    losses = torch.zeros(options.n_grid, device=x.device)
    try:
        for k in range(options.n_grid):
            s = candidate_scales(x_mean, w_mean, k / options.n_grid, options.duo_scaling)
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.copy_(scaled_fake_quant(w, s, spec))
            for j, i in enumerate(range(0, x.shape[0], bs)):
                losses[k] += (fwd(x[i : i + bs]).float() - ref[j].float()).pow(2).sum()
    finally:
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.copy_(w)
    losses = torch.nan_to_num(losses, nan=float("inf"))  # an fp16 overflow never wins
    best = int(torch.argmin(losses))  # first minimum: ties keep the smaller ratio
    ratio = best / options.n_grid
    return candidate_scales(x_mean, w_mean, ratio, options.duo_scaling), ratio


@torch.no_grad()
def apply_scales(block: nn.Module, groups: list[ScaleGroup], scales: dict[str, torch.Tensor],
                 norm_kind: NormKind = "rms") -> None:
    """Fold each group's s: prev (norm scale, or the rows of a linear that feed `nexts`, and
    their bias) / s, the input columns of `nexts` and `readers` * s."""
    for g in groups:
        prev = get_module(block, g.prev)
        s = scales[g.prev].to(prev.weight.device)
        if isinstance(prev, nn.Linear):
            lo, hi = g.prev_rows or (0, prev.out_features)
            rows = prev.weight[lo:hi]
            rows.copy_((rows.float() / s.view(-1, 1)).to(rows.dtype))
            if prev.bias is not None:
                b = prev.bias[lo:hi]
                b.copy_((b.float() / s).to(b.dtype))
        else:
            set_norm_scale(prev, norm_scale(prev, norm_kind) / s, norm_kind)
        for name in (*g.nexts, *g.readers):
            lin = get_module(block, name)
            lin.weight.copy_((lin.weight.float() * s).to(lin.weight.dtype))


# ---------------------------------------------------------------------------
# Clip search


def clip_qparams(w: torch.Tensor, ratio: torch.Tensor, spec: WeightSpec):
    """Grid qparams of the clipped range per (row, group): [max(min w, -m), min(max w, m)] with
    m = ratio * max|w|; `ratio` is a scalar or [out, n_groups] tensor. Returns (scale, zp) of
    shape [out, n_groups] (zp None for symmetric grids)."""
    wg = P.group_view(w.float(), spec.group_size)  # [out, n_groups, g]
    m = wg.abs().amax(-1) * ratio.to(wg.device)
    bounds = torch.stack([torch.maximum(wg.amin(-1), -m), torch.minimum(wg.amax(-1), m)], -1)
    scale, zp = P.choose_qparams(bounds, spec.format, P.PER_ROW, spec.symmetric)  # [.., 1]
    return scale.squeeze(-1), None if zp is None else zp.squeeze(-1)


def group_errors(w: torch.Tensor, xg: torch.Tensor, ratio: torch.Tensor, spec: WeightSpec,
                 ref: torch.Tensor) -> torch.Tensor:
    """MSE over tokens of every (row, group) partial output after quantising w [o, K] with the
    clipped qparams; xg [n_groups, T, g], ref [n_groups, T, o] -> [o, n_groups]."""
    scale, zp = clip_qparams(w, ratio, spec)
    q = _qdq(w.float(), scale, zp, spec)
    qg = q.view(w.shape[0], xg.shape[0], xg.shape[2]).permute(1, 2, 0)  # [n_groups, g, o]
    return (torch.bmm(xg, qg) - ref).pow(2).mean(1).T


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: WeightSpec, options: AWQOptions,
                oc_batch: int = 1024) -> torch.Tensor:
    """Best clip ratio per (output channel, group) of w [out, K] on a token sample of x [.., K]
    -> [out, n_groups] fp32 (1.0 where clipping does not help)."""
    x = x.reshape(-1, x.shape[-1])
    x = x[:: max(1, x.shape[0] // options.n_sample_token)].float()  # AutoAWQ's strided sample
    g = x.shape[1] if spec.group_size == P.PER_ROW else spec.group_size
    xg = x.view(x.shape[0], -1, g).transpose(0, 1).contiguous()  # [n_groups, T, g]
    candidates = [torch.tensor(r, dtype=torch.float32, device=w.device) for r in options.clip_ratios]
    best = []
    for o0 in range(0, w.shape[0], oc_batch):
        wc = w[o0 : o0 + oc_batch].float()  # [o, K]
        ref = torch.bmm(xg, wc.view(wc.shape[0], xg.shape[0], g).permute(1, 2, 0))
        min_err = torch.full((wc.shape[0], xg.shape[0]), float("inf"), device=w.device)
        best_r = torch.ones_like(min_err)
        for r in candidates:
            err = group_errors(wc, xg, r, spec, ref)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_r = torch.where(better, r, best_r)
        best.append(best_r)
    return torch.cat(best)


# ---------------------------------------------------------------------------
# Block loop


def _input_source(groups: list[ScaleGroup], path: str) -> str:
    """The module whose input equals `path`'s input (q/k/v share the norm output)."""
    for g in groups:
        if path in g.nexts:
            return g.inputs_of
    return path


def _source(mapping: ArchMapping, groups: list[ScaleGroup], path: str) -> str:
    """The module whose input is `path`'s input: an expert's gate and up read the tokens routed
    to that expert (captured at its gate), other linears what their group's `inputs_of` reads."""
    if mapping.moe is not None and path.startswith(mapping.moe.experts + "."):
        prefix, _, name = path.rpartition(".")
        gate, up, _ = mapping.moe.expert_linears
        return f"{prefix}.{gate}" if name in (gate, up) else path
    return _input_source(groups, path)


@torch.no_grad()
def _capture(block: nn.Module, x: torch.Tensor, kwargs: dict, paths: set[str], bs: int):
    """Inputs of the modules `paths` ({path: [N, L, in]}, or [tokens, in] for modules inside an
    MoE's experts, which see only their tokens) and the block output for x [N, L, D]."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    hooks = [get_module(block, p).register_forward_hook(
        lambda _m, args, _o, p=p: seen[p].append(args[0])) for p in paths]
    fwd = _call(block, kwargs)
    try:
        out = torch.cat([fwd(x[i : i + bs]) for i in range(0, x.shape[0], bs)])
    finally:
        for h in hooks:
            h.remove()
    return {p: torch.cat(v) if v else None for p, v in seen.items()}, out


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """Activations as [N, L, C] (an expert's [tokens, C] becomes [1, tokens, C])."""
    return x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])


def search_block(block: nn.Module, x: torch.Tensor, kwargs: dict, mapping: ArchMapping,
                 spec: WeightSpec, options: AWQOptions, config=None):
    """Search, fold and clip-search one block in place; returns
    (scales by prev, clip ratios by linear, chosen ratio by prev, block output, MoE metrics)."""
    all_groups = mapping.groups(block, config)
    groups = [g for g in all_groups if g.foldable(block)]
    clip_targets = [p for p in mapping.linears(block) if p not in mapping.no_clip] if options.clip else []
    sources = {g.inputs_of for g in groups} | {_source(mapping, all_groups, p) for p in clip_targets}
    with _calibrate_experts(block, mapping, x, kwargs, options) as moe:
        feats, out = _capture(block, x, kwargs, sources, options.batch_size)
    feats = {k: _tokens(v) for k, v in feats.items() if v is not None}
    scales, ratios = {}, {}
    for g in groups:  # every search sees the unscaled block, as in AutoAWQ
        linears = [get_module(block, n) for n in g.nexts]
        parent = get_module(block, g.parent_path)
        scales[g.prev], ratios[g.prev] = search_scale(parent, linears, feats[g.inputs_of], kwargs,
                                                      spec, options)
    apply_scales(block, groups, scales, mapping.norm_kind)
    for src in list(feats):  # the inputs as the folded block sees them
        g = next((g for g in groups if src == g.inputs_of or src in g.nexts), None)
        if g is not None:
            feats[src] = feats[src] / scales[g.prev].to(feats[src].dtype)
    clips = {p: search_clip(get_module(block, p).weight, feats[_source(mapping, all_groups, p)], spec, options)
             for p in clip_targets}
    return scales, clips, ratios, out, moe


@contextmanager
def _calibrate_experts(block: nn.Module, mapping: ArchMapping, x: torch.Tensor, kwargs: dict,
                       options: AWQOptions):
    """Inside: an MoE block's starved experts run on every token (quant.models.moe); yields
    {"starved": count} ({} for a dense block)."""
    if not mapping.is_moe_block(block):
        yield {}
        return
    fwd, bs = _call(block, kwargs), options.batch_size
    starved, _ = starved_experts(block, mapping.moe.experts,
                                 lambda: [fwd(x[i : i + bs]) for i in range(0, x.shape[0], bs)],
                                 options.expert_min_tokens)
    with calibrate_all_tokens(block, mapping.moe.experts, starved):
        yield {"starved": len(starved)}


@torch.no_grad()
def quantize_block(block: nn.Module, prefix: str, mapping: ArchMapping, spec: WeightSpec,
                   clips: dict[str, torch.Tensor]) -> None:
    """Replace the block's linears by QuantLinears; clipped ones get the clipped qparams."""
    for path in mapping.linears(block):
        ql = QuantLinear.from_linear(get_module(block, path), spec, f"{prefix}.{path}")
        if path in clips:
            scale, zp = clip_qparams(ql.weight, clips[path], spec)
            ql.scale.copy_(scale)
            if zp is not None:
                ql.zero_point.copy_(zp)
        set_module(block, path, ql)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_awq(model: nn.Module, spec: WeightSpec, calib_ids: torch.Tensor | None, options: AWQOptions,
            fingerprint: str, saved: AWQResults | None = None,
            device: torch.device | None = None) -> AWQResults:
    """Scale, clip and quantize every decoder block in order, one block on `device` at a time.
    With `saved`, its scales and clips are applied instead of searching."""
    mapping = mapping_for(model)
    device = device or _device()
    layers = decoder_layers(model, mapping)
    home = next(model.parameters()).device
    results = saved or AWQResults(fingerprint, spec_dict(spec))
    x = per_block = None
    t = clock(device)
    if saved is None:
        dtype = next(layers[0].parameters()).dtype
        shape = (*calib_ids.shape, model.config.hidden_size)
        cache = ActivationCache(shape, dtype, "gpu" if device.type == "cuda" else "cpu", device)
        capture_block_inputs(model, calib_ids, cache, options.batch_size, device, mapping)
        x = cache.data.to(device)
        per_block = layer_kwargs(model, calib_ids, device, mapping)
    results.capture_seconds = clock(device) - t
    results.block_seconds = []
    for i, block in enumerate(layers):
        t = clock(device)
        prefix = f"{mapping.layers}.{i}"
        block.to(device)
        if saved is None:
            scales, clips, ratios, x, moe = search_block(block, x, per_block[i], mapping, spec, options,
                                                         model.config)
            results.scales |= {f"{prefix}.{k}": v.cpu() for k, v in scales.items()}
            results.clips |= {f"{prefix}.{k}": v.cpu() for k, v in clips.items()}
            results.ratios |= {f"{prefix}.{k}": v for k, v in ratios.items()}
            results.starved_experts += moe.get("starved", 0)
        else:
            groups = [g for g in mapping.groups(block, model.config) if g.foldable(block)]
            scales = {g.prev: saved.scales[f"{prefix}.{g.prev}"] for g in groups}
            clips = {k.removeprefix(prefix + "."): v for k, v in saved.clips.items()
                     if k.startswith(prefix + ".")}
            apply_scales(block, groups, scales, mapping.norm_kind)
        quantize_block(block, prefix, mapping, spec, {k: v.to(device) for k, v in clips.items()})
        block.to(home)
        results.block_seconds.append(clock(device) - t)
    model.to(home)  # capture_block_inputs parks the embedding on the host
    return results


def _check_saved(model: nn.Module, saved: AWQResults, path: str) -> None:
    """Every foldable group of every block has a scale of the right width."""
    mapping = mapping_for(model)
    for i, block in enumerate(decoder_layers(model, mapping)):
        for g in mapping.groups(block, model.config):
            key = f"{mapping.layers}.{i}.{g.prev}"
            if not g.foldable(block):
                continue
            width = get_module(block, g.nexts[0]).in_features
            if key not in saved.scales or saved.scales[key].shape != (width,):
                raise ConfigError(f"{path}: no AWQ scale of width {width} for {key}; the file "
                                  "does not match this model")


@register("awq", kind="calibrate", options=AWQOptions, role="quantizer", check=check_scheme,
          check_inputs=check_inputs, resolve=static_qparams, data=True)
@torch.no_grad()
def awq(model: nn.Module, options: AWQOptions, ctx: CalibrationContext) -> dict:
    """AWQ scale + clip search, then QuantLinears with the searched qparams (in place).

    Returns metrics plus `files`: {RESULTS_FILE: writer(path)} for the stage to store
    beside the quantized model."""
    scheme = ctx.scheme
    check_inputs(model, options, ctx)
    spec, calib_ids = scheme.weight, ctx.calib_ids
    fingerprint = model_fingerprint(model)
    saved = None
    if options.results is not None:
        saved = AWQResults.load(options.results, fingerprint, spec, ctx.where)
        _check_saved(model, saved, options.results)
    t0 = time.time()
    results = run_awq(model, spec, calib_ids, options, fingerprint, saved)
    mapping = mapping_for(model)
    n = sum(len(mapping.linears(b)) for b in decoder_layers(model, mapping))
    if scheme.quantize_lm_head:
        name = mapping.lm_head
        set_module(model, name, QuantLinear.from_linear(get_module(model, name), spec, name))
        n += 1
    clips = torch.cat([c.flatten() for c in results.clips.values()]) if results.clips else None
    return {
        "quantized_linears": float(n),
        "awq_seconds": round(time.time() - t0, 2),
        "awq_seconds_per_block": round(sum(results.block_seconds) / max(1, len(results.block_seconds)), 3),
        "awq_reused": float(saved is not None),
        "awq_mean_ratio": sum(results.ratios.values()) / max(1, len(results.ratios)),
        "awq_scaled_groups": float(len(results.scales)),
        "awq_mean_clip": float(clips.mean()) if clips is not None else 1.0,
        "awq_clipped_fraction": float((clips < 1).float().mean()) if clips is not None else 0.0,
        "experts_all_token_calibrated": float(results.starved_experts),
        "files": {RESULTS_FILE: results.save},
    }
