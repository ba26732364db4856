"""Wall time of QuaRot (rotate, then RTN) on a Llama-2-7B-shaped random model.

Random weights (the arithmetic does not depend on their values) of `--shape` (default
llama-2-7b: hidden 4096, MLP 11008 = 172 x 64, 32 heads of 128, vocab 32000), built with
each of the `--layers` counts (e.g. 2,4). The `quarot` and `rtn` calibrate steps run as
the calibrate stage runs them (their registered functions, in turn). Per-block time =
the slope between the first two counts, fixed cost (embeddings, lm_head, norms) = the
intercept, and the time at the shape's layer count is extrapolated (and measured when
it is in the list). Also timed: the online Hadamard transforms alone at [tokens, n]
against the matmul of the linear they precede.

    python -m benches.speed.quarot --layers 2,4,32        # GPU
    python -m benches.speed.quarot --small                # CPU smoke run
"""

from __future__ import annotations

import argparse
import json

import torch

from benches import common
from quant import methods
from quant.calibrate import CalibrationContext
from quant.config.scheme import QuantScheme
from quant.modules.rotation import HadamardRotation
from quant.recipe import Step


def time_quarot(shape: str, layers: int, scheme: QuantScheme, steps: tuple[Step, ...],
                dtype: torch.dtype) -> dict[str, float]:
    """Seconds of each step (quarot, then rtn) on a fresh model of `layers` blocks."""
    model = common.build_model(shape, layers=layers, dtype=dtype, device=common.device())
    out = {}
    for i, step in enumerate(steps):
        ctx = CalibrationContext(scheme, None, 0, f"calibrate.steps[{i}].{step.method}", steps[:i])
        fn = methods.method(step.method, "calibrate").fn
        out[f"{step.method}_s"] = common.seconds(lambda fn=fn, step=step, ctx=ctx: fn(model, step.options, ctx))
    out["total_s"] = sum(out.values())
    return out


def time_online(n: int, out_features: int, tokens: int, dtype: torch.dtype, reps: int = 20) -> dict[str, float]:
    """Microseconds of an online Hadamard on [tokens, n] and of the [n -> out_features] matmul."""
    dev = common.device()
    x = torch.randn(tokens, n, device=dev, dtype=dtype)
    w = torch.randn(out_features, n, device=dev, dtype=dtype)
    rot = HadamardRotation(n, fp32=True).to(dev)
    return {"n": n, "tokens": tokens,
            "hadamard_us": common.median_seconds(lambda: rot(x), 1, reps) * 1e6,
            "linear_us": common.median_seconds(lambda: x @ w.t(), 1, reps) * 1e6}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(common.SHAPES))
    ap.add_argument("--layers", default="2,4", help="layer counts to build and time")
    ap.add_argument("--scheme", default="W4A4KV4")
    ap.add_argument("--preset", default="efficientqat", help="scheme preset: efficientqat | llm-qat")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--fuse-dtype", default="float64", help="QuaRot's weight-fusion arithmetic")
    ap.add_argument("--tokens", type=int, default=2048, help="rows of the online-transform timing")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: small shape, 1 and 2 layers")
    common.add_out_arg(ap, "speed-quarot")
    args = ap.parse_args(argv)
    if args.small:
        args.shape, args.layers, args.group, args.dtype, args.tokens = "small", "1,2", 64, "float32", 64
    dtype = getattr(torch, args.dtype)
    scheme = QuantScheme.from_name(args.scheme, preset=args.preset, group_size=args.group)
    steps = (Step("quarot", {"fuse_dtype": args.fuse_dtype}), Step("rtn"))
    cfg = common.model_config(args.shape)
    counts = [int(x) for x in args.layers.split(",")]
    runs = {}
    for n in counts:
        runs[n] = time_quarot(args.shape, n, scheme, steps, dtype)
        common.free_memory()
        common.say(n, "layers:", {k: round(v, 2) for k, v in runs[n].items()})
    res: dict = {"scheme": scheme.to_dict(), "runs": {str(k): v for k, v in runs.items()}}
    if len(counts) >= 2:
        a, b = counts[0], counts[1]
        per_block = (runs[b]["total_s"] - runs[a]["total_s"]) / (b - a)
        fixed = runs[a]["total_s"] - a * per_block
        res |= {"per_block_s": per_block, "fixed_s": fixed,
                f"extrapolated_{cfg.num_hidden_layers}_blocks_s": fixed + cfg.num_hidden_layers * per_block}
    res["online"] = [time_online(cfg.intermediate_size, cfg.hidden_size, args.tokens, dtype),
                     time_online(cfg.hidden_size, cfg.hidden_size, args.tokens, dtype)]
    path = common.write_result(args, res)
    print(json.dumps({k: v for k, v in res.items() if k != "scheme"}, indent=2))
    common.say("wrote", path)


if __name__ == "__main__":
    main()
