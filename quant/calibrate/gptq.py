"""GPTQ (Frantar et al., 2022): quantise each linear column by column, correcting the rest.

For a linear with weight W [out, in] and calibration inputs X [tokens, in], GPTQ
minimises ||X W^T - X Q^T||^2 over grid weights Q with the layer Hessian
H = 2 X^T X / tokens. Columns are quantised one at a time; the error of column i,
divided by the diagonal of the upper Cholesky factor U of H^-1, is spread over the
columns not yet quantised through row i of U (the optimal update of the OBS
framework). As published:

- dead inputs (diag(H) = 0, the feature is never active) get H_ii = 1 and their
  weight column 0;
- dampening: percdamp * mean(diag(H)) is added to the diagonal before
  U = chol(chol_inverse(chol(H)))^T (one Cholesky of the inverse, no re-inversion
  per column);
- lazy batches: updates inside a block of `block_size` columns are applied at
  once to the rest of the matrix after the block (same result, fewer passes
  over W);
- act_order (desc_act): columns in order of decreasing diag(H);
- qparams: min-max of a group's columns (the grid's `choose_qparams`, so 0 is
  in the range and the zero point is an integer of the grid); per channel, of
  the whole row.
- the model runs block by block ("sequential"): block i's inputs come from the
  already quantised blocks 0..i-1, and within a block each set of linears that
  reads one input (q/k/v, o, gate/up, down: the mapping's scale groups) gets one
  shared H computed with the linears before it already quantised
  (`true_sequential`, GPTQ's recommended mode for Llama).

Families: the groups of linears that share an input come from the architecture mapping
(`input_stages`): a fused qkv_proj or gate_up_proj is one linear of its own group. In a
mixture-of-experts block every expert reads only the tokens routed to it, so each
expert's gate/up and its down get their own Hessians (the router is never quantized);
one stage runs the block once for the gate/up of all experts, one for their down. An
expert with fewer than `expert_min_tokens` routed calibration tokens gets the Hessian of
every token of the block instead (quant.models.moe; counted in
`experts_all_token_calibrated`): few tokens give a rank-deficient Hessian that GPTQ
would fit to those few.

Decisions where the published code leaves a choice:
- Groups stay contiguous. The pipeline (QuantLinear, checkpoint, packed export)
  stores one step size / zero point per contiguous group of input columns and no
  g_idx. Without act_order a group's qparams are computed when its first column
  comes up, from the group's *current* (already error-corrected) columns, as
  published. With act_order the columns run in another order, so the group
  qparams are computed from the weight before any update ("static groups", the
  published trick that keeps the contiguous layout; `static_groups: true` asks
  for the same without act_order). act_order with groups therefore always uses
  static groups.
- The published code computes a lazily determined group's qparams from the
  stored W, whose columns inside the current lazy batch have not yet received
  that batch's updates. Here the group's current values are used (the batch's
  own updates included), i.e. exactly the weights that are about to be rounded.
- Per-channel qparams are computed after the dead columns are zeroed.
- The lm_head is quantised with GPTQ too when the scheme quantises it (inputs:
  the final norm of the last quantised block's output).
- Not implemented: the published `mse` grid search of the clipping range, and
  non-integer formats (GPTQ here targets the integer grid of quant.numerics.grid).

Output: every linear becomes a trainable `QuantLinear` whose float weight is the
dequantised GPTQ weight (integer codes * step sizes, on the grid), so its
fake-quant forward, `integer_weight()` and `freeze()` reproduce the GPTQ codes
exactly and Block-AP / E2E / convert / evaluate take it as they take RTN's.
Unlike RTN's or AWQ's, that float weight is no longer the full-precision function, so
the layer also keeps the weight GPTQ started from (after QuaRot: the rotated one) as
its reference weight (`QuantLinear.keep_reference`): a block-wise step after GPTQ
starts from GPTQ's solution and trains against the original full-precision block,
not against GPTQ's own output (which gave a zero loss and no training). The reused
path (`options.results`) keeps it the same way.

Results (codes, step sizes, zero points per linear) are returned as
`gptq_results.safetensors` with the model fingerprint and weight scheme;
`options.results` reuses such a file: no calibration data, the same model bit for
bit, a file of another model or scheme refused before any work.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from quant.blockwise.cache import ActivationCache
from quant.blockwise.passes import call_block, capture_block_inputs, layer_kwargs, run_block
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
    decoder_layers,
    get_module,
    mapping_for,
    quantizable_linears,
    set_module,
)
from quant.models.moe import calibrate_all_tokens, starved_experts
from quant.modules.linear import QuantLinear
from quant.modules.rotation import move_input_rotation
from quant.numerics import grid as P

RESULTS_FILE = "gptq_results.safetensors"
RESULTS_VERSION = "1"


@dataclass(frozen=True)
class GPTQOptions(Config):
    block_size: int = 128  # columns per lazy batch update (published: 128)
    percdamp: float = 0.01  # dampening, as a fraction of mean(diag(H))
    act_order: bool = True  # columns by decreasing diag(H) (desc_act); implies static groups
    static_groups: bool = False  # group qparams from the weight before any update
    true_sequential: bool = True  # per block, H of each input group after the linears before it
    batch_size: int = 16  # calibration sequences per forward pass
    results: str | None = None  # gptq_results.safetensors (or a directory holding it) to reuse
    expert_min_tokens: int = 128  # MoE: an expert routed fewer calibration tokens gets the all-token Hessian

    def __post_init__(self) -> None:
        for name in ("block_size", "batch_size", "expert_min_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 < self.percdamp <= 1.0:
            raise ConfigError(f"percdamp={self.percdamp} must be in (0, 1] (published: 0.01)")


# ---------------------------------------------------------------------------
# One linear


class Hessian:
    """H = 2 X^T X / tokens of one input, accumulated over batches (float32)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.sum = torch.zeros(n, n, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / max(1, self.tokens))


