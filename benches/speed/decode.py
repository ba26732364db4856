"""Decode speed of packed low-bit models against fp16 (GPU; tiny shapes run on CPU).

A `--shape` model (default llama-2-7b; random init: speed does not depend on the values) decodes
`--steps` tokens at every batch size of `--batches`, once per variant:

- `fp16`: the plain model;
- `w{b}g{g}-{backend}`: every decoder linear replaced by a `PackedLinear` with random
  codes, step sizes and zero points, computing through `backend` (`triton` = this
  project's kernel, quant/modules/triton_gemv.py; `gemlite`; `torch-int4` = torch's
  tinygemm `aten._weight_int4pack_mm`; or `torch` = the
  unpack + dequantise fallback, which is no kernel and only for reference). A variant
  whose kernel does not exist (W3 in gemlite) or is not installed is recorded with the
  reason, not skipped silently.

Decode loop: `quant.synth.decode.KVDecoder` (the model's own submodules, a preallocated
KV cache) with the *whole* decode step - every layer, attention over the full cache
under a position mask, LM head and greedy argmax - captured as one CUDA graph
(`--graph whole`; `--graph segments` is KVDecoder's per-layer graphs with eager
attention). `--compile` additionally wraps the step in `torch.compile(mode=
"max-autotune-no-cudagraphs")` before capture (slow to compile; experimental).

Reported per variant and batch: tokens/s, ms per step, the ratio to fp16 at the same
batch, weight memory (bytes the variant's linears hold on the device, measured as the
allocation they add, plus everything else at 16 bits), and the bandwidth limit: the
tokens/s a step would reach if it only streamed its weights and KV cache at
`--peak-gbs` (H200: 4800 GB/s), with the measured fraction of it.

GPU (gemlite installed with `pip install --no-deps --target DIR`, DIR on PYTHONPATH):
    python -m benches.speed.decode
    python -m benches.speed.decode --shape qwen3-8b-like --variants fp16 w4g128-triton
CPU smoke run at tiny size:
    python -m benches.speed.decode --small
"""

from __future__ import annotations

import argparse
import traceback

import torch
from torch.nn import functional as F

from benches import common
from quant.models.arch import get_module, iter_block_linears, mapping_for, set_module
from quant.modules.packed import PackedLinear
from quant.synth.decode import KVDecoder

DEFAULT_VARIANTS = ["fp16", "w4g64-triton", "w4g128-triton", "w4g64-gemlite", "w4g128-gemlite",
                    "w4g64-torch-int4", "w4g128-torch-int4", "w3g64-gemlite", "w2g64-triton", "w2g64-gemlite"]


class WholeStepDecoder(KVDecoder):
    """KVDecoder whose whole step is one CUDA graph: attention runs over the full cache
    with a mask `position <= pos`, so every shape is fixed."""

    def __init__(self, *args, compile_step: bool = False, **kw) -> None:
        super().__init__(*args, graphs=False, **kw)
        for t in self.keys + self.values:  # masked positions must not hold NaNs (0 * NaN)
            t.zero_()
        self._ar = torch.arange(self.max_len, device=self.device)
        self._graph = None
        self._fn = torch.compile(self._one_step, mode="max-autotune-no-cudagraphs") if compile_step \
            else self._one_step

    def _attend(self, i: int, t: int) -> None:
        mask = (self._ar <= self.pos).view(1, 1, 1, -1)  # [1, 1, 1, max_len]
        a = F.scaled_dot_product_attention(self.q, self.keys[i], self.values[i], attn_mask=mask,
                                           scale=self.blocks[i].scale, **self._gqa)
        self.a.copy_(a)

    def _one_step(self) -> None:
        for j in range(len(self.blocks) + 1):
            self._segment(j)
            if j < len(self.blocks):
                self._attend(j, 0)
        self.pos.add_(1)

    def step(self) -> None:
        if self.position >= self.max_len:
            raise RuntimeError(f"KV cache is full ({self.max_len} positions)")
        if self._graph is None and self._warm and self.device.type == "cuda":
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._fn()
            self._graph = g  # capture records the kernels without running them
        if self._graph is not None:
            self._graph.replay()
        else:
            self._fn()
        self.position += 1
        self._warm = True


def parse_variant(name: str) -> tuple[int, int, str] | None:
    if name == "fp16":
        return None
    head, backend = name.split("-", 1)
    bits, group = head[1:].split("g")
    return int(bits), int(group), backend


def random_packed(lin, bits: int, group: int, dtype: torch.dtype, gen: torch.Generator) -> PackedLinear:
    dev = lin.weight.device
    pl = PackedLinear(lin.in_features, lin.out_features, bits, group, symmetric=False, scale_dtype=dtype,
                      device=dev)
    pl.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, pl.qweight.shape, generator=gen, device=dev,
                                   dtype=torch.int32))
    pl.qzeros.copy_(torch.randint(-(2**31), 2**31 - 1, pl.qzeros.shape, generator=gen, device=dev,
                                  dtype=torch.int32))
    pl.scales.copy_(torch.rand(pl.scales.shape, generator=gen, device=dev) * 1e-3)
    return pl


