"""Block-AP training speed and memory on one Llama-2-7B-shaped block (GPU).

Shapes: hidden 4096, MLP 11008, 32 heads, batch 2 x 2048 tokens, weights w2 g64
asymmetric, random init. Everything is measured in one run, on one device:

- bf16 matmul peak: 8192^3 products (the ceiling the step is compared with);
- plain bf16 forward+backward of the same block without quantizers (bf16
  weights with gradients, MSE loss), eager and compiled;
- the Block-AP training step exactly as quant.blockwise.block_ap runs it (`fit_block`:
  fp32 master weights, bf16 autocast, fake-quant, AdamW, cosine, next batch
  prefetched from pinned host memory), eager and compiled, cache on host;
- forward-only passes (targets through the full-precision block, next inputs
  through the quantized block) to extrapolate seconds per block at paper scale
  (4096 x 2048 samples, 2 epochs, batch 2);
- peak device memory of a whole block cycle (fp targets, training, q forward):
  with the cached activations on the host, Block-AP holds one block at a time,
  so this is the peak of a whole 7B run apart from the first block's input
  capture (embedding + one block forward).

The forward passes at scale (set-up apart from per-batch cost, before/after
issue 15), a 2-block 7B-shaped run through the engine at the paper's sample
count and disk vs pinned caches: benches/bench_block_ap_scale.py.

Usage: python benches/bench_block_ap.py [--samples 64] [--no-compile] [--json out.json]
Imports only quant.*, torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.blockwise.block_ap import BlockAPOptions, fit_block  # noqa: E402
from quant.blockwise.engine import (  # noqa: E402
    ActivationCache,
    Prefetcher,
    float_block,
    make_loss_fn,
    run_block,
)
from quant.blockwise.engine import call_block as _call  # noqa: E402
from quant.config.scheme import QuantScheme  # noqa: E402
from quant.modules.linear import QuantLinear  # noqa: E402

HIDDEN, MLP, HEADS, BATCH, SEQ = 4096, 11008, 32, 2, 2048
PAPER_SAMPLES, PAPER_EPOCHS = 4096, 2
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds of fn() (CUDA events on GPU, a host clock after a sync on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        if DEV.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            sync()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak() -> float:
    n = 8192 if DEV.type == "cuda" else 512
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, warmup=5, iters=20)
    return 2 * n**3 / t


def make_block():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, num_hidden_layers=1, max_position_embeddings=SEQ)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, 0)
    for m in block.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    pos = torch.arange(SEQ, device=DEV)[None]
    rope = LlamaRotaryEmbedding(cfg).to(DEV)
    x = torch.zeros(1, SEQ, HIDDEN, device=DEV)
    kwargs = {"attention_mask": None, "position_ids": pos, "position_embeddings": rope(x, pos)}
    return block, kwargs


def quantize_block(block) -> None:
    spec = QuantScheme.from_name("W2A16KV16", preset="efficientqat", group_size=64).weight
    for name, m in list(block.named_modules()):
        if isinstance(m, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, QuantLinear.from_linear(m, spec, name))


def flops_per_step() -> float:
    params = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP
    tokens = BATCH * SEQ
    attn = 2 * BATCH * SEQ * SEQ * HIDDEN  # QK^T and PV, causal half
    return 3 * (2 * tokens * params + attn)  # forward + backward (2x forward)


def plain_step_time(block, kwargs, compile: bool) -> float:
    plain = float_block(block).to(DEV, torch.bfloat16).train()
    x = torch.randn(BATCH, SEQ, HIDDEN, device=DEV, dtype=torch.bfloat16)
    y = torch.randn_like(x)
    kwargs = {**kwargs, "position_embeddings": tuple(t.to(torch.bfloat16) for t in kwargs["position_embeddings"])}

    def loss(x, y):
        return F.mse_loss(_call(plain, x, kwargs).float(), y.float())

    fn = torch.compile(loss, dynamic=False) if compile else loss

    def step():
        fn(x, y).backward()
        for p in plain.parameters():
            p.grad = None

    t = cuda_time(step, warmup=3, iters=20)

    return t


def block_ap_step_time(block, kwargs, samples: int, compile: bool) -> dict[str, float]:
    """Seconds per Block-AP step over one epoch of `samples` host-cached samples (after a
    warm-up epoch), plus the forward-only passes of a block cycle and its peak memory."""
    dev = DEV
    shape = (samples, SEQ, HIDDEN)
    q_in = ActivationCache(shape, torch.bfloat16, "cpu", dev)
    fp_out = ActivationCache(shape, torch.bfloat16, "cpu", dev)
    q_in.data.normal_()
    fp_out.data.copy_(q_in.data)
    opt = BlockAPOptions(epochs=1, batch_size=BATCH)
    sync()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    fp = float_block(block).to(dev)  # full-precision targets: one forward pass over the cache
    run_block(fp, fp_out, fp_out, kwargs, BATCH, amp=True)
    del fp
    sync()
    fp_fwd = (time.perf_counter() - t0) / (samples / BATCH)
    ws = block.to(dev, torch.float32)
    loss_fn = make_loss_fn(ws, kwargs, dev, amp=True, compile=compile)
    prefetch = Prefetcher(dev)
    fit_block(ws, loss_fn, q_in, fp_out, opt, 2e-5, 1e-4, 0, prefetch)  # warm-up (and compile)
    sync()
    t0 = time.perf_counter()
    fit_block(ws, loss_fn, q_in, fp_out, opt, 2e-5, 1e-4, 1, prefetch)
    sync()
    step = (time.perf_counter() - t0) / (samples // BATCH)
    t0 = time.perf_counter()
    run_block(ws, q_in, q_in, kwargs, BATCH, amp=True)  # inputs of the next block
    sync()
    q_fwd = (time.perf_counter() - t0) / (samples / BATCH)
    peak = torch.cuda.max_memory_allocated() - base_mem if cuda else 0
    reserved = torch.cuda.max_memory_reserved() if cuda else 0
    block.to("cpu")
    return {"step_s": step, "fp_forward_s": fp_fwd, "q_forward_s": q_fwd, "peak_bytes": peak,
            "peak_reserved_bytes": reserved}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64, help="host-cached samples per timed epoch")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of this script)")
    args = ap.parse_args()
    if args.small:
        global HIDDEN, MLP, HEADS, SEQ
        HIDDEN, MLP, HEADS, SEQ = 128, 256, 4, 64
    elif DEV.type != "cuda":
        sys.exit("bench_block_ap needs a CUDA GPU (or --small for a CPU smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu"
    out: dict[str, object] = {"device": name, "torch": torch.__version__}
    peak = matmul_peak()
    out["matmul_peak_tflops"] = peak / 1e12
    block, kwargs = make_block()
    variants = [False] if args.no_compile else [False, True]
    for comp in variants:
        out[f"plain_bf16_step_ms{'_compiled' if comp else ''}"] = plain_step_time(block, kwargs, comp) * 1e3
    quantize_block(block)
    for comp in variants:
        r = block_ap_step_time(block, kwargs, args.samples, comp)
        tag = "compiled" if comp else "eager"
        out[f"block_ap_{tag}"] = r
    flops = flops_per_step()
    out["flops_per_step"] = flops
    best_tag = "compiled" if not args.no_compile else "eager"
    r = out[f"block_ap_{best_tag}"]
    steps = PAPER_SAMPLES // BATCH * PAPER_EPOCHS
    per_block = steps * r["step_s"] + PAPER_SAMPLES / BATCH * (r["fp_forward_s"] + r["q_forward_s"])
    plain = out["plain_bf16_step_ms"]
    rows = [
        ("bf16 matmul 8192^3", f"{peak / 1e12:.0f} TFLOP/s"),
        ("plain bf16 fwd+bwd (eager)", f"{plain:.2f} ms"),
    ]
    if "plain_bf16_step_ms_compiled" in out:
        rows.append(("plain bf16 fwd+bwd (compiled)", f"{out['plain_bf16_step_ms_compiled']:.2f} ms"))
    for tag in ("eager", "compiled"):
        if f"block_ap_{tag}" in out:
            s = out[f"block_ap_{tag}"]["step_s"]
            rows.append((f"Block-AP step ({tag})", f"{s * 1e3:.2f} ms  {flops / s / 1e12:.0f} TFLOP/s "
                         f"= {flops / s / peak:.1%} of peak, {s * 1e3 / plain:.2f}x plain eager"))
    rows += [
        ("forward only, fp / q block (per batch)", f"{r['fp_forward_s'] * 1e3:.2f} / {r['q_forward_s'] * 1e3:.2f} ms"),
        ("seconds per block at paper scale", f"{per_block:.0f} s ({steps} steps + 2 forward passes)"),
        ("7B model (32 blocks)", f"{per_block * 32 / 3600:.2f} h"),
        ("peak device memory, one block cycle", f"{r['peak_bytes'] / 2**30:.2f} GiB allocated, "
         f"{r['peak_reserved_bytes'] / 2**30:.2f} GiB reserved"),
    ]
    out["seconds_per_block_paper_scale"] = per_block
    print(f"\n{out['device']}, torch {out['torch']}")
    for k, v in rows:
        print(f"  {k:<42} {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
