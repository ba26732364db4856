"""Block-AP and TesseraQ seconds per block and peak memory on a dense and an MoE block (GPU).

Shapes: one decoder block of Qwen3-8B (`qwen3-8b`: hidden 4096, MLP 12288, GQA 32/8,
q/k norms) and of Qwen3-30B-A3B (`qwen3-30b-a3b`: hidden 2048, 128 experts of width 768,
8 per token), random init, weights W2 g64 (EfficientQAT's setting) from RTN. Each block
runs through the block-wise engine exactly as the `block_ap` stage runs it (a one-layer
model on the host in fp32; input capture, targets, training, next inputs, keep-the-better,
freeze), on `--samples` sequences of `--seq` tokens:

- Block-AP: `--epochs` epochs, batch 2;
- TesseraQ: `--thresholds` threshold steps of `--iterations` Adam steps, batch 4.

Reported per block and method: engine seconds for the block, peak GPU memory (allocated,
from the engine's start: workspaces, optimizer state, cached activations on the device)
and the seconds extrapolated to the published settings (Block-AP: 4096 samples x 2 epochs;
TesseraQ: 20 threshold steps x 250 iterations), from the measured time per sample-epoch /
per iteration. The MoE block shows what the engine's single copy of the experts costs
(docs/support.md, "Mixture of experts").

    python -m benches.speed.architectures [--samples 32] [--seq 2048]    # GPU
    python -m benches.speed.architectures --small                        # CPU smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benches import common

PAPER = {"block-ap": 4096 * 2, "tesseraq": 20 * 250}  # sample-epochs; iterations
SHAPES = ("qwen3-8b", "qwen3-30b-a3b")
SMALL_SHAPES = ("qwen3-small", "qwen3-moe-small")


def run_block(shape: str, method: str, args: argparse.Namespace, dev: torch.device) -> dict[str, float]:
    """One block of `shape` through the engine with `method`; seconds, peak memory, extrapolation."""
    import quant
    from quant.blockwise.engine import BlockwiseContext, reconstruct
    from quant.modules.linear import QuantLinear

    model = common.build_model(shape, layers=1, vocab=256, max_position_embeddings=max(args.seq, 64))
    recipe = quant.Recipe.parse(f"rtn+{method}:W2g64", options={method: options(method, args)})
    model, _ = quant.quantize(model, "rtn:W2g64", device="cpu")  # on the host, as the stage loads it
    # the block's quantized weights, counted before training freezes them into integer buffers
    weights = sum(m.in_features * m.out_features for m in model.model.layers[0].modules()
                  if isinstance(m, QuantLinear))
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(3, 256, (args.samples, args.seq), generator=gen)
    val = torch.randint(3, 256, (2, args.seq), generator=gen)
    common.free_memory()
    common.reset_peak_memory()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    with tempfile.TemporaryDirectory() as tmp:
        ctx = BlockwiseContext(dev, Path(tmp), 0, f"{shape}-{method}", train_ids=train, val_ids=val,
                               scheme=recipe.model_scheme)
        seconds, result = common.timed(lambda: reconstruct(model, recipe.blockwise, ctx))
    peak = torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else 0
    info = result.per_block[0]
    units = args.samples * args.epochs if method == "block-ap" else args.thresholds * args.iterations
    out = {"seconds": seconds, "engine_seconds": info["seconds"], "peak_gib": peak / 2**30,
           "units": units, "seconds_per_unit": info["seconds"] / units,
           "paper_scale_seconds": info["seconds"] / units * PAPER[method],
           "linear_weights": weights}
    if "experts_without_tokens" in info:
        out["experts_without_tokens"] = info["experts_without_tokens"]
    return out


def options(method: str, args: argparse.Namespace) -> dict:
    if method == "block-ap":
        return {"epochs": args.epochs, "batch_size": 2}
    steps = [round(0.8 - 0.3 * i / max(1, args.thresholds - 1), 3) for i in range(args.thresholds)]
    return {"thresholds": steps, "iterations": args.iterations, "batch_size": 4}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=32, help="training sequences per block")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=1, help="Block-AP epochs")
    ap.add_argument("--thresholds", type=int, default=2, help="TesseraQ threshold steps")
    ap.add_argument("--iterations", type=int, default=20, help="TesseraQ Adam steps per threshold")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny shapes, 4 x 32 tokens")
    common.add_out_arg(ap, "architectures")
    args = ap.parse_args(argv)
    if args.small:
        args.samples, args.seq, args.thresholds, args.iterations = 4, 32, 2, 2
    common.require_cuda("speed.architectures", args.small)
    dev = common.device()
    out: dict[str, dict] = {}
    for shape in SMALL_SHAPES if args.small else SHAPES:
        out[shape] = {}
        for method in ("block-ap", "tesseraq"):
            r = run_block(shape, method, args, dev)
            out[shape][method] = r
            common.say(f"{shape} {method}: {r['engine_seconds']:.1f} s/block, peak {r['peak_gib']:.2f} GiB, "
                       f"{r['paper_scale_seconds'] / 60:.1f} min/block at the published settings")
            common.free_memory()
            common.write_result(args, {"device": common.device_name(dev), "blocks": out})  # a cut run keeps its blocks
    common.say("wrote", common.write_result(args, {"device": common.device_name(dev), "blocks": out}))


if __name__ == "__main__":
    main()
