"""LLM-FP4 search (the calibrate step `fp-search`): exponent biases and FP formats, layer by layer.

What is searched, per decoder linear, as in LLM-FP4 (Liu et al., 2023; reference code
nbasyl/LLM-FP4, `FPPTQSLBatchingQuantLinear_fpq`):

- inputs: the full-precision inputs of the layer (blocks run in full precision,
  one after another), loss = MSE of the layer output against the fp output;
- `rounds` (3) rounds of: the weight bias per output channel (candidates
  b_init * gamma, gamma in linspace(0.01, 1.2, 100), every channel in parallel;
  one search per candidate weight format), then the activation per-tensor bias
  (candidates rho_init * gamma; one search per candidate activation format),
  then the weight format, then the activation format (every accepted format of
  the same bit width, e.g. E3M0/E2M1/E1M2 at 4 bits; each with its own biases);
- pre-shifted exponent bias (`pre_shift`): per input channel c, b_c is the
  min-max bias of the channel; only the shared rho is searched and channel c is
  quantized with bias rho + k_c, k_c = clamp(round(b_c) - round(rho), 0, 2^E - 1).
  Because Q_{rho+k}(x) = 2^-k Q_rho(2^k x), the layer computes
  Q_rho(x * 2^k) @ Q_w(W * 2^-k)^T: the factor 2^-k_c is folded into column c of
  the weight *before* weight quantization (what is stored), and the activation
  is quantized per tensor. In full precision the fold is exact.

Batching and cost. Weight-bias candidates are scored for all output channels at
once with the Gram form of the output error: with r = Y - Xq W^T (the error the
activation quantizer alone causes) and d = Q(W) - W, the error of row j is
||r_j||^2 - 2 d_j.(Xq^T r_j) + d_j^T (Xq^T Xq) d_j, exact on every calibration
token at a cost independent of the token count. Activation-bias and format
candidates need a forward per candidate; they are scored on a fixed random
subset of `search_tokens` calibration tokens (0 = all). This subset is a
deviation from the reference, which scores every token (and is far slower).

Results are written per block to `cache_dir` (when set) with a fingerprint of
the inputs (scheme, options, calibration ids); a re-run with the same
fingerprint reuses finished blocks instead of searching them again.

Mixture of experts: each expert's linears are searched on the tokens routed to that expert
(their scoring subset drawn from those); an expert with fewer than `expert_min_tokens`
routed tokens is searched on every token of the block (quant.models.moe), counted in
`experts_all_token_calibrated`. The router is not quantized.

Not implemented: the reference's bias correction (off for LLaMA in its
configs), search of the embedding / attention matmul (Q.K, S.V) quantizers,
and the pearson / gradient-weighted metrics (L2 only, the published choice).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quant.blockwise.cache import ActivationCache
from quant.blockwise.passes import capture_block_inputs, layer_kwargs
from quant.calibrate import CalibrationContext
from quant.config import Config, ConfigError
from quant.config.scheme import QuantScheme
from quant.io import atomic_dir
from quant.methods import register
from quant.models.arch import (
    decoder_layers,
    get_module,
    mapping_for,
    quantizable_linears,
    set_module,
)
from quant.models.moe import calibrate_all_tokens, starved_experts
from quant.modules.activation import CalibratedFPQuantizer, set_input_quantizer
from quant.modules.linear import QuantLinear
from quant.modules.rotation import move_input_rotation
from quant.numerics import fp as FP
from quant.numerics.formats import FPFormat, parse_format


@dataclass(frozen=True)
class FPSearchOptions(Config):
    rounds: int = 3
    candidates: int = 100  # gamma grid size
    gamma_min: float = 0.01
    gamma_max: float = 1.2
    pre_shift: bool = True  # pre-shifted per-channel activation bias
    search_format: bool = True  # search E/M among formats of the same bit width
    search_tokens: int = 4096  # tokens scoring activation/format candidates (0 = all)
    batch_size: int = 4  # calibration windows per block forward
    cache_dir: str = ""  # per-block results; a re-run with the same inputs reuses them
    device: str = ""  # "" = cuda when available, else cpu
    # where 2^-k of the pre-shift goes: "quantized" applies it to the quantized weight column
    # (the reference code's simulated function; measured better, docs/results/fp_formats_cpu.json); "weight"
    # folds it into the float weight before the weight is quantized
    fold: Literal["weight", "quantized"] = "quantized"
    tf32: bool = True  # TF32 matmuls while scoring on CUDA (2^-11 << the FP8/FP4 steps scored)
    seed: int = 0
    expert_min_tokens: int = 128  # MoE: an expert routed fewer calibration tokens is searched on all tokens

    def __post_init__(self) -> None:
        if self.expert_min_tokens < 1:
            raise ConfigError(f"expert_min_tokens={self.expert_min_tokens} must be >= 1")
        if self.rounds < 1 or self.candidates < 1 or self.batch_size < 1:
            raise ConfigError(f"rounds={self.rounds}, candidates={self.candidates} and "
                              f"batch_size={self.batch_size} must be >= 1")
        if not 0 < self.gamma_min < self.gamma_max:
            raise ConfigError(f"gamma_min={self.gamma_min}, gamma_max={self.gamma_max}: "
                              "need 0 < gamma_min < gamma_max")
        if self.search_tokens < 0:
            raise ConfigError(f"search_tokens={self.search_tokens} must be >= 0 (0 = all)")


def check_scheme(scheme: QuantScheme, options: FPSearchOptions | None = None, where: str = "fp-search") -> None:
    """fp-search needs FP weights per output channel and FP (or no) per-tensor activations."""
    w, a = scheme.weight, scheme.activation
    if w is None or not isinstance(w.format, FPFormat):
        got = None if w is None else w.format.spec()
        raise ConfigError(f"scheme.weight.format={got!r}: {where} searches FP formats; use one of "
                          "fp4-e2m1, fp4-e3m0, fp4-e1m2, fp6-e2m3, fp6-e3m2, fp8-e4m3, fp8-e5m2 "
                          "(mxfp4/nvfp4/int: use rtn)")
    if w.group_size != -1:
        raise ConfigError(f"scheme.weight.group_size={w.group_size}: {where} searches one bias "
                          "per output channel; use -1")
    if a is not None and not isinstance(a.format, FPFormat):
        raise ConfigError(f"scheme.activation.format={a.format.spec()!r}: {where} calibrates FP "
                          "activations; use an fp*-e*m* format or no activation quantization")
    if a is not None and a.granularity != "per_tensor":
        raise ConfigError(f"scheme.activation.granularity={a.granularity!r}: {where} calibrates a "
                          "static per-tensor activation bias; use per_tensor")


def check_inputs(model: nn.Module, options: FPSearchOptions, ctx: CalibrationContext) -> None:
    """Everything fp-search refuses, before any step changes the model."""
    check_scheme(ctx.scheme, options, ctx.where)
    if ctx.calib_ids is None:
        raise ConfigError(f"{ctx.where} needs calibration data (calibrate.samples x calibrate.seq_len "
                          "windows)")


# ---------------------------------------------------------------------------
# One linear layer


@dataclass
class LayerResult:
    w_fmt: FPFormat
    w_bias: torch.Tensor  # [out, 1]
    a_fmt: FPFormat | None
    rho: torch.Tensor | None  # []
    shift: torch.Tensor | None  # [in], integer-valued

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.w_bias": self.w_bias.cpu().contiguous()}
        if self.rho is not None:
            out[f"{prefix}.rho"] = self.rho.reshape(1).cpu()
        if self.shift is not None:
            out[f"{prefix}.shift"] = self.shift.cpu().contiguous()
        return out

    def formats(self) -> dict[str, str | None]:
        return {"weight": self.w_fmt.spec(), "activation": self.a_fmt and self.a_fmt.spec()}


def _fold(w: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
    return w if k is None else w * torch.exp2(-k)


def _quant_act(x: torch.Tensor, fmt: FPFormat | None, rho, k: torch.Tensor | None) -> torch.Tensor:
    x = x if k is None else x * torch.exp2(k)
    return x if fmt is None else FP.fake_quantize_fp(x, fmt, rho)


class LayerSearch:
    """The search state of one linear: biases per candidate format, current formats."""

    def __init__(self, w: torch.Tensor, x: torch.Tensor, xs: torch.Tensor, w_fmt: FPFormat,
                 a_fmt: FPFormat | None, opts: FPSearchOptions) -> None:
        # w: [out, in] fp32; x: [T, in] every calibration token; xs: [S, in] scoring subset
        self.w, self.x, self.xs, self.opts = w, x, xs, opts
        self.y, self.ys = x @ w.T, xs @ w.T
        self.gammas = torch.linspace(opts.gamma_min, opts.gamma_max, opts.candidates, device=w.device)
        self.w_fmt, self.a_fmt = w_fmt, a_fmt
        self.w_fmts = w_fmt.same_bits() if opts.search_format else (w_fmt,)
        self.a_fmts = () if a_fmt is None else (a_fmt.same_bits() if opts.search_format else (a_fmt,))
        ch_max = x.abs().amax(dim=0)  # [in]
        self.b_c = {f: FP.bias_for_absmax(ch_max, f) for f in self.a_fmts}
        self.rho0 = {f: self.b_c[f].min() for f in self.a_fmts}  # min-max over the tensor
        self.rho = dict(self.rho0)
        w0 = _fold(w, self.shift(a_fmt)) if opts.fold == "weight" else w
        self.w_bias0 = {f: FP.bias_for_absmax(w0.abs().amax(1, keepdim=True), f) for f in self.w_fmts}
        self.w_bias = dict(self.w_bias0)

    def shift(self, a_fmt: FPFormat | None, rho: torch.Tensor | None = None) -> torch.Tensor | None:
        """k_c = clamp(round(b_c) - round(rho), 0, 2^E - 1): [in], or [c, in] for rho [c]."""
        if a_fmt is None or not self.opts.pre_shift:
            return None
        rho = self.rho[a_fmt] if rho is None else rho
        k = torch.round(self.b_c[a_fmt]) - torch.round(rho).unsqueeze(-1)
        return k.clamp(0, 2**a_fmt.exponent - 1)

    def losses(self, w_fmt: FPFormat, a_fmt: FPFormat | None, rhos: torch.Tensor | None = None,
               chunk: int = 8) -> torch.Tensor:
        """Output MSE on the scoring tokens for formats (w_fmt, a_fmt), the current biases
        and each activation bias in `rhos` [c] (default: the current one): [c]."""
        if a_fmt is None:
            wq = FP.fake_quantize_fp(self.w, w_fmt, self.w_bias[w_fmt])
            return ((self.xs @ wq.T - self.ys) ** 2).mean().reshape(1)
        rhos = self.rho[a_fmt].reshape(1) if rhos is None else rhos
        out = []
        for i in range(0, len(rhos), chunk):
            rho = rhos[i : i + chunk]  # [c]
            k = self.shift(a_fmt, rho)  # [c, in] or None
            wq = self.quantized_weight(w_fmt, None if k is None else k[:, None, :])  # [c|1, out, in]
            xk = self.xs[None] if k is None else self.xs[None] * torch.exp2(k[:, None, :])  # [c|1, S, in]
            xq = FP.fake_quantize_fp(xk, a_fmt, rho[:, None, None])  # [c, S, in]
            out.append(((xq @ wq.transpose(1, 2) - self.ys[None]) ** 2).mean(dim=(1, 2)))
        return torch.cat(out)

    def quantized_weight(self, w_fmt: FPFormat, k: torch.Tensor | None) -> torch.Tensor:
        w, b = self.w[None], self.w_bias[w_fmt][None]
        if self.opts.fold == "weight":
            return FP.fake_quantize_fp(_fold(w, k), w_fmt, b)
        return _fold(FP.fake_quantize_fp(w, w_fmt, b), k)

    def loss(self, w_fmt: FPFormat, a_fmt: FPFormat | None) -> float:
        return float(self.losses(w_fmt, a_fmt)[0])

    def search_weight_bias(self, w_fmt: FPFormat, chunk: int = 8) -> None:
        k = self.shift(self.a_fmt)
        xq = _quant_act(self.x, self.a_fmt, self.a_fmt and self.rho[self.a_fmt], k)  # [T, in]
        if self.opts.fold == "weight":
            wf = _fold(self.w, k)
        else:  # the 2^-k stays outside the weight grid: put it on the quantized activation
            wf, xq = self.w, _fold(xq, k)
        r = self.y - xq @ wf.T  # [T, out]: error of the activation quantizer alone
        h, g = xq.T @ xq, (xq.T @ r).T  # [in, in], [out, in]
        best = torch.full((wf.shape[0],), float("inf"), device=wf.device)
        bias = self.w_bias[w_fmt].clone()
        for i in range(0, len(self.gammas), chunk):
            cand = self.w_bias0[w_fmt][None] * self.gammas[i : i + chunk, None, None]  # [c, out, 1]
            d = FP.fake_quantize_fp(wf[None], w_fmt, cand) - wf[None]  # [c, out, in]
            err = ((d @ h) * d).sum(-1) - 2 * (d * g[None]).sum(-1)  # [c, out]
            e_min, idx = err.min(dim=0)
            better = e_min < best
            best = torch.where(better, e_min, best)
            bias[better] = cand[idx[better], better]
        self.w_bias[w_fmt] = bias

    def search_act_bias(self, a_fmt: FPFormat) -> None:
        cands = self.rho0[a_fmt] * self.gammas
        self.rho[a_fmt] = cands[self.losses(self.w_fmt, a_fmt, cands).argmin()]

    def run(self) -> LayerResult:
        for _ in range(self.opts.rounds):
            for f in self.w_fmts:
                self.search_weight_bias(f)
            for f in self.a_fmts:
                self.search_act_bias(f)
            if len(self.w_fmts) > 1:
                self.w_fmt = min(self.w_fmts, key=lambda f: self.loss(f, self.a_fmt))
            if len(self.a_fmts) > 1:
                self.a_fmt = min(self.a_fmts, key=lambda f: self.loss(self.w_fmt, f))
        a = self.a_fmt
        return LayerResult(self.w_fmt, self.w_bias[self.w_fmt], a, a and self.rho[a], self.shift(a))


def apply_result(model: nn.Module, name: str, lin: nn.Linear, scheme: QuantScheme,
                 res: LayerResult, fold: str = "weight") -> QuantLinear:
    """Replace `lin` by a QuantLinear holding the searched state (weight folded by 2^-shift).
    An online input rotation (QuaRot) moves to the QuantLinear: it runs first (a pre-hook),
    so the searched quantizer and its shift act on the rotated input, the basis the search
    saw and the (rotation-fused) weight's columns are in."""
    spec = replace(scheme.weight, format=res.w_fmt)
    ql = QuantLinear.from_linear(lin, spec, name)
    dev = ql.weight.device
    with torch.no_grad():
        shift = None if res.shift is None else res.shift.to(dev)
        if fold == "weight":
            ql.weight.copy_(_fold(lin.weight.float(), shift).to(ql.weight.dtype))
        ql.exp_bias.copy_(res.w_bias)
    if res.a_fmt is not None:
        shift = None if res.shift is None else res.shift.to(dev)
        set_input_quantizer(ql, CalibratedFPQuantizer(res.a_fmt, res.rho.to(dev), shift,
                                                      unshift=fold == "quantized"))
    move_input_rotation(lin, ql)
    set_module(model, name, ql)
    return ql


