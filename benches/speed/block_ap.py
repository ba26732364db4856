"""Block-AP training speed and memory on one Llama-2-7B-shaped block (GPU).

Shapes: block 0 of `--shape` (default llama-2-7b: hidden 4096, MLP 11008, 32 heads),
batch 2 x 2048 tokens, weights W2 g64 asymmetric, random init. Everything is measured in
one run, on one device:

- bf16 matmul peak: 8192^3 products (the ceiling the step is compared with);
- plain bf16 forward+backward of the same block without quantizers (bf16 weights with
  gradients, MSE loss), eager and compiled;
- the Block-AP training step exactly as quant.blockwise.block_ap runs it (`fit_block`: fp32
  master weights, bf16 autocast, fake-quant, AdamW, cosine, next batch prefetched from
  pinned host memory), eager and compiled, cache on the host;
- forward-only passes (targets through the full-precision block, next inputs through the
  quantized block) to extrapolate seconds per block at paper scale (4096 x 2048 samples,
  2 epochs, batch 2);
- peak device memory of a whole block cycle (fp targets, training, q forward): with the
  cached activations on the host, Block-AP holds one block at a time, so this is the peak
  of a whole 7B run apart from the first block's input capture.

The forward passes at scale, a 2-block run through the engine at the paper's sample count
and disk vs pinned caches: benches.scale.block_ap.

    python -m benches.speed.block_ap [--samples 64] [--no-compile]     # GPU
    python -m benches.speed.block_ap --small                            # CPU smoke run
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from benches import common
from quant.blockwise.block_ap import BlockAPOptions, fit_block
from quant.blockwise.cache import ActivationCache, Prefetcher
from quant.blockwise.passes import call_block, float_block, make_loss_fn, run_block
from quant.config.scheme import QuantScheme
from quant.models.arch import set_module
from quant.modules.linear import QuantLinear

PAPER_SAMPLES, PAPER_EPOCHS = 4096, 2
W2G64 = QuantScheme.parse("W2g64")  # EfficientQAT's w2 g64, asymmetric


@dataclass(frozen=True)
class Dims:
    """The sizes a block bench works with."""

    hidden: int
    mlp: int
    seq: int
    batch: int = 2

    @classmethod
    def of(cls, shape: str, seq: int, batch: int = 2) -> Dims:
        cfg = common.model_config(shape)
        return cls(cfg.hidden_size, cfg.intermediate_size, seq, batch)

    def flops_per_step(self) -> float:
        """Forward + backward (2x forward) of one training step of the block."""
        params = 4 * self.hidden * self.hidden + 3 * self.hidden * self.mlp
        tokens = self.batch * self.seq
        attn = 2 * self.batch * self.seq * self.seq * self.hidden  # QK^T and PV, causal half
        return 3 * (2 * tokens * params + attn)


def matmul_peak(dev: torch.device) -> float:
    """bf16 FLOP/s of an n^3 product (n = 8192 on GPU)."""
    n = 8192 if dev.type == "cuda" else 512
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    return 2 * n**3 / common.median_seconds(lambda: a @ b, warmup=5, repeat=20)


def quantize_block(block: torch.nn.Module, scheme: QuantScheme = W2G64) -> None:
    """Every linear of the block -> a min-max-initialised QuantLinear, in place."""
    for name, m in list(block.named_modules()):
        if isinstance(m, torch.nn.Linear):
            set_module(block, name, QuantLinear.from_linear(m, scheme.weight, name))


def plain_step_ms(block, kwargs, dims: Dims, dev: torch.device, compile: bool) -> float:
    plain = float_block(block).to(dev, torch.bfloat16).train()
    x = torch.randn(dims.batch, dims.seq, dims.hidden, device=dev, dtype=torch.bfloat16)
    y = torch.randn_like(x)
    kwargs = {**kwargs, "position_embeddings": tuple(t.to(torch.bfloat16) for t in kwargs["position_embeddings"])}

    def loss(x, y):
        return F.mse_loss(call_block(plain, x, kwargs).float(), y.float())

    fn = torch.compile(loss, dynamic=False) if compile else loss

    def step():
        fn(x, y).backward()
        for p in plain.parameters():
            p.grad = None

    return common.median_seconds(step, warmup=3, repeat=20) * 1e3


def block_ap_step(block, kwargs, dims: Dims, dev: torch.device, samples: int, compile: bool) -> dict[str, float]:
    """Seconds per Block-AP step over one epoch of `samples` host-cached samples (after a
    warm-up epoch), plus the forward-only passes of a block cycle and its peak memory."""
    shape = (samples, dims.seq, dims.hidden)
    q_in = ActivationCache(shape, torch.bfloat16, "cpu", dev)
    fp_out = ActivationCache(shape, torch.bfloat16, "cpu", dev)
    q_in.data.normal_()
    fp_out.data.copy_(q_in.data)
    opt = BlockAPOptions(epochs=1, batch_size=dims.batch)
    batches = samples / dims.batch
    common.reset_peak_memory()
    base_mem = torch.cuda.memory_allocated() if dev.type == "cuda" else 0

    def fp_pass() -> None:  # full-precision targets: the fp block built, one forward pass over the cache
        run_block(float_block(block).to(dev), fp_out, fp_out, kwargs, dims.batch, amp=True)

    fp_fwd = common.seconds(fp_pass) / batches
    ws = block.to(dev, torch.float32)
    loss_fn = make_loss_fn(ws, kwargs, dev, amp=True, compile=compile)
    prefetch = Prefetcher(dev)
    fit_block(ws, loss_fn, q_in, fp_out, opt, 2e-5, 1e-4, 0, prefetch)  # warm-up (and compile)
    step = common.seconds(lambda: fit_block(ws, loss_fn, q_in, fp_out, opt, 2e-5, 1e-4, 1, prefetch))
    step /= samples // dims.batch
    q_fwd = common.seconds(lambda: run_block(ws, q_in, q_in, kwargs, dims.batch, amp=True)) / batches
    cuda = dev.type == "cuda"
    out = {"step_s": step, "fp_forward_s": fp_fwd, "q_forward_s": q_fwd,
           "peak_bytes": torch.cuda.max_memory_allocated() - base_mem if cuda else 0,
           "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0}
    block.to("cpu")
    return out


def report(out: dict, dims: Dims, layers: int) -> None:
    peak, plain, flops = out["matmul_peak_tflops"] * 1e12, out["plain_bf16_step_ms"], out["flops_per_step"]
    rows = [("bf16 matmul", f"{peak / 1e12:.0f} TFLOP/s"), ("plain bf16 fwd+bwd (eager)", f"{plain:.2f} ms")]
    if "plain_bf16_step_ms_compiled" in out:
        rows.append(("plain bf16 fwd+bwd (compiled)", f"{out['plain_bf16_step_ms_compiled']:.2f} ms"))
    for tag in ("eager", "compiled"):
        if f"block_ap_{tag}" in out:
            s = out[f"block_ap_{tag}"]["step_s"]
            rows.append((f"Block-AP step ({tag})", f"{s * 1e3:.2f} ms  {flops / s / 1e12:.0f} TFLOP/s "
                         f"= {flops / s / peak:.1%} of peak, {s * 1e3 / plain:.2f}x plain eager"))
    r, per_block = out[f"block_ap_{out['best']}"], out["seconds_per_block_paper_scale"]
    rows += [
        ("forward only, fp / q block (per batch)", f"{r['fp_forward_s'] * 1e3:.2f} / {r['q_forward_s'] * 1e3:.2f} ms"),
        ("seconds per block at paper scale", f"{per_block:.0f} s"),
        (f"whole model ({layers} blocks)", f"{per_block * layers / 3600:.2f} h"),
        ("peak device memory, one block cycle", f"{r['peak_bytes'] / 2**30:.2f} GiB allocated, "
         f"{r['peak_reserved_bytes'] / 2**30:.2f} GiB reserved"),
    ]
    print(f"\n{common.device_name()}, torch {torch.__version__}, block {dims}")
    for k, v in rows:
        print(f"  {k:<42} {v}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(common.SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=64, help="host-cached samples per timed epoch")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: small shape, 64 tokens, eager")
    common.add_out_arg(ap, "speed-block_ap")
    args = ap.parse_args(argv)
    if args.small:
        args.shape, args.seq, args.samples, args.no_compile = "small", 64, 8, True
    common.require_cuda("speed.block_ap", args.small)
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = common.device()
    dims = Dims.of(args.shape, args.seq)
    out: dict[str, object] = {"dims": vars(dims), "matmul_peak_tflops": matmul_peak(dev) / 1e12}
    block, kwargs = common.decoder_block(args.shape, dims.seq, dev)
    variants = [False] if args.no_compile else [False, True]
    for comp in variants:
        out[f"plain_bf16_step_ms{'_compiled' if comp else ''}"] = plain_step_ms(block, kwargs, dims, dev, comp)
    quantize_block(block)
    for comp in variants:
        out[f"block_ap_{'compiled' if comp else 'eager'}"] = block_ap_step(block, kwargs, dims, dev, args.samples, comp)
    out["flops_per_step"] = dims.flops_per_step()
    out["best"] = "eager" if args.no_compile else "compiled"
    r = out[f"block_ap_{out['best']}"]
    steps = PAPER_SAMPLES // dims.batch * PAPER_EPOCHS
    out["seconds_per_block_paper_scale"] = (steps * r["step_s"]
                                            + PAPER_SAMPLES / dims.batch * (r["fp_forward_s"] + r["q_forward_s"]))
    report(out, dims, common.model_config(args.shape).num_hidden_layers)
    common.say("wrote", common.write_result(args, out))


if __name__ == "__main__":
    main()