@dataclass
class QuantizedLayer:
    """GPTQ's result for one linear: integer codes [out, in] (int32), step sizes and zero
    points [out, n_groups] (float32; zero point None on a symmetric grid), and the
    published loss sum((w - q)^2 / U_ii^2) / 2."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    loss: float = 0.0

    def weight(self, spec: WeightSpec) -> torch.Tensor:
        """The dequantised weight (float32): codes * steps, exactly what fake-quant gives."""
        return P.dequantize(self.codes, self.scale, self.zero_point, spec.format, spec.group_size)


def inverse_cholesky(h: torch.Tensor, percdamp: float, name: str = "linear") -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag(H))."""
    h = h.clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    low, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        low, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
    if int(info) != 0:
        raise RuntimeError(f"GPTQ: the Hessian of {name} is not positive definite after "
                           f"dampening; raise the gptq option percdamp (now {percdamp}) or use "
                           "more calibration data")
    return low


def _current_columns(w: torch.Tensor, w1: torch.Tensor, err: torch.Tensor, hinv: torch.Tensor,
                     i1: int, i: int, end: int) -> torch.Tensor:
    """Columns [i1 + i, end) of the weight as they stand now: inside the lazy batch they are
    in w1; beyond it they still lack the batch's updates so far (err @ U[batch, cols])."""
    i2 = i1 + w1.shape[1]
    inside = w1[:, i : min(end, i2) - i1]
    if end <= i2:
        return inside
    beyond = w[:, i2:end] - err[:, :i] @ hinv[i1 : i1 + i, i2:end]
    return torch.cat([inside, beyond], dim=1)