# ---------------------------------------------------------------------------
# Cache of finished blocks


def fingerprint(scheme: QuantScheme, opts: FPSearchOptions, calib_ids: torch.Tensor,
                context: dict | None = None) -> str:
    """`context`: what else changed the searched model (QuaRot: its rotation options)."""
    h = hashlib.sha256()
    keep = {k: v for k, v in opts.to_dict().items() if k not in ("cache_dir", "device", "batch_size")}
    parts = [scheme.to_dict(), keep] + ([context] if context else [])
    h.update(json.dumps(parts, sort_keys=True).encode())
    h.update(calib_ids.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class BlockCache:
    def __init__(self, root: str, fp: str) -> None:
        self.root = Path(root) / fp if root else None

    def path(self, i: int) -> Path | None:
        return None if self.root is None else self.root / f"block_{i:04d}"

    def load(self, i: int, names: list[str]) -> dict[str, LayerResult] | None:
        p = self.path(i)
        if p is None or not (p / "formats.json").exists():
            return None
        fmts, t = json.loads((p / "formats.json").read_text()), load_file(str(p / "tensors.safetensors"))
        out = {}
        for n in names:
            a = fmts[n]["activation"]
            out[n] = LayerResult(parse_format(fmts[n]["weight"]), t[f"{n}.w_bias"],
                                 None if a is None else parse_format(a), t.get(f"{n}.rho", torch.zeros(1))[0]
                                 if a is not None else None, t.get(f"{n}.shift"))
        return out

    def save(self, i: int, results: dict[str, LayerResult]) -> None:
        p = self.path(i)
        if p is None:
            return
        tensors = {k: v for n, r in results.items() for k, v in r.tensors(n).items()}
        with atomic_dir(p) as tmp:
            save_file(tensors, str(tmp / "tensors.safetensors"))
            (tmp / "formats.json").write_text(json.dumps({n: r.formats() for n, r in results.items()}))


# ---------------------------------------------------------------------------
# The model


@torch.no_grad()
def _capture_linear_inputs(block: nn.Module, paths: tuple[str, ...], cache: ActivationCache,
                           kwargs: dict[str, Any], batch_size: int) -> dict[str, torch.Tensor]:
    """Run the fp block over the cache (in place: cache becomes the next block's input) and
    return every linear's input as [tokens, in] float32 on the device."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    hooks = [get_module(block, p).register_forward_pre_hook(
        lambda _m, args, p=p: seen[p].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for p in paths]
    try:
        for i in range(0, len(cache), batch_size):
            out = block(cache.get(i, i + batch_size), **kwargs)
            cache.put(i, (out[0] if isinstance(out, tuple) else out).to(cache.data.dtype))
    finally:
        for h in hooks:
            h.remove()
    return {p: torch.cat(v) for p, v in seen.items()}


@contextmanager
def _calibrate_experts(block: nn.Module, mapping, cache: ActivationCache, kwargs: dict[str, Any],
                       options: FPSearchOptions, searching: bool):
    """Inside: an MoE block's starved experts run on every token (quant.models.moe); yields how
    many (0 for a dense block, or a block only replayed from the results cache)."""
    if not searching or not mapping.is_moe_block(block):
        yield 0
        return

    def run() -> None:
        for i in range(0, len(cache), options.batch_size):
            block(cache.get(i, i + options.batch_size), **kwargs)

    ids, _ = starved_experts(block, mapping.moe.experts, run, options.expert_min_tokens)
    with calibrate_all_tokens(block, mapping.moe.experts, ids):
        yield len(ids)


@register("fp-search", kind="calibrate", options=FPSearchOptions, role="quantizer", after=("quarot",),
          check=check_scheme, check_inputs=check_inputs, data=True)
@torch.no_grad()
def fp_search(model: nn.Module, options: FPSearchOptions, ctx: CalibrationContext) -> dict[str, float]:
    """LLM-FP4 search of FP formats and exponent biases per layer (weights and activations).

    After QuaRot it runs on the rotated model with the online rotations installed: each
    linear's input is captured after its rotation, so the search scores the rotated inputs
    of o_proj / down_proj against their rotation-fused weights, and the pre-shift folded
    into weight column c lands on the column that multiplies rotated channel c. The steps
    before it (their options) go into the cache fingerprint."""
    check_inputs(model, options, ctx)
    context = {s.method: s.options.to_dict() for s in ctx.history} or None
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = options.tf32
    try:
        return _search_model(model, ctx.scheme, ctx.calib_ids, options, context)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _search_model(model: nn.Module, scheme: QuantScheme, calib_ids: torch.Tensor,
                  options: FPSearchOptions, context: dict | None) -> dict[str, float]:
    targets = dict(quantizable_linears(model, scheme))
    mapping = mapping_for(model)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    home = next(model.parameters()).device
    layers = decoder_layers(model, mapping)
    cache = BlockCache(options.cache_dir, fingerprint(scheme, options, calib_ids, context))
    paths_of = [mapping.linears(block) for block in layers]
    names = [[f"{mapping.layers}.{i}.{p}" for p in paths_of[i]] for i in range(len(layers))]
    done = {i: r for i in range(len(layers)) if (r := cache.load(i, names[i])) is not None}
    todo = [i for i in range(len(layers)) if i not in done]
    t0, searched, starved = time.perf_counter(), 0, 0
    gen = torch.Generator().manual_seed(options.seed)
    if todo:
        dtype = next(model.parameters()).dtype
        acts = ActivationCache((*calib_ids.shape, model.config.hidden_size), dtype, "gpu"
                               if device.type == "cuda" else "cpu", device)
        capture_block_inputs(model, calib_ids, acts, options.batch_size, device, mapping)
        per_block = layer_kwargs(model, calib_ids, device, mapping)
        n_tok = calib_ids.numel()
        subset = (torch.randperm(n_tok, generator=gen)[: options.search_tokens]
                  if 0 < options.search_tokens < n_tok else None)
        for i in range(max(todo) + 1):
            block = layers[i].to(device)
            paths = () if i in done else paths_of[i]
            with _calibrate_experts(block, mapping, acts, per_block[i], options, bool(paths)) as n:
                xs = _capture_linear_inputs(block, paths, acts, per_block[i], options.batch_size)
            starved += n
            if i in done:
                block.to(home)
                continue
            results = {}
            for path, name in zip(paths_of[i], names[i], strict=True):
                x = xs.pop(path)
                if x.shape[0] != n_tok:  # an expert's tokens: a scoring subset of its own
                    own = (torch.randperm(x.shape[0], generator=gen)[: options.search_tokens]
                           if 0 < options.search_tokens < x.shape[0] else None)
                    sub = x if own is None else x[own.to(device)]
                else:
                    sub = x if subset is None else x[subset.to(device)]
                w = get_module(block, path).weight.float()
                search = LayerSearch(w, x, sub, scheme.weight.format,
                                     scheme.activation and scheme.activation.format, options)
                results[name] = search.run()
                del x, sub, search
            cache.save(i, results)
            done[i] = results
            searched += 1
            block.to(home)
    for results in done.values():
        for name, res in results.items():
            apply_result(model, name, targets[name], scheme, res, options.fold)
    rest = [n for n in targets if n not in {n for r in done.values() for n in r}]  # e.g. lm_head
    for n in rest:
        ql = QuantLinear.from_linear(targets[n], scheme.weight, n)
        move_input_rotation(targets[n], ql)
        set_module(model, n, ql)
    model.to(home)
    fmts: dict[str, int] = {}
    for r in done.values():
        for res in r.values():
            key = f"formats/{res.w_fmt.spec()}_{res.a_fmt.spec() if res.a_fmt else 'a16'}"
            fmts[key] = fmts.get(key, 0) + 1
    return {"quantized_linears": float(len(targets)), "searched_blocks": float(searched),
            "cached_blocks": float(len(layers) - searched), "search_s": time.perf_counter() - t0,
            "experts_all_token_calibrated": float(starved),
            **{k: float(v) for k, v in fmts.items()}}
