"""Block-AP at paper scale: forward passes, a 2-block 7B-shaped run, disk caches (GPU).

Shapes: `--shape` (default llama-2-7b: hidden 4096, MLP 11008, 32 heads), seq 2048, W2 g64
asymmetric, random init, batch 2. Three parts, each timed with CUDA syncs:

(a) Forward-only passes per batch, before and after the engine's pipelining. Before
    (`old_run_block`, kept here as it was): the fp target block rebuilt per block
    (deepcopy + H2D of fp32 weights), fp32 weights cast by autocast on every batch, a
    blocking copy back after every batch, no prefetch. After (the engine now): a
    device-resident fp workspace with bf16 linears loaded per block
    (`load_float_weights`), the next batch prefetched on a side stream, results copied
    back non_blocking on a write stream (one sync per pass), the block call compiled;
    with the caches in pinned host memory and on the GPU. The per-block set-up costs are
    reported apart from the per-batch times. The fp outputs of both paths are compared
    (eager: expected bitwise equal).
(b) A 2-block model through the engine (the block_ap stage's code) at --samples x 2048
    tokens (paper: 4096), --epochs (paper: 2), with `cache: auto`: seconds of the input
    capture and of each block, split into target pass, training, next-input pass.
    Extrapolation to the shape's layer count N: capture + block 0 + (N - 1) x block 1
    (block 0 carries the one-time compiles of the step and of both forward passes, so
    block 1 is the steady state; every block has the same shapes and the same work).
    Embedding and LM head are not trained by Block-AP.
(c) The Block-AP step loop (`fit_block`, one epoch, --disk-samples samples) with both
    caches in pinned memory and on disk: disk read cold (the cache files' pages dropped
    from the page cache after writing, so every row comes from the device) and warm; the
    step-time ratio disk / pinned.

    python -m benches.scale.block_ap [--samples 4096] [--epochs 2] [--parts abc] [--cache-dir DIR]
    python -m benches.scale.block_ap --small          # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from benches import common
from benches.speed.block_ap import W2G64, Dims, quantize_block
from quant.blockwise.block_ap import BlockAP, BlockAPOptions, fit_block
from quant.blockwise.cache import ActivationCache, Prefetcher
from quant.blockwise.engine import BlockwiseContext
from quant.blockwise.passes import (
    autocast,
    call_block,
    cast_linears,
    float_block,
    forward_pass,
    load_float_weights,
    make_forward_fn,
    make_loss_fn,
)
from quant.calibrate.rtn import quantize_linears
from quant.config.scheme import QuantScheme

DEV = common.device()


@torch.no_grad()
def old_run_block(block, src: ActivationCache, dst: ActivationCache, kwargs, batch_size: int, amp: bool) -> None:
    """The forward pass as it was before the engine pipelined it: one batch at a time, a blocking copy back."""
    for i in range(0, len(src), batch_size):
        x = src.data[i : i + batch_size]
        x = x.to(src.device, non_blocking=x.is_pinned())
        with autocast(src.device, amp):
            y = call_block(block, x, kwargs)
        dst.data[i : i + y.shape[0]].copy_(y.to(dst.data.dtype), non_blocking=False)


def filled(n: int, dims: Dims, where: str, path: Path | None = None) -> ActivationCache:
    c = ActivationCache((n, dims.seq, dims.hidden), torch.bfloat16, where, DEV, path)
    g = torch.Generator().manual_seed(0)
    with c.writer() as w:
        for i in range(0, n, 16):
            w.put(i, torch.randn((min(16, n - i), dims.seq, dims.hidden), generator=g).to(torch.bfloat16))
    return c


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


# ---------------------------------------------------------------------------
# (a) forward passes


def part_a(shape: str, dims: Dims, samples: int, compile: bool) -> dict[str, Any]:
    block, kwargs = common.decoder_block(shape, dims.seq, DEV)
    quantize_block(block)  # on the host, fp32: what the engine's host model holds
    amp, bs = DEV.type == "cuda", dims.batch
    batches = -(-samples // bs)
    src, dst_old, dst_new = (filled(samples, dims, "cpu") for _ in range(3))
    out: dict[str, Any] = {"samples": samples, "batches": batches}
    # before: float_block + H2D per block, then the sequential pass (timed warm)
    out["old_fp_setup_s"], out["old_fp_ms"] = old_fp_pass(block, src, dst_old, kwargs, bs, amp)
    ws = copy.deepcopy(block).to(DEV)  # the engine's quantized workspace
    out["old_q_ms"] = common.seconds(lambda: old_run_block(ws, src, dst_new, kwargs, bs, amp)) / batches * 1e3
    # after: the fp workspace (bf16 linears) loaded per block, pipelined passes, compiled calls
    fp_ws = float_block(block).to(DEV)
    if amp:
        cast_linears(fp_ws, torch.bfloat16)
    out["new_fp_load_s"] = common.seconds(lambda: load_float_weights(fp_ws, block))
    prefetch = Prefetcher(DEV)
    fns = {"fp": make_forward_fn(fp_ws, kwargs, DEV, amp, compile), "q": make_forward_fn(ws, kwargs, DEV, amp, compile)}
    for where in ["cpu"] + (["gpu"] if DEV.type == "cuda" else []):
        s = src if where == "cpu" else gpu_copy(src)
        d = dst_new if where == "cpu" else gpu_copy(dst_new)
        for name, fn in fns.items():
            forward_pass(fn, s, d, bs, prefetch)  # warm-up (compile)
            t = common.seconds(lambda fn=fn, s=s, d=d: forward_pass(fn, s, d, bs, prefetch))
            out[f"new_{name}_ms_{where}"] = t / batches * 1e3
        del s, d
    forward_pass(make_forward_fn(fp_ws, kwargs, DEV, amp, False), src, dst_new, bs, prefetch)
    out["fp_eager_new_vs_old_rel_err"] = rel_err(dst_new.data, dst_old.data)
    if compile:
        forward_pass(fns["fp"], src, dst_new, bs, prefetch)
        out["fp_compiled_new_vs_old_rel_err"] = rel_err(dst_new.data, dst_old.data)
    out["speedup_fp"] = out["old_fp_ms"] / out["new_fp_ms_cpu"]
    out["speedup_q"] = out["old_q_ms"] / out["new_q_ms_cpu"]
    return out


def old_fp_pass(block, src: ActivationCache, dst: ActivationCache, kwargs, bs: int,
                amp: bool) -> tuple[float, float]:
    """(seconds to build the fp block as before, ms per batch of the old pass, warm)."""
    setup, fp = common.timed(lambda: float_block(block).to(DEV))
    old_run_block(fp, src, dst, kwargs, bs, amp)  # warm-up (kernels, allocator)
    return setup, common.seconds(lambda: old_run_block(fp, src, dst, kwargs, bs, amp)) / -(-len(src) // bs) * 1e3


def gpu_copy(c: ActivationCache) -> ActivationCache:
    g = ActivationCache(tuple(c.data.shape), c.data.dtype, "gpu", DEV)
    g.copy_from(c)
    return g


# ---------------------------------------------------------------------------
# (b) a 2-block model through the engine


def part_b(shape: str, dims: Dims, scheme: QuantScheme, samples: int, val: int, epochs: int, cache: str,
           work: Path) -> dict[str, Any]:
    model = common.build_model(shape, layers=2, max_position_embeddings=dims.seq)
    quantize_linears(model, scheme)
    vocab, layers = model.config.vocab_size, common.model_config(shape).num_hidden_layers
    ids = torch.randint(3, vocab, (samples + val, dims.seq), generator=torch.Generator().manual_seed(0))
    options = BlockAPOptions(epochs=epochs, batch_size=dims.batch, cache=cache)
    ctx = BlockwiseContext(DEV, work, 0, "bench")
    engine = BlockAP(model, ids[:samples], ids[samples:], options, ctx, bits=scheme.weight.bits)
    calls = {"target_pass": common.time_calls(engine, "_advance_fp"),
             "train": common.time_calls(engine.method, "train_block"),
             "next_input_pass": common.time_calls(engine, "_advance_q")}
    common.reset_peak_memory()
    capture = common.seconds(engine.capture)
    blocks = [common.seconds(lambda i=i: engine.train_block(i)) for i in range(2)]
    engine.finish()
    return {"samples": samples, "val_samples": val, "epochs": epochs, "cache": cache,
            "caches": engine.cache_placements(), "capture_s": capture, "block_s": blocks,
            "phases_s": {k: [t for _, t in v] for k, v in calls.items()}, "steady_block_s": blocks[1], "layers": layers,
            "extrapolated_s": capture + blocks[0] + (layers - 1) * blocks[1],
            "peak_gpu_gib": common.peak_memory_gib()}


# ---------------------------------------------------------------------------
# (c) the step loop with caches on disk vs pinned memory


def drop_page_cache(c: ActivationCache) -> bool:
    """Write the file back and drop its pages, so the next reads come from the device."""
    os.fsync(c.fd)
    if not hasattr(os, "posix_fadvise"):
        return False
    os.posix_fadvise(c.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def part_c(shape: str, dims: Dims, samples: int, compile: bool, cache_dir: Path) -> dict[str, Any]:
    block, kwargs = common.decoder_block(shape, dims.seq, DEV)
    quantize_block(block)
    ws = block.to(DEV, torch.float32)
    loss_fn = make_loss_fn(ws, kwargs, DEV, DEV.type == "cuda", compile)
    opt = BlockAPOptions(epochs=1, batch_size=dims.batch)
    prefetch = Prefetcher(DEV)
    steps = samples // dims.batch

    def epoch(x: ActivationCache, y: ActivationCache, seed: int) -> float:
        return common.seconds(lambda: fit_block(ws, loss_fn, x, y, opt, 2e-5, 1e-4, seed, prefetch)) / steps

    pin_x, pin_y = filled(samples, dims, "cpu"), filled(samples, dims, "cpu")
    epoch(pin_x, pin_y, 0)  # warm-up (compile)
    pinned = epoch(pin_x, pin_y, 1)
    disk_x, disk_y = (filled(samples, dims, "disk", cache_dir / f"{n}.bin") for n in ("x", "y"))
    cold = all([drop_page_cache(disk_x), drop_page_cache(disk_y)])
    disk_cold = epoch(disk_x, disk_y, 2)
    disk_warm = epoch(disk_x, disk_y, 3)
    return {"samples": samples, "steps": steps, "step_ms_pinned": pinned * 1e3,
            "step_ms_disk_cold": disk_cold * 1e3, "step_ms_disk_warm": disk_warm * 1e3,
            "page_cache_dropped": cold, "ratio_disk_cold": disk_cold / pinned,
            "ratio_disk_warm": disk_warm / pinned,
            "disk_read_gb_per_s_needed": 2 * dims.batch * dims.seq * dims.hidden * 2 / pinned / 1e9}


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(common.SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=4096, help="(b) training samples (paper: 4096)")
    ap.add_argument("--val-samples", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="(b) epochs (paper: 2)")
    ap.add_argument("--cache", default="auto", choices=["auto", "gpu", "cpu", "disk"], help="(b) cache option")
    ap.add_argument("--pass-samples", type=int, default=256, help="(a) samples per timed forward pass")
    ap.add_argument("--disk-samples", type=int, default=512, help="(c) samples per timed epoch")
    ap.add_argument("--cache-dir", type=Path, default=None, help="(b, c) where disk caches go (default: a temp dir)")
    ap.add_argument("--parts", default="abc")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: small shape and sample counts")
    common.add_out_arg(ap, "scale-block_ap")
    args = ap.parse_args(argv)
    scheme = W2G64
    if args.small:
        args.shape, args.seq, args.samples, args.val_samples, args.epochs = "small", 64, 16, 4, 1
        args.pass_samples, args.disk_samples = 16, 16
        scheme = QuantScheme.parse("W2g32")
    common.require_cuda("scale.block_ap", args.small)
    torch.backends.cuda.matmul.allow_tf32 = True
    compile = DEV.type == "cuda" and not args.no_compile
    dims = Dims.of(args.shape, args.seq)
    out: dict[str, Any] = {"dims": vars(dims), "scheme": scheme.to_dict()}
    if args.cache_dir is not None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
        if "a" in args.parts:
            out["a_forward_passes"] = part_a(args.shape, dims, args.pass_samples, compile)
            common.free_memory()
        if "b" in args.parts:
            out["b_engine"] = part_b(args.shape, dims, scheme, args.samples, args.val_samples, args.epochs,
                                     args.cache, Path(tmp) / "engine")
            common.free_memory()
        if "c" in args.parts:
            out["c_disk_vs_pinned"] = part_c(args.shape, dims, args.disk_samples, compile, Path(tmp) / "disk")
    report(out, dims)
    common.say("wrote", common.write_result(args, out))


def report(out: dict[str, Any], dims: Dims) -> None:
    print(f"\n{common.device_name()}, torch {torch.__version__}")
    if a := out.get("a_forward_passes"):
        print(f"(a) forward passes, ms per batch of {dims.batch} ({a['batches']} batches):")
        print(f"  before: fp {a['old_fp_ms']:.2f}  q {a['old_q_ms']:.2f}   (+ fp block rebuilt per block: "
              f"{a['old_fp_setup_s']:.2f} s)")
        for where in ("cpu", "gpu"):
            if f"new_fp_ms_{where}" in a:
                print(f"  after, caches {where:<4}: fp {a[f'new_fp_ms_{where}']:.2f}  q {a[f'new_q_ms_{where}']:.2f}")
        compiled = a.get("fp_compiled_new_vs_old_rel_err")
        print(f"  fp workspace loaded per block: {a['new_fp_load_s']:.2f} s; speed-up fp {a['speedup_fp']:.2f}x, "
              f"q {a['speedup_q']:.2f}x; fp new vs old rel. error {a['fp_eager_new_vs_old_rel_err']:.2e} eager"
              + (f", {compiled:.2e} compiled" if compiled is not None else ""))
    if b := out.get("b_engine"):
        print(f"(b) 2 blocks through the engine, {b['samples']} x {dims.seq} samples, {b['epochs']} epochs, "
              f"cache {b['cache']}:")
        for name, c in b["caches"].items():
            print(f"  cache {name:<8} -> {c['where']:<4} {c['reason']}")
        ph = b["phases_s"]
        print(f"  capture {b['capture_s']:.1f} s; blocks {', '.join(f'{s:.1f}' for s in b['block_s'])} s "
              f"(block 1: target pass {ph['target_pass'][1]:.1f}, train {ph['train'][1]:.1f}, "
              f"next inputs {ph['next_input_pass'][1]:.1f})")
        gpu = b["peak_gpu_gib"]
        print(f"  {b['layers']} blocks = capture + block 0 + {b['layers'] - 1} x block 1 = "
              f"{b['extrapolated_s'] / 60:.1f} min; peak GPU {gpu if gpu is None else round(gpu, 1)} GiB")
    if c := out.get("c_disk_vs_pinned"):
        print(f"(c) step loop, {c['steps']} steps: pinned {c['step_ms_pinned']:.2f} ms, disk cold "
              f"{c['step_ms_disk_cold']:.2f} ms ({c['ratio_disk_cold']:.2f}x), warm {c['step_ms_disk_warm']:.2f} ms "
              f"({c['ratio_disk_warm']:.2f}x); page cache dropped: {c['page_cache_dropped']}; the step needs "
              f"{c['disk_read_gb_per_s_needed']:.2f} GB/s from disk")


if __name__ == "__main__":
    main()