def swap_in(model, bits: int, group: int, backend: str, dtype: torch.dtype) -> tuple[dict, int]:
    """Replace every decoder linear; returns (the originals, bytes the new layers hold)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    originals, before = {}, _allocated()
    for name, *_, lin in list(iter_block_linears(model)):
        pl = random_packed(lin, bits, group, dtype, gen).use_backend(backend, keep_packed=backend == "torch")
        originals[name] = lin
        set_module(model, name, pl)
    return originals, _allocated() - before


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def linear_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for *_, m in iter_block_linears(model))


def other_bytes(model) -> int:
    lin = {id(m.weight) for *_, m in iter_block_linears(model) if isinstance(m, torch.nn.Linear)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in lin)


def time_decode(model, batch: int, args, device: str) -> dict:
    max_len = args.warmup + args.steps + 2
    head = lambda logits, pos: logits.argmax(-1)  # noqa: E731 (greedy)
    if args.graph == "whole":
        dec = WholeStepDecoder(model, batch, max_len, head, compile_step=args.compile)
    else:
        dec = KVDecoder(model, batch, max_len, head, graphs=True)
    dec.inp.copy_(torch.randint(0, model.config.vocab_size, (batch,), device=device))
    with torch.no_grad():
        for _ in range(args.warmup):
            dec.step()
        seconds = common.seconds(lambda: [dec.step() for _ in range(args.steps)])
    kv_bytes_per_step = dec.cache_bytes() * (args.warmup + args.steps / 2) / max_len
    return {"tokens_per_s": batch * args.steps / seconds, "ms_per_step": 1e3 * seconds / args.steps,
            "kv_bytes_per_step": kv_bytes_per_step}


def run_variant(model, name: str, args, device: str, dtype: torch.dtype) -> dict:
    spec = parse_variant(name)
    originals = {}
    try:
        if spec is None:
            lin_bytes = linear_bytes(model)
        else:
            originals, lin_bytes = swap_in(model, *spec, dtype)
            if not torch.cuda.is_available():  # no allocator to ask: count the kernel's tensors
                lin_bytes = sum(_module_bytes(m) for m in model.modules() if isinstance(m, PackedLinear))
        weights = lin_bytes + other_bytes(model)
        out = {"weight_bytes": weights, "linear_bytes": lin_bytes, "batches": {}}
        for b in args.batches:
            r = time_decode(model, b, args, device)
            step_bytes = weights - _embed_bytes(model) + r["kv_bytes_per_step"]
            limit = b * args.peak_gbs * 1e9 / step_bytes
            r.update(bandwidth_limit_tokens_per_s=limit, fraction_of_limit=r["tokens_per_s"] / limit,
                     achieved_gbs=step_bytes / (r["ms_per_step"] / 1e3) / 1e9)
            out["batches"][str(b)] = r
            print(f"{name:>20} batch {b:>3}: {r['tokens_per_s']:9.1f} tok/s  {r['ms_per_step']:7.3f} ms/step  "
                  f"{r['fraction_of_limit']:.2f} of the bandwidth limit", flush=True)
        return out
    except Exception as exc:  # a variant without a kernel is a result, not a crash
        print(f"{name:>20}: not measured: {type(exc).__name__}: {exc}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    finally:
        for n, lin in originals.items():
            set_module(model, n, lin)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _module_bytes(m) -> int:
    ts = [t for t in m.buffers() if t is not None]
    kernel = m._kernel
    if isinstance(kernel, tuple):
        ts += [t for t in kernel if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in ts)


def _embed_bytes(model) -> int:
    w = get_module(model, mapping_for(model).embed_tokens).weight  # a step reads one row, not the table
    return w.numel() * w.element_size()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(common.SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape has")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--graph", choices=["whole", "segments"], default="whole")
    ap.add_argument("--compile", action="store_true", help="torch.compile max-autotune the step first")
    ap.add_argument("--peak-gbs", type=float, default=4800.0, help="HBM bandwidth (H200: 4800)")
    ap.add_argument("--small", action="store_true",
                    help="CPU smoke run: small shape, float32, a few steps (GPU kernels are recorded as errors)")
    common.add_out_arg(ap, "speed-decode")
    args = ap.parse_args(argv)
    if args.small:
        args.device, args.dtype, args.shape, args.steps, args.warmup, args.batches = "cpu", "float32", "small", 4, 2, [1, 2]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benches.speed.decode needs a CUDA GPU for --device cuda; --small runs it on the CPU "
                         "at tiny sizes (a smoke run, its numbers mean nothing)")
    dtype = getattr(torch, args.dtype)
    model = common.build_model(args.shape, layers=args.layers, dtype=dtype, device=args.device)
    results = {}
    for name in args.variants:
        results[name] = run_variant(model, name, args, args.device, dtype)
    base = results.get("fp16", {}).get("batches", {})
    for r in results.values():
        for b, rb in r.get("batches", {}).items():
            if b in base:
                rb["ratio_to_fp16"] = rb["tokens_per_s"] / base[b]["tokens_per_s"]
    try:
        import gemlite

        gemlite_version = getattr(gemlite, "__version__", "installed")
    except ImportError:
        gemlite_version = None
    path = common.write_result(args, {"gemlite": gemlite_version, "results": results})
    common.say("wrote", path)


if __name__ == "__main__":
    main()