def _qparams(w: torch.Tensor, spec: WeightSpec, group_size: int):
    return P.choose_qparams(w, spec.format, group_size, spec.symmetric)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, h: torch.Tensor, spec: WeightSpec, options: GPTQOptions,
                  name: str = "linear") -> QuantizedLayer:
    """GPTQ of one weight [out, in] with Hessian h [in, in] onto `spec`'s integer grid."""
    w = weight.detach().float().clone()
    h = h.detach().float().clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    gs = cols if spec.group_size == P.PER_ROW else spec.group_size
    static = gs == cols or options.static_groups or options.act_order
    scale = torch.empty(rows, cols // gs, device=w.device)
    zp = None if spec.symmetric else torch.empty_like(scale)
    if static:  # contiguous groups of the weight before any update
        scale[:], z = _qparams(w, spec, spec.group_size)
        if zp is not None:
            zp[:] = z
    perm = torch.argsort(h.diagonal(), descending=True) if options.act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    group_of = [c // gs for c in (perm.tolist() if perm is not None else range(cols))]  # host list: no sync
    hinv = inverse_cholesky(h, options.percdamp, name)
    codes = torch.empty(rows, cols, dtype=torch.int32, device=w.device)
    loss = torch.zeros((), device=w.device)
    for i1 in range(0, cols, options.block_size):
        i2 = min(i1 + options.block_size, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % gs == 0:  # a group starts: qparams of its current columns
                s, z = _qparams(_current_columns(w, w1, err, hinv, i1, i, col + gs), spec, P.PER_ROW)
                scale[:, col // gs] = s[:, 0]
                if zp is not None:
                    zp[:, col // gs] = z[:, 0]
            k = group_of[col]
            s, z = scale[:, k : k + 1], None if zp is None else zp[:, k : k + 1]
            q = P.quantize(w1[:, i : i + 1], s, z, spec.format, P.PER_ROW)  # [rows, 1]
            wq = P.dequantize(q, s, z, spec.format, P.PER_ROW)[:, 0]
            codes[:, col] = q[:, 0]
            d = hinv1[i, i]
            e = (w1[:, i] - wq) / d
            loss += e.pow(2).sum() / 2
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]  # column i becomes wq
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedLayer(codes, scale, zp, float(loss))


@torch.no_grad()
def to_quant_linear(lin: nn.Linear, spec: WeightSpec, name: str, layer: QuantizedLayer) -> QuantLinear:
    """A trainable QuantLinear holding GPTQ's weight and qparams (online rotation carried over),
    and `lin`'s float weight as its reference weight (the full-precision function)."""
    ql = QuantLinear.from_linear(lin, spec, name)
    dev = ql.weight.device
    ql.keep_reference()  # lin's weight (QuaRot's rotated one after quarot), before it goes on the grid
    ql.weight.copy_(layer.weight(spec).to(dev, ql.weight.dtype))
    ql.scale.copy_(layer.scale)
    if ql.zero_point is not None:
        ql.zero_point.copy_(layer.zero_point)
    move_input_rotation(lin, ql)
    codes, _, _ = ql.integer_weight()
    if not torch.equal(codes, layer.codes.to(dev)):  # the float weight is on the grid
        raise RuntimeError(f"GPTQ: {name} in {ql.weight.dtype} does not reproduce its integer codes")
    return ql


# ---------------------------------------------------------------------------
# Saved results


@dataclass
class GPTQResults:
    """Per qualified linear name: codes, step sizes and zero points, of one model and scheme."""

    fingerprint: str
    spec: dict
    options: dict = field(default_factory=dict)
    layers: dict[str, QuantizedLayer] = field(default_factory=dict)
    capture_seconds: float = 0.0  # not saved: timing of the run that produced these
    block_seconds: list[float] = field(default_factory=list)
    starved_experts: int = 0  # not saved: MoE experts given the all-token Hessian

    def save(self, path: str | Path) -> None:
        tensors = {}
        for name, lay in self.layers.items():
            codes = lay.codes.to(torch.uint8 if lay.zero_point is not None else torch.int8)
            tensors[f"{name}.codes"] = codes.contiguous().cpu()
            tensors[f"{name}.scale"] = lay.scale.contiguous().cpu()
            if lay.zero_point is not None:
                tensors[f"{name}.zero_point"] = lay.zero_point.contiguous().cpu()
        meta = {"gptq_version": RESULTS_VERSION, "fingerprint": self.fingerprint,
                "weight_scheme": json.dumps(self.spec, sort_keys=True),
                "options": json.dumps(self.options, sort_keys=True),
                "losses": json.dumps({n: lay.loss for n, lay in self.layers.items()}, sort_keys=True)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str, spec: WeightSpec,
             where: str = "gptq") -> GPTQResults:
        """Read saved results, refusing a file of another model or weight scheme."""
        _, meta, tensors = read_results(
            path, RESULTS_FILE, "GPTQ", "gptq_version", RESULTS_VERSION, fingerprint, spec, where,
            missing=f"a {RESULTS_FILE} written by GPTQ, or null to quantise", redo="quantise again")
        saved_spec = json.loads(meta["weight_scheme"])
        losses = json.loads(meta.get("losses", "{}"))
        out = cls(fingerprint, saved_spec, json.loads(meta.get("options", "{}")))
        for key in tensors:
            if key.endswith(".codes"):
                name = key.removesuffix(".codes")
                out.layers[name] = QuantizedLayer(tensors[key].to(torch.int32), tensors[f"{name}.scale"],
                                                  tensors.get(f"{name}.zero_point"), losses.get(name, 0.0))
        return out

    def check_covers(self, targets: dict[str, nn.Linear], path: str) -> None:
        """Every target linear has codes of its shape (before any change to the model)."""
        for name, lin in targets.items():
            lay = self.layers.get(name)
            if lay is None or tuple(lay.codes.shape) != (lin.out_features, lin.in_features):
                raise ConfigError(f"{path}: no GPTQ codes of shape [{lin.out_features}, "
                                  f"{lin.in_features}] for {name}; the file does not match this model")


# ---------------------------------------------------------------------------
# Checks before any work


def input_stages(block: nn.Module, config, mapping: ArchMapping) -> list[list[tuple[str, ...]]]:
    """The block's linears grouped by the input they read, in execution order, stage by stage
    (`ArchMapping.input_stages`); they must cover every block linear once."""
    stages = mapping.input_stages(block, config)
    flat = [p for stage in stages for g in stage for p in g]
    if sorted(flat) != sorted(mapping.linears(block)):
        raise ConfigError(f"architecture mapping {mapping.family!r}: its scale groups {stages} "
                          f"must list every block linear {list(mapping.linears(block))} exactly once "
                          "(GPTQ shares one Hessian per group)")
    return stages


def check_scheme(scheme: QuantScheme, options: GPTQOptions, where: str = "gptq") -> None:
    """What GPTQ refuses before any model is loaded."""
    check_integer_scheme(scheme, "GPTQ", where)


def check_inputs(model: nn.Module, options: GPTQOptions, ctx: CalibrationContext) -> WeightSpec:
    """Refuse what GPTQ cannot do on this model and data, naming the field (no change to the
    model; the calibrate runner calls it before any step runs: QuaRot rotates after it)."""
    scheme = ctx.scheme
    check_scheme(scheme, options, ctx.where)
    for name, lin in quantizable_linears(model, scheme):  # group sizes divide every width
        if type(lin) is not nn.Linear:
            raise ConfigError(f"{name} is a {type(lin).__name__}, GPTQ needs a plain nn.Linear "
                              "(a full-precision model)")
    mapping = mapping_for(model)
    for block in decoder_layers(model, mapping):
        input_stages(block, model.config, mapping)
    check_calibration_ids(ctx, options.results, "GPTQ")
    return scheme.weight


# ---------------------------------------------------------------------------
# The model, block by block


@torch.no_grad()
def collect_hessians(block: nn.Module, paths: list[str], x: ActivationCache, kwargs: dict[str, Any],
                     batch_size: int) -> dict[str, torch.Tensor]:
    """H of the inputs of the modules `paths` over every sample of x, running the block. The
    hooks run after an online input rotation (its hook is prepended), so H is of the
    rotated inputs, which is what the rotated weight multiplies."""
    hess = {p: Hessian(get_module(block, p).in_features, x.device) for p in paths}
    hooks = [get_module(block, p).register_forward_pre_hook(lambda _m, a, p=p: hess[p].add(a[0]))
             for p in paths]
    try:
        for i in range(0, len(x), batch_size):
            call_block(block, x.get(i, i + batch_size), kwargs)
    finally:
        for hk in hooks:
            hk.remove()
    return {p: h.value() for p, h in hess.items()}


def quantize_block(block: nn.Module, prefix: str, x: ActivationCache, kwargs: dict[str, Any],
                   mapping: ArchMapping, spec: WeightSpec, options: GPTQOptions,
                   config=None) -> tuple[dict[str, QuantizedLayer], int]:
    """GPTQ every linear of one block in place (QuantLinears), stage by stage; returns the
    layers and the number of MoE experts given the all-token Hessian."""
    stages = input_stages(block, config, mapping)
    if not options.true_sequential:
        stages = [[g for stage in stages for g in stage]]
    out = {}
    with _calibrate_experts(block, mapping, x, kwargs, options) as starved:
        for stage in stages:
            hess = collect_hessians(block, [g[0] for g in stage], x, kwargs, options.batch_size)
            for g in stage:
                for path in g:
                    lin, name = get_module(block, path), f"{prefix}.{path}"
                    out[name] = gptq_quantize(lin.weight, hess[g[0]], spec, options, name)
                    set_module(block, path, to_quant_linear(lin, spec, name, out[name]))
    return out, starved


@contextmanager
def _calibrate_experts(block: nn.Module, mapping: ArchMapping, x: ActivationCache, kwargs: dict[str, Any],
                       options: GPTQOptions):
    """Inside: an MoE block's starved experts run on every token (quant.models.moe); yields how
    many (0 for a dense block)."""
    if not mapping.is_moe_block(block):
        yield 0
        return

    def run() -> None:
        for i in range(0, len(x), options.batch_size):
            call_block(block, x.get(i, i + options.batch_size), kwargs)

    starved, _ = starved_experts(block, mapping.moe.experts, run, options.expert_min_tokens)
    with calibrate_all_tokens(block, mapping.moe.experts, starved):
        yield len(starved)


@torch.no_grad()
def _quantize_lm_head(model: nn.Module, mapping: ArchMapping, x: ActivationCache, spec: WeightSpec,
                      options: GPTQOptions, device: torch.device) -> QuantizedLayer:
    norm, head = get_module(model, mapping.final_norm), get_module(model, mapping.lm_head)
    home = head.weight.device
    norm.to(device), head.to(device)
    hess = Hessian(head.in_features, device)
    rotation = getattr(head, "input_rotation", None)  # QuaRot norms: online rotates lm_head's input
    for i in range(0, len(x), options.batch_size):
        h = norm(x.get(i, i + options.batch_size))
        hess.add(h if rotation is None else rotation(h))
    layer = gptq_quantize(head.weight, hess.value(), spec, options, mapping.lm_head)
    set_module(model, mapping.lm_head, to_quant_linear(head, spec, mapping.lm_head, layer))
    norm.to(home), get_module(model, mapping.lm_head).to(home)
    return layer


def run_gptq(model: nn.Module, spec: WeightSpec, calib_ids: torch.Tensor, options: GPTQOptions,
             fingerprint: str, lm_head: bool, device: torch.device | None = None) -> GPTQResults:
    """Quantise every decoder block in order, one block on `device` at a time; block i's
    inputs are block i-1's outputs with its linears already quantised."""
    mapping = mapping_for(model)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = decoder_layers(model, mapping)
    home = next(model.parameters()).device
    results = GPTQResults(fingerprint, spec_dict(spec), options.to_dict())
    t = clock(device)
    dtype = next(layers[0].parameters()).dtype
    x = ActivationCache((*calib_ids.shape, model.config.hidden_size), dtype,
                        "gpu" if device.type == "cuda" else "cpu", device)
    capture_block_inputs(model, calib_ids, x, options.batch_size, device, mapping)
    per_block = layer_kwargs(model, calib_ids, device, mapping)
    results.capture_seconds = clock(device) - t
    for i, block in enumerate(layers):
        t = clock(device)
        block.to(device)
        layers_i, starved = quantize_block(block, f"{mapping.layers}.{i}", x, per_block[i], mapping, spec,
                                           options, model.config)
        results.layers |= layers_i
        results.starved_experts += starved
        run_block(block, x, x, per_block[i], options.batch_size, amp=False)  # next block's inputs
        block.to(home)
        results.block_seconds.append(clock(device) - t)
    if lm_head:
        results.layers[mapping.lm_head] = _quantize_lm_head(model, mapping, x, spec, options, device)
    model.to(home)  # capture_block_inputs parks the embedding on the host
    return results


@torch.no_grad()
def apply_results(model: nn.Module, spec: WeightSpec, saved: GPTQResults, names: list[str]) -> None:
    for name in names:
        set_module(model, name, to_quant_linear(get_module(model, name), spec, name, saved.layers[name]))


@register("gptq", kind="calibrate", options=GPTQOptions, role="quantizer", after=("quarot",),
          check=check_scheme, check_inputs=check_inputs,
          resolve=static_qparams, data=True)
@torch.no_grad()
def gptq(model: nn.Module, options: GPTQOptions, ctx: CalibrationContext) -> dict:
    """GPTQ on the weights, block by block with calibration data (in place).

    After QuaRot it runs on the rotated model with the online rotations installed, so the
    Hessians of o_proj / down_proj are of their rotated inputs (QuaRot's GPTQ variant).
    Returns metrics plus `files`: {RESULTS_FILE: writer(path)}."""
    scheme, where = ctx.scheme, ctx.where
    check_inputs(model, options, ctx)
    spec = scheme.weight
    targets = dict(quantizable_linears(model, scheme))
    fingerprint = model_fingerprint(model)
    t0 = time.time()
    if options.results is not None:
        results = GPTQResults.load(options.results, fingerprint, spec, where)
        results.check_covers(targets, options.results)
        apply_results(model, spec, results, list(targets))
    else:
        results = run_gptq(model, spec, ctx.calib_ids, options, fingerprint, scheme.quantize_lm_head)
    losses = [lay.loss for lay in results.layers.values()]
    return {
        "quantized_linears": float(len(targets)),
        "gptq_seconds": round(time.time() - t0, 2),
        "gptq_seconds_per_block": round(sum(results.block_seconds) / max(1, len(results.block_seconds)), 3),
        "gptq_reused": float(options.results is not None),
        "gptq_mean_loss": sum(losses) / max(1, len(losses)),
        "experts_all_token_calibrated": float(results.starved_experts),
        "files": {RESULTS_FILE: results.save},
    }
