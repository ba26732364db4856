"""Block-AP at paper scale (issue 15): forward passes, a 2-block 7B-shaped run, disk caches.

Shapes: Llama-2-7B (hidden 4096, MLP 11008, 32 heads, seq 2048), W2 g64
asymmetric, random init, batch 2. Three parts, each timed with CUDA syncs:

(a) Forward-only passes per batch, before and after. Before (`old_run_block`,
    kept here as it was): the fp target block rebuilt per block (deepcopy + H2D
    of fp32 weights), fp32 weights cast by autocast on every batch, a blocking
    copy back after every batch, no prefetch. After (the engine now): a
    device-resident fp workspace with bf16 linears loaded per block
    (`load_float_weights`), the next batch prefetched on a side stream, results
    copied back non_blocking on a write stream (one sync per pass), the block
    call compiled; with the caches in pinned host memory and on the GPU. The
    per-block set-up costs are reported apart from the per-batch times
    (bench_block_ap.py divides the old set-up by its 32 batches, which inflates
    its fp pass figure; docs/issues/issue-4.md says as much). The fp outputs of
    both paths are compared (eager: expected bitwise equal).
(b) A 2-block Llama-2-7B-shaped model through the engine (the block_ap stage's
    code) at --samples x 2048 tokens (paper: 4096), --epochs (paper: 2), with
    `cache: auto`: seconds of the input capture and of each block, split into
    target pass, training, next-input pass. Extrapolation to 32 blocks:
    capture + block 0 + 31 x block 1 (block 0 carries the one-time compiles of
    the step and of both forward passes, so block 1 is the steady state; every
    7B block has the same shapes and the same work). Embedding and LM head are
    not trained by Block-AP.
(c) The Block-AP step loop (`fit_block`, one epoch, --disk-samples samples)
    with both caches in pinned memory and on disk: disk read cold (the cache
    files' pages dropped from the page cache after writing, so every row comes
    from the device) and warm; the step-time ratio disk / pinned.

Usage (device): python benches/bench_block_ap_scale.py --json scale.json
                [--samples 4096] [--epochs 2] [--parts abc] [--cache-dir DIR]
CPU smoke run:  python benches/bench_block_ap_scale.py --small --json /tmp/scale.json
Imports only quant.*, torch and transformers (and bench_block_ap, beside it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_block_ap as base  # noqa: E402

from quant.blockwise.block_ap import BlockAP, BlockAPOptions, fit_block  # noqa: E402
from quant.blockwise.engine import (  # noqa: E402
    ActivationCache,
    BlockwiseContext,
    Prefetcher,
    autocast,
    call_block,
    cast_linears,
    float_block,
    forward_pass,
    load_float_weights,
    make_forward_fn,
    make_loss_fn,
)
from quant.calibrate.rtn import quantize_linears  # noqa: E402
from quant.config.scheme import QuantScheme  # noqa: E402

BLOCKS_7B = 32
VOCAB, GROUP = 32000, 64  # Llama-2's vocabulary; EfficientQAT's w2 g64
DEV = base.DEV


def sync() -> None:
    base.sync()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


@torch.no_grad()
def old_run_block(block, src: ActivationCache, dst: ActivationCache, kwargs, batch_size: int, amp: bool) -> None:
    """The forward pass as it was before issue 15: one batch at a time, a blocking copy back."""
    for i in range(0, len(src), batch_size):
        x = src.data[i : i + batch_size]
        x = x.to(src.device, non_blocking=x.is_pinned())
        with autocast(src.device, amp):
            y = call_block(block, x, kwargs)
        dst.data[i : i + y.shape[0]].copy_(y.to(dst.data.dtype), non_blocking=False)


def _filled(n: int, where: str, path: Path | None = None) -> ActivationCache:
    c = ActivationCache((n, base.SEQ, base.HIDDEN), torch.bfloat16, where, DEV, path)
    g = torch.Generator().manual_seed(0)
    with c.writer() as w:
        for i in range(0, n, 16):
            w.put(i, torch.randn((min(16, n - i), base.SEQ, base.HIDDEN), generator=g).to(torch.bfloat16))
    return c


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


# ---------------------------------------------------------------------------
# (a) forward passes


def part_a(samples: int, compile: bool) -> dict[str, object]:
    block, kwargs = base.make_block()
    base.quantize_block(block)  # on the host, fp32: what the engine's host model holds
    amp, bs = DEV.type == "cuda", base.BATCH
    batches = -(-samples // bs)
    src, dst_old, dst_new = _filled(samples, "cpu"), _filled(samples, "cpu"), _filled(samples, "cpu")
    out: dict[str, object] = {"samples": samples, "batches": batches}
    # before: float_block + H2D per block, then the sequential pass
    out["old_fp_setup_s"], out["old_fp_ms"] = _old_fp_pass(block, src, dst_old, kwargs)
    ws = copy.deepcopy(block).to(DEV)  # the engine's quantized workspace
    out["old_q_ms"] = timed(lambda: old_run_block(ws, src, dst_new, kwargs, bs, amp)) / batches * 1e3
    # after: the fp workspace (bf16 linears) loaded per block, pipelined passes, compiled calls
    fp_ws = float_block(block).to(DEV)
    if amp:
        cast_linears(fp_ws, torch.bfloat16)
    out["new_fp_load_s"] = timed(lambda: load_float_weights(fp_ws, block))
    prefetch = Prefetcher(DEV)
    fns = {"fp": make_forward_fn(fp_ws, kwargs, DEV, amp, compile), "q": make_forward_fn(ws, kwargs, DEV, amp, compile)}
    places = ["cpu"] + (["gpu"] if DEV.type == "cuda" else [])
    for where in places:
        s = src if where == "cpu" else _gpu_copy(src)
        d = dst_new if where == "cpu" else _gpu_copy(dst_new)
        for name, fn in fns.items():
            forward_pass(fn, s, d, bs, prefetch)  # warm-up (compile)
            t = timed(lambda fn=fn, s=s, d=d: forward_pass(fn, s, d, bs, prefetch))
            out[f"new_{name}_ms_{where}"] = t / batches * 1e3
        del s, d
    forward_pass(make_forward_fn(fp_ws, kwargs, DEV, amp, False), src, dst_new, bs, prefetch)
    out["fp_eager_new_vs_old_rel_err"] = _rel(dst_new.data, dst_old.data)
    if compile:
        forward_pass(fns["fp"], src, dst_new, bs, prefetch)
        out["fp_compiled_new_vs_old_rel_err"] = _rel(dst_new.data, dst_old.data)
    out["speedup_fp"] = out["old_fp_ms"] / out["new_fp_ms_cpu"]
    out["speedup_q"] = out["old_q_ms"] / out["new_q_ms_cpu"]
    return out


def _old_fp_pass(block, src: ActivationCache, dst: ActivationCache, kwargs) -> tuple[float, float]:
    """(seconds to build the fp block as before, ms per batch of the old pass, warm)."""
    sync()
    t = time.perf_counter()
    fp = float_block(block).to(DEV)
    sync()
    setup = time.perf_counter() - t
    amp, bs = DEV.type == "cuda", base.BATCH
    old_run_block(fp, src, dst, kwargs, bs, amp)  # warm-up (kernels, allocator)
    per_batch = timed(lambda: old_run_block(fp, src, dst, kwargs, bs, amp)) / -(-len(src) // bs) * 1e3
    return setup, per_batch


def _gpu_copy(c: ActivationCache) -> ActivationCache:
    g = ActivationCache(tuple(c.data.shape), c.data.dtype, "gpu", DEV)
    g.copy_from(c)
    return g


# ---------------------------------------------------------------------------
# (b) a 2-block 7B-shaped model through the engine


def build_model(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=base.HIDDEN, intermediate_size=base.MLP, num_attention_heads=base.HEADS,
                      num_key_value_heads=base.HEADS, num_hidden_layers=layers, vocab_size=VOCAB,
                      max_position_embeddings=base.SEQ, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    quantize_linears(model, QuantScheme.from_name("W2A16KV16", preset="efficientqat", group_size=GROUP))
    return model


def part_b(samples: int, val: int, epochs: int, cache: str, work: Path) -> dict[str, object]:
    model = build_model()
    ids = torch.randint(3, VOCAB, (samples + val, base.SEQ), generator=torch.Generator().manual_seed(0))
    options = BlockAPOptions(epochs=epochs, batch_size=base.BATCH, cache=cache)
    engine = BlockAP(model, ids[:samples], ids[samples:], options, BlockwiseContext(DEV, work, 0, "bench"), bits=2)
    phases: dict[str, list[float]] = {"target_pass": [], "train": [], "next_input_pass": []}
    _time_method(engine, "_advance_fp", phases["target_pass"])
    _time_method(engine.method, "train_block", phases["train"])
    _time_method(engine, "_advance_q", phases["next_input_pass"])
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    capture = timed(engine.capture)
    blocks = []
    for i in range(2):
        blocks.append(timed(lambda i=i: engine.train_block(i)))
    engine.finish()
    steady = blocks[1]
    out = {"samples": samples, "val_samples": val, "epochs": epochs, "cache": cache,
           "caches": engine.cache_placements(), "capture_s": capture, "block_s": blocks,
           "phases_s": phases, "steady_block_s": steady,
           "extrapolated_32_blocks_s": capture + blocks[0] + (BLOCKS_7B - 1) * steady,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else 0.0}
    return out


def _time_method(obj, name: str, into: list[float]) -> None:
    real = getattr(obj, name)

    def wrapper(*a, **kw):
        sync()
        t = time.perf_counter()
        r = real(*a, **kw)
        sync()
        into.append(time.perf_counter() - t)
        return r

    setattr(obj, name, wrapper)


# ---------------------------------------------------------------------------
# (c) the step loop with caches on disk vs pinned memory


def _drop_page_cache(c: ActivationCache) -> bool:
    """Write the file back and drop its pages, so the next reads come from the device."""
    os.fsync(c.fd)
    if not hasattr(os, "posix_fadvise"):
        return False
    os.posix_fadvise(c.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def part_c(samples: int, compile: bool, cache_dir: Path) -> dict[str, object]:
    block, kwargs = base.make_block()
    base.quantize_block(block)
    ws = block.to(DEV, torch.float32)
    loss_fn = make_loss_fn(ws, kwargs, DEV, DEV.type == "cuda", compile)
    opt = BlockAPOptions(epochs=1, batch_size=base.BATCH)
    prefetch = Prefetcher(DEV)
    steps = samples // base.BATCH

    def epoch(x: ActivationCache, y: ActivationCache, seed: int) -> float:
        return timed(lambda: fit_block(ws, loss_fn, x, y, opt, 2e-5, 1e-4, seed, prefetch)) / steps

    pin_x, pin_y = _filled(samples, "cpu"), _filled(samples, "cpu")
    epoch(pin_x, pin_y, 0)  # warm-up (compile)
    pinned = epoch(pin_x, pin_y, 1)
    disk_x, disk_y = (_filled(samples, "disk", cache_dir / f"{n}.bin") for n in ("x", "y"))
    cold = all([_drop_page_cache(disk_x), _drop_page_cache(disk_y)])
    disk_cold = epoch(disk_x, disk_y, 2)
    disk_warm = epoch(disk_x, disk_y, 3)
    return {"samples": samples, "steps": steps, "step_ms_pinned": pinned * 1e3,
            "step_ms_disk_cold": disk_cold * 1e3, "step_ms_disk_warm": disk_warm * 1e3,
            "page_cache_dropped": cold, "ratio_disk_cold": disk_cold / pinned,
            "ratio_disk_warm": disk_warm / pinned,
            "disk_read_gb_per_s_needed": 2 * base.BATCH * base.SEQ * base.HIDDEN * 2 / pinned / 1e9}


# ---------------------------------------------------------------------------


def main() -> None:
    global VOCAB, GROUP
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4096, help="(b) training samples (paper: 4096)")
    ap.add_argument("--val-samples", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="(b) epochs (paper: 2)")
    ap.add_argument("--cache", default="auto", choices=["auto", "gpu", "cpu", "disk"], help="(b) cache option")
    ap.add_argument("--pass-samples", type=int, default=256, help="(a) samples per timed forward pass")
    ap.add_argument("--disk-samples", type=int, default=512, help="(c) samples per timed epoch")
    ap.add_argument("--cache-dir", type=Path, default=None, help="(b, c) where disk caches go (default: a temp dir)")
    ap.add_argument("--parts", default="abc")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of this script)")
    args = ap.parse_args()
    if args.small:
        base.HIDDEN, base.MLP, base.HEADS, base.SEQ = 128, 256, 4, 64
        VOCAB, GROUP = 512, 32
        args.samples, args.val_samples, args.epochs = 16, 4, 1
        args.pass_samples, args.disk_samples = 16, 16
    elif DEV.type != "cuda":
        sys.exit("bench_block_ap_scale needs a CUDA GPU (or --small for a CPU smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    compile = DEV.type == "cuda" and not args.no_compile
    out: dict[str, object] = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
                              "torch": torch.__version__, "settings": {k: str(v) for k, v in vars(args).items()},
                              "shape": {"hidden": base.HIDDEN, "mlp": base.MLP, "heads": base.HEADS,
                                        "seq": base.SEQ, "batch": base.BATCH}}
    if args.cache_dir is not None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
        work = Path(tmp)
        if "a" in args.parts:
            out["a_forward_passes"] = part_a(args.pass_samples, compile)
            _free()
        if "b" in args.parts:
            out["b_engine"] = part_b(args.samples, args.val_samples, args.epochs, args.cache, work / "engine")
            _free()
        if "c" in args.parts:
            out["c_disk_vs_pinned"] = part_c(args.disk_samples, compile, work / "disk")
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=float))


def _free() -> None:
    import gc

    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def report(out: dict[str, object]) -> None:
    print(f"\n{out['device']}, torch {out['torch']}")
    if a := out.get("a_forward_passes"):
        print(f"(a) forward passes, ms per batch of {base.BATCH} ({a['batches']} batches):")
        print(f"  before: fp {a['old_fp_ms']:.2f}  q {a['old_q_ms']:.2f}   (+ fp block rebuilt per block: "
              f"{a['old_fp_setup_s']:.2f} s)")
        for where in ("cpu", "gpu"):
            if f"new_fp_ms_{where}" in a:
                print(f"  after, caches {where:<4}: fp {a[f'new_fp_ms_{where}']:.2f}  q {a[f'new_q_ms_{where}']:.2f}")
        print(f"  fp workspace loaded per block: {a['new_fp_load_s']:.2f} s; speed-up fp {a['speedup_fp']:.2f}x, "
              f"q {a['speedup_q']:.2f}x; fp new vs old rel. error {a['fp_eager_new_vs_old_rel_err']:.2e} eager"
              + (f", {a['fp_compiled_new_vs_old_rel_err']:.2e} compiled" if "fp_compiled_new_vs_old_rel_err" in a
                 else ""))
    if b := out.get("b_engine"):
        print(f"(b) 2 blocks through the engine, {b['samples']} x {base.SEQ} samples, {b['epochs']} epochs, "
              f"cache {b['cache']}:")
        for name, c in b["caches"].items():
            print(f"  cache {name:<8} -> {c['where']:<4} {c['reason']}")
        ph = b["phases_s"]
        print(f"  capture {b['capture_s']:.1f} s; blocks {', '.join(f'{s:.1f}' for s in b['block_s'])} s "
              f"(block 1: target pass {ph['target_pass'][1]:.1f}, train {ph['train'][1]:.1f}, "
              f"next inputs {ph['next_input_pass'][1]:.1f})")
        print(f"  32 blocks = capture + block 0 + 31 x block 1 = {b['extrapolated_32_blocks_s'] / 60:.1f} min; "
              f"peak GPU {b['peak_gpu_gib']:.1f} GiB")
    if c := out.get("c_disk_vs_pinned"):
        print(f"(c) step loop, {c['steps']} steps: pinned {c['step_ms_pinned']:.2f} ms, disk cold "
              f"{c['step_ms_disk_cold']:.2f} ms ({c['ratio_disk_cold']:.2f}x), warm {c['step_ms_disk_warm']:.2f} ms "
              f"({c['ratio_disk_warm']:.2f}x); page cache dropped: {c['page_cache_dropped']}; the step needs "
              f"{c['disk_read_gb_per_s_needed']:.2f} GB/s from disk")


if __name__ == "__main__":
    main()
