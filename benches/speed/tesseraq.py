"""TesseraQ speed and memory on Llama-2-7B-shaped blocks (GPU), through the real engine.

Shapes: hidden 4096, MLP 11008, 32 heads, seq 2048, W2 g64 asymmetric, random
init; the published TesseraQ settings (20 threshold steps, Adam lr 1e-3, batch
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
measured in block 1. The whole 7B model = 32 x that (+ the input capture, not
counted). Peak device memory is taken over blocks 1-2 (one block on the device
at a time, so it is the peak of a whole run apart from the input capture).

Usage (device): python benches/bench_tesseraq.py --out tesseraq_bench.json
CPU smoke run:  python benches/bench_tesseraq.py --small --out /tmp/tq.json
Imports only quant.*, torch and transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.blockwise.engine import BlockwiseContext, blockwise_methods  # noqa: E402
from quant.blockwise.tesseraq import TesseraQ, TesseraQStep  # noqa: E402
from quant.calibrate.rtn import quantize_linears  # noqa: E402
from quant.config.scheme import QuantScheme  # noqa: E402

PUBLISHED_ITERS, BLOCKS_7B = 250, 32


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def build(small: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hidden, mlp, heads = (64, 128, 4) if small else (4096, 11008, 32)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=3,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=1024,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval(), config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of this script)")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64, help="training windows in the cache")
    ap.add_argument("--val-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--iters-a", type=int, default=10)
    ap.add_argument("--iters-b", type=int, default=30)
    ap.add_argument("--cache", default="gpu", choices=["gpu", "cpu", "disk"])
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.small:
        sys.exit("bench_tesseraq needs a CUDA GPU (or --small for a CPU smoke run)")
    if args.small:
        args.seq_len, args.samples, args.val_samples = 32, 8, 2
        args.iters_a, args.iters_b, args.cache, args.group = 2, 4, "cpu", 32
    model, config = build(args.small)
    scheme = QuantScheme.from_name(f"W{args.bits}A16KV16", preset="efficientqat", group_size=args.group)
    quantize_linears(model, scheme)
    ids = torch.randint(3, config.vocab_size, (args.samples + args.val_samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    entry = blockwise_methods().get("tesseraq")
    options = entry.options.from_dict({"iterations": args.iters_a, "cache": args.cache,
                                       "compile": args.compile}, "block_ap.options")
    step_times: dict[int, list[float]] = {}
    real = TesseraQStep._train_step

    def timed(self, data, block, k):
        sync(dev)
        t = time.perf_counter()
        out = real(self, data, block, k)
        sync(dev)
        step_times.setdefault(block, []).append(time.perf_counter() - t)
        return out

    TesseraQStep._train_step = timed
    with tempfile.TemporaryDirectory() as work:
        ctx = BlockwiseContext(dev, Path(work), 0, "bench")
        engine = TesseraQ(model, ids[: args.samples], ids[args.samples :], options, ctx)
        t = time.perf_counter()
        engine.capture()
        sync(dev)
        capture_s = time.perf_counter() - t
        walls, infos = [], []
        for i in range(3):
            if i == 1 and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            if i == 2:  # same compiled step, more iterations per threshold step
                engine.method.opt = dataclasses.replace(options, iterations=args.iters_b)
            t = time.perf_counter()
            infos.append(engine.train_block(i))
            sync(dev)
            walls.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
        reserved = torch.cuda.max_memory_reserved(dev) / 2**30 if dev.type == "cuda" else 0.0
    ta, tb = (sum(step_times[b]) / len(step_times[b]) for b in (1, 2))
    per_iter = (tb - ta) / (args.iters_b - args.iters_a)
    fixed = ta - args.iters_a * per_iter
    n_steps = len(options.thresholds)
    block_s = walls[1] - sum(step_times[1]) + n_steps * (fixed + PUBLISHED_ITERS * per_iter)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "shape": {"hidden": config.hidden_size, "mlp": config.intermediate_size,
                                              "heads": config.num_attention_heads, "seq_len": args.seq_len},
        "scheme": scheme.name, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "published": {"thresholds": list(options.thresholds), "iterations": PUBLISHED_ITERS,
                      "batch_size": options.batch_size, "lr": options.lr, "scale_lr": options.scale_lr},
        "capture_s": round(capture_s, 3),
        "block_wall_s": [round(w, 3) for w in walls],
        "step_s_mean": {str(b): sum(v) / len(v) for b, v in step_times.items()},
        "seconds_per_iteration": per_iter, "fixed_seconds_per_step": fixed,
        "seconds_per_block_published": block_s,
        "hours_7b_published": BLOCKS_7B * block_s / 3600,
        "peak_allocated_gib": peak, "peak_reserved_gib": reserved,
        "val_mse": [(b["val_loss_init"], b["val_loss_trained"], b["kept"]) for b in infos],
        "extrapolation": "block = measured block-1 wall - its measured steps + 20 x (fixed + 250 x "
                         "per-iteration), per-iteration and fixed from the step means of blocks 1 and 2",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"TesseraQ {scheme.name} on a {config.hidden_size}/{config.intermediate_size} block, seq {args.seq_len}, "
          f"batch {options.batch_size}, {result['device']}")
    print(f"  per iteration {per_iter * 1e3:.2f} ms, fixed per step {fixed * 1e3:.1f} ms")
    print(f"  seconds per block at 20 x {PUBLISHED_ITERS} iterations: {block_s:.1f} s "
          f"(extrapolated; measured block walls {walls[1]:.1f} s at {args.iters_a}, {walls[2]:.1f} s at "
          f"{args.iters_b} iterations per step)")
    print(f"  7B model (32 blocks): {result['hours_7b_published']:.2f} h; peak device memory "
          f"{peak:.2f} GiB allocated, {reserved:.2f} GiB reserved")
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
