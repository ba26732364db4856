"""Layer output error of GPTQ vs RTN on calibration and held-out inputs (CPU is fine).

Hooks capture the inputs of chosen linears of the full-precision model on
--samples x --seq-len windows of the calibration text (the Hessian, and the "cal" error)
and on 4 windows of a held-out evaluation text (the "heldout" error); each
linear is quantised alone by RTN and by GPTQ (with and without act_order), and
the MSE of x W^T is reported on both input sets. Shows whether GPTQ's gain on
the calibration inputs carries over, i.e. whether the calibration set is large
enough for the layer's Hessian.

    python -m benches.quality.gptq_layer_error --model artifacts/prepare/model --data artifacts/prepare/data \
        --samples 8 --layers 3,15 --names self_attn.q_proj,mlp.down_proj
    python -m benches.quality.gptq_layer_error --small     # CPU smoke run
"""

from __future__ import annotations

import argparse

import torch

from benches import common
from quant.calibrate.gptq import GPTQOptions, Hessian, gptq_quantize
from quant.config.scheme import WeightSpec
from quant.data import sample_windows, tokenize_text
from quant.models.arch import decoder_layers
from quant.numerics import grid as P
from quant.numerics.formats import IntFormat


@torch.no_grad()
def inputs(model, ids: torch.Tensor, module) -> torch.Tensor:
    xs = []
    hook = module.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    for i in range(len(ids)):
        model(input_ids=ids[i : i + 1])
    hook.remove()
    return torch.cat(xs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(ap)
    ap.add_argument("--heldout", default="lee", help="which evaluation text is held out")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", default="3,15")
    ap.add_argument("--names", default="self_attn.q_proj,mlp.down_proj")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    common.add_out_arg(ap, "quality-gptq_layer_error")
    args = ap.parse_args(argv)
    if args.small:
        args.samples, args.seq_len, args.layers = 2, 64, "0,1"
    common.set_threads(args.threads or 1)
    model, tok = common.load_fp_model(args.model, args.small)
    calib_text, evals = common.texts(args.data, args.small)
    cal = sample_windows(tokenize_text(tok, calib_text), args.samples, args.seq_len, 0)
    held = sample_windows(tokenize_text(tok, evals[args.heldout]), 4, args.seq_len, 1)
    spec = WeightSpec(IntFormat(args.bits), args.group)
    out = {"columns": ["mse_calibration", "mse_heldout"], "layers": {}}
    blocks = decoder_layers(model)
    for layer in map(int, args.layers.split(",")):
        for name in args.names.split(","):
            module = blocks[layer].get_submodule(name)
            xc, xh = inputs(model, cal, module), inputs(model, held, module)
            w = module.weight.detach()
            h = Hessian(w.shape[1], w.device)
            h.add(xc)
            scale, zp = P.choose_qparams(w, spec.format, spec.group_size, False)
            rtn = P.dequantize(P.quantize(w, scale, zp, spec.format, spec.group_size), scale, zp,
                               spec.format, spec.group_size)
            weights = {"rtn": rtn}
            for act in (False, True):
                lay = gptq_quantize(w, h.value(), spec, GPTQOptions(act_order=act))
                weights["gptq_act" if act else "gptq"] = lay.weight(spec)
            row = {k: [float((x @ wq.T - x @ w.T).pow(2).mean()) for x in (xc, xh)]
                   for k, wq in weights.items()}
            out["layers"][f"layer{layer}.{name}"] = row
            common.say(layer, name, row)
    common.say("wrote", common.write_result(args, out))


if __name__ == "__main__":
    main()
