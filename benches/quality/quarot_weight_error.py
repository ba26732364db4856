"""Where QuaRot + RTN loses weight precision: per-linear errors on real activations, and PPL of
QuaRot's two norm treatments (`norms: fuse | online`) on held-out calibration windows.

Weights are rounded to nearest with the scheme's weight spec (default: llm-qat W4, symmetric
min-max per output channel). For every decoder linear and every weight variant (the original
weight; the norm-fused weight, RMSNorm scale multiplied in; QuaRot with `norms: fuse`, fused and
rotated; QuaRot with `norms: online`, scale kept and the reader's input rotated online):

- weight SQNR (dB) of W against RTN(W);
- relative output error ||X (RTN(W) - W)^T|| / ||X W^T|| on the linear's real input X (what the
  variant's weight multiplies: x * g, x / rms(x) Q, (x * g) H, ...), calibration windows;
- for the readers of a norm, the share of that error that passes through the "massive" residual
  channels (those holding more than --massive of the normalised residual's energy on average),
  each at the place the variant puts it (e_c Q, e_c H, e_c).

Then PPL on held-out windows of the calibration text (its last 5%, which calibration never
samples; never the evaluation texts), each model made by the library (`quant.calibrate.calibrate`)
under the whole scheme (activation / KV quantizers attached): fp, `rtn`, `quarot+rtn` with
`norms: fuse` and with `norms: online`. `--ablation` adds the two diagnostics that name the
cause (weights rounded here, off the library path): RTN of the norm-fused weights, and QuaRot
(`fuse`) + RTN with the readers' rounding error along the rotated massive channels removed
(off the grid: a diagnostic, not a method).

    python -m benches.quality.quarot_weight_error --model artifacts/prepare/model \\
        --data artifacts/prepare/data --scheme W4A8KV4 --seq-len 2048
    python -m benches.quality.quarot_weight_error --small     # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy

import torch

from benches import common
from quant.calibrate import calibrate
from quant.calibrate.quarot import QuaRotOptions, fuse_norms, rotate, untie_embeddings
from quant.config.scheme import QuantScheme
from quant.data import tokenize_text, windows
from quant.eval.ppl import perplexity
from quant.models.arch import decoder_layers, get_module, mapping_for
from quant.modules.runtime import apply_runtime_quantizers
from quant.numerics import grid as P
from quant.numerics import hadamard as had
from quant.recipe import Step

READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WEIGHTS = ("original", "fused", "quarot_fuse", "quarot_online")


def rtn(w: torch.Tensor, spec) -> torch.Tensor:
    """Min-max round to nearest, as a dynamic_minmax QuantLinear computes it."""
    return P.fake_quantize_dynamic(w.float(), spec.format, spec.group_size, spec.symmetric)


def sqnr_db(w: torch.Tensor, q: torch.Tensor) -> float:
    return round(10 * torch.log10(w.pow(2).sum() / (w - q).pow(2).sum()).item(), 2)


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


@torch.no_grad()
def output_errors(model, ids, spec, dirs: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per linear: ||X E^T|| / ||X W^T|| over the tokens of `ids` (E = RTN(W) - W, X after any
    online input rotation: these hooks run after it); for readers the share of ||X E^T||^2 that
    passes through span(dirs) ([k, hidden], orthonormal rows)."""
    acc: dict[str, list[float]] = {}

    def hook(mod, args, name):
        x = args[0].reshape(-1, args[0].shape[-1]).float()  # x: [T, in]
        w = mod.weight.float()
        e = rtn(w, spec) - w
        a = acc.setdefault(name, [0.0, 0.0, 0.0])
        a[0] += (x @ e.t()).pow(2).sum().item()
        a[1] += (x @ w.t()).pow(2).sum().item()
        if x.shape[-1] == dirs.shape[1]:
            a[2] += ((x @ dirs.t()) @ (dirs @ e.t())).pow(2).sum().item()

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: hook(mod, a, n)) for n, m in linears(model).items()]
    for row in ids:
        model(input_ids=row[None], use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for n, (err, sig, through) in acc.items():
        out[n] = {"rel_out_err": round((err / sig) ** 0.5, 4)}
        if n.endswith(READERS):
            out[n]["share_through_massive"] = round(through / err, 3)
    return out


@torch.no_grad()
def massive_channels(model, ids, threshold: float) -> dict:
    """Energy share of each channel of the normalised residual x / rms(x), averaged over every
    norm input and the tokens of one window; the channels above `threshold`, with their
    statistics and norm scales."""
    m = mapping_for(model)
    norms = [(f"{i}.{p}", get_module(b, p)) for i, b in enumerate(decoder_layers(model, m))
             for p in (m.input_norm, m.mlp_norm)]
    stats: dict[str, torch.Tensor] = {}

    def hook(_mod, args, name):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        stats[name] = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))

    hooks = [nrm.register_forward_pre_hook(lambda mod, a, n=n: hook(mod, a, n)) for n, nrm in norms]
    model(input_ids=ids[:1], use_cache=False)
    for h in hooks:
        h.remove()
    share = torch.stack([x.pow(2).mean(0) / x.pow(2).mean(0).sum() for x in stats.values()]).mean(0)
    chans = [int(c) for c in torch.nonzero(share > threshold).flatten()]
    per_channel = {}
    for c in chans:
        xs = torch.cat([x[:, c] for x in stats.values()])
        scales = {kind: [round(float(get_module(b, p).weight[c]), 4) for b in decoder_layers(model, m)]
                  for kind, p in (("input_norm", m.input_norm), ("mlp_norm", m.mlp_norm))}
        per_channel[c] = {"energy_share": round(float(share[c]), 3), "mean": round(float(xs.mean()), 2),
                          "std": round(float(xs.std()), 2), "norm_scales": scales}
    return {"channels": chans, "threshold": threshold, "per_channel": per_channel,
            "energy_share_together": round(float(share[chans].sum()), 3)}


