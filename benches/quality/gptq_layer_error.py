"""Layer output error of GPTQ vs RTN on calibration and held-out inputs (CPU is fine).

Hooks capture the inputs of chosen linears of the full-precision model on
--samples x 512-token windows of calib.txt (the Hessian, and the "cal" error)
and on 4 x 512-token windows of a held-out text (the "heldout" error); each
linear is quantised alone by RTN and by GPTQ (with and without act_order), and
the MSE of x W^T is reported on both input sets. Shows whether GPTQ's gain on
the calibration inputs carries over, i.e. whether the calibration set is large
enough for the layer's Hessian.

    python benches/gptq_layer_error.py --model artifacts/prepare/model --data artifacts/prepare/data \
        --samples 8 --layers 3,15 --names self_attn.q_proj,mlp.down_proj
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.calibrate.gptq import GPTQOptions, Hessian, gptq_quantize  # noqa: E402
from quant.config.scheme import WeightSpec  # noqa: E402
from quant.data import sample_windows, tokenize_text  # noqa: E402
from quant.numerics import grid as P  # noqa: E402
from quant.numerics.formats import IntFormat  # noqa: E402


@torch.no_grad()
def inputs(model, ids: torch.Tensor, module) -> torch.Tensor:
    xs = []
    hook = module.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    for i in range(len(ids)):
        model(input_ids=ids[i : i + 1])
    hook.remove()
    return torch.cat(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--heldout", default="eval/lee.txt")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--layers", default="3,15")
    ap.add_argument("--names", default="self_attn.q_proj,mlp.down_proj")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    cal = sample_windows(tokenize_text(tok, (args.data / "calib.txt").read_text()), args.samples, 512, 0)
    held = sample_windows(tokenize_text(tok, (args.data / args.heldout).read_text()), 4, 512, 1)
    spec = WeightSpec(IntFormat(args.bits), args.group)
    out = {"command": " ".join(sys.argv), "columns": ["mse_calibration", "mse_heldout"]}
    for layer in map(int, args.layers.split(",")):
        for name in args.names.split(","):
            module = model.model.layers[layer].get_submodule(name)
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
            out[f"layer{layer}.{name}"] = row
            print(layer, name, row, flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
