"""TesseraQ speed and memory on Llama-2-7B-shaped blocks (GPU), through the real engine.

Shapes: `--shape` (default llama-2-7b: hidden 4096, MLP 11008, 32 heads), seq 2048, W2 g64
asymmetric, random init; the published TesseraQ settings (20 threshold steps, Adam lr 1e-3, batch
4, dequantisation-scale tuning) except the number of iterations per step,
which is reduced so the run takes minutes. A 3-block model runs through
`quant.blockwise.tesseraq` exactly as the block_ap stage runs it (compiled
step, fused Adam, caches on the device by default):

- block 0: warm-up (torch.compile, allocator) at --iters-a iterations per step;
- block 1: --iters-a iterations per step; block 2: --iters-b per step.

Every threshold step is timed (CUDA-synchronised around `_train_step`, which
holds the optimiser set-up, the batch index draw and the iterations). From the
mean step times of blocks 1 and 2, per iteration = (t_b - t_a) / (iters_b -
iters_a) and per-step fixed cost = t_a - iters_a * per iteration. Seconds per
block at the published 250 iterations = block 1's wall time - its 20 measured
steps + 20 x (fixed + 250 x per iteration); everything else in a block (fp and
quantized chain passes, hardening, per-step validation, bake) is taken as
measured in block 1. The whole model = its layer count x that (+ the input capture, not
counted). Peak device memory is taken over blocks 1-2 (one block on the device
at a time, so it is the peak of a whole run apart from the input capture).

    python -m benches.speed.tesseraq          # GPU
    python -m benches.speed.tesseraq --small  # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from benches import common
from quant import methods
from quant.blockwise.engine import BlockwiseContext
from quant.blockwise.tesseraq import TesseraQ
from quant.calibrate.rtn import quantize_linears
from quant.config.scheme import QuantScheme

PUBLISHED_ITERS = 250


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(common.SHAPES))
    ap.add_argument("--scheme", default="W2g64")
    ap.add_argument("--samples", type=int, default=64, help="training windows in the cache")
    ap.add_argument("--val-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--iters-a", type=int, default=10)
    ap.add_argument("--iters-b", type=int, default=30)
    ap.add_argument("--cache", default="gpu", choices=["gpu", "cpu", "disk"])
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny shape, a few iterations")
    common.add_out_arg(ap, "speed-tesseraq")
    args = ap.parse_args(argv)
    if args.small:
        args.shape, args.scheme, args.seq_len, args.samples, args.val_samples = "tiny", "W2g32", 32, 8, 2
        args.iters_a, args.iters_b, args.cache = 2, 4, "cpu"
    common.require_cuda("speed.tesseraq", args.small)
    dev = common.device()
    model = common.build_model(args.shape, layers=3, vocab=1024)  # the vocabulary does not matter here
    scheme = QuantScheme.parse(args.scheme)
    quantize_linears(model, scheme)
    ids = torch.randint(3, 1024, (args.samples + args.val_samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    smoke = {"thresholds": [0.5, 0.2, 0.05]} if args.small else {}  # published: 20 steps
    options = methods.method("tesseraq", "blockwise").parse_options(
        {"iterations": args.iters_a, "cache": args.cache, "compile": args.compile, **smoke},
        "block_ap.steps[0].tesseraq")
    with tempfile.TemporaryDirectory() as work:
        engine = TesseraQ(model, ids[: args.samples], ids[args.samples :], options,
                          BlockwiseContext(dev, Path(work), 0, "bench"))
        steps = common.time_calls(engine.method, "_train_step")  # (data, block, k) per threshold step
        capture_s = common.seconds(engine.capture)
        walls, infos = [], []
        for i in range(3):
            if i == 1:
                common.reset_peak_memory()
            if i == 2:  # same compiled step, more iterations per threshold step
                engine.method.opt = dataclasses.replace(options, iterations=args.iters_b)
            wall, info = common.timed(lambda i=i: engine.train_block(i))
            walls.append(wall)
            infos.append(info)
        peak = common.peak_memory_gib()
        reserved = torch.cuda.max_memory_reserved(dev) / 2**30 if dev.type == "cuda" else None
    step_times = {b: [t for (_, blk, _), t in steps if blk == b] for b in range(3)}
    ta, tb = (sum(step_times[b]) / len(step_times[b]) for b in (1, 2))
    per_iter = (tb - ta) / (args.iters_b - args.iters_a)
    fixed = ta - args.iters_a * per_iter
    n_steps = len(options.thresholds)
    block_s = walls[1] - sum(step_times[1]) + n_steps * (fixed + PUBLISHED_ITERS * per_iter)
    layers = common.model_config(args.shape).num_hidden_layers
    cfg = model.config
    result = {
        "shape": {"name": args.shape, "hidden": cfg.hidden_size, "mlp": cfg.intermediate_size,
                  "heads": cfg.num_attention_heads, "seq_len": args.seq_len},
        "scheme": scheme.to_dict(),
        "published": {"thresholds": list(options.thresholds), "iterations": PUBLISHED_ITERS,
                      "batch_size": options.batch_size, "lr": options.lr, "scale_lr": options.scale_lr},
        "capture_s": round(capture_s, 3),
        "block_wall_s": [round(w, 3) for w in walls],
        "step_s_mean": {str(b): sum(v) / len(v) for b, v in step_times.items()},
        "seconds_per_iteration": per_iter, "fixed_seconds_per_step": fixed,
        "seconds_per_block_published": block_s,
        "hours_whole_model_published": layers * block_s / 3600, "layers": layers,
        "peak_allocated_gib": peak, "peak_reserved_gib": reserved,
        "val_mse": [(b["val_loss_init"], b["val_loss_trained"], b["kept"]) for b in infos],
        "extrapolation": f"block = measured block-1 wall - its measured steps + {n_steps} x (fixed + "
                         f"{PUBLISHED_ITERS} x per-iteration), per-iteration and fixed from the step means of "
                         "blocks 1 and 2",
    }
    path = common.write_result(args, result)
    print(f"TesseraQ {args.scheme} on a {cfg.hidden_size}/{cfg.intermediate_size} block, seq {args.seq_len}, "
          f"batch {options.batch_size}, {common.device_name()}")
    print(f"  per iteration {per_iter * 1e3:.2f} ms, fixed per step {fixed * 1e3:.1f} ms")
    print(f"  seconds per block at {n_steps} x {PUBLISHED_ITERS} iterations: {block_s:.1f} s "
          f"(extrapolated; measured block walls {walls[1]:.1f} s at {args.iters_a}, {walls[2]:.1f} s at "
          f"{args.iters_b} iterations per step)")
    print(f"  whole model ({layers} blocks): {result['hours_whole_model_published']:.2f} h; peak device memory "
          f"{peak} GiB allocated, {reserved} GiB reserved")
    common.say("wrote", path)


if __name__ == "__main__":
    main()