def weight_variants(fp, scheme: QuantScheme) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """name -> (full-precision model holding that weight variant, the rotation R of the readers'
    input basis: a massive channel c lies along row c of R)."""
    hidden = fp.config.hidden_size
    eye = torch.eye(hidden, dtype=torch.float64)
    fused = copy.deepcopy(fp)
    m = mapping_for(fused)
    untie_embeddings(fused, m)
    fuse_norms(fused, m, torch.float64)
    out = {"original": (fp, eye), "fused": (fused, eye)}
    weights_only = QuantScheme(weight=scheme.weight, quantize_lm_head=scheme.quantize_lm_head)
    for norms in ("fuse", "online"):
        model = copy.deepcopy(fp)
        rotate(model, weights_only, QuaRotOptions(norms=norms))
        r = (had.random_hadamard(hidden, QuaRotOptions().seed, torch.float64) if norms == "fuse"
             else had.hadamard_transform(eye, hidden))
        out[f"quarot_{norms}"] = (model, r)
    return out


@torch.no_grad()
def quantize_weights(model, spec, keep_off: torch.Tensor | None = None) -> None:
    """RTN every decoder linear in place; with `keep_off` ([k, in] orthonormal rows) the readers'
    rounding error loses its component along those rows (diagnostic, off the grid)."""
    for n, lin in linears(model).items():
        w = lin.weight.float()
        q = rtn(w, spec)
        if keep_off is not None and n.endswith(READERS):
            e = q - w
            q = w + e - (e @ keep_off.t()) @ keep_off
        lin.weight.copy_(q.to(lin.weight.dtype))


def library_models(fp, scheme: QuantScheme):
    """label -> a model made by the calibrate runner (the stage's code), lazily."""
    recipes = {"rtn": (Step("rtn"),),
               "quarot_rtn_fuse": (Step("quarot", QuaRotOptions(norms="fuse")), Step("rtn")),
               "quarot_rtn_online": (Step("quarot", QuaRotOptions(norms="online")), Step("rtn"))}
    for label, steps in recipes.items():
        model = copy.deepcopy(fp)
        calibrate(model, scheme, steps)  # rtn needs no calibration data
        yield label, model


def ablation_models(fp, scheme: QuantScheme, chans: list[int]):
    """The diagnostics, weights rounded here under the whole scheme (QuaRot's online rotations
    and the activation / KV quantizers as the library installs them)."""
    fused = copy.deepcopy(fp)
    m = mapping_for(fused)
    untie_embeddings(fused, m)
    fuse_norms(fused, m, torch.float64)
    quantize_weights(fused, scheme.weight)
    apply_runtime_quantizers(fused, scheme)
    yield "rtn_of_fused_weights", fused
    del fused
    rotated = copy.deepcopy(fp)
    rotate(rotated, scheme, QuaRotOptions(norms="fuse"))
    q = had.random_hadamard(fp.config.hidden_size, QuaRotOptions().seed, torch.float64)
    quantize_weights(rotated, scheme.weight, q[chans].float())
    apply_runtime_quantizers(rotated, scheme)
    yield "quarot_rtn_fuse_massive_error_removed", rotated


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(ap)
    ap.add_argument("--scheme", default="W4A16KV16", help="scheme text (QuantScheme.from_name)")
    ap.add_argument("--preset", default="llm-qat")
    ap.add_argument("--group", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--error-windows", type=int, default=2, help="calibration windows for the error stats")
    ap.add_argument("--ppl-windows", type=int, default=2, help="held-out calibration windows for PPL")
    ap.add_argument("--massive", type=float, default=0.05, help="energy share of a massive channel")
    ap.add_argument("--ablation", action="store_true", help="add the two diagnostic PPL rows")
    common.add_out_arg(ap, "quality-quarot_weight_error")
    args = ap.parse_args(argv)
    if args.small:
        args.seq_len, args.error_windows, args.ppl_windows, args.massive = 64, 1, 1, 0.02
    common.set_threads(args.threads)
    run(args)


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    scheme = QuantScheme.from_name(args.scheme, preset=args.preset, group_size=args.group)
    spec = scheme.weight
    fp, tok = common.load_fp_model(args.model, args.small)
    calib_text, _ = common.texts(args.data, args.small)  # the evaluation texts are never read
    calib = tokenize_text(tok, calib_text)
    cut = int(calib.numel() * 0.95)  # as benches.quality.recipes: calibration samples the first 95%
    err_ids = windows(calib[:cut], args.seq_len, args.error_windows)
    held = windows(calib[cut:], args.seq_len, args.ppl_windows)
    res: dict = {"scheme": scheme.to_dict(), "windows": {"errors": list(err_ids.shape), "ppl": list(held.shape)}}
    res["massive"] = massive_channels(fp, err_ids, args.massive)
    chans = res["massive"]["channels"]
    common.say("massive channels", chans, res["massive"]["energy_share_together"])

    variants = weight_variants(fp, scheme)
    per_linear: dict[str, dict] = {n: {} for n in linears(fp)}
    for label, (model, r) in variants.items():
        errs = output_errors(model, err_ids, spec, r[chans].float())
        for n, lin in linears(model).items():
            per_linear[n][label] = {"sqnr_db": sqnr_db(lin.weight, rtn(lin.weight, spec)), **errs[n]}
        common.say("errors", label)
    res["per_linear"] = per_linear
    res["mean_by_kind"] = {}
    for kind in (*READERS, "o_proj", "down_proj"):
        rows = [v for n, v in per_linear.items() if n.endswith(kind)]
        res["mean_by_kind"][kind] = {
            label: {k: round(sum(r[label][k] for r in rows) / len(rows), 4) for k in rows[0][label]}
            for label in WEIGHTS}
        common.say(kind, res["mean_by_kind"][kind])

    def ppl(model) -> float:
        return round(perplexity(model, held.reshape(-1), args.seq_len, 1).ppl, 3)

    res["ppl_heldout_calib"] = {"fp": ppl(fp)}
    common.say("fp", res["ppl_heldout_calib"]["fp"])
    for label, model in library_models(fp, scheme):
        res["ppl_heldout_calib"][label] = ppl(model)
        common.say(label, res["ppl_heldout_calib"][label])
        del model
        common.write_result(args, res)
    if args.ablation:
        for label, model in ablation_models(fp, scheme, chans):
            res["ppl_heldout_calib"][label] = ppl(model)
            common.say(label, res["ppl_heldout_calib"][label])
            del model
    common.say("wrote", common.write_result(args, res))


if __name__ == "__main__":
    main()
