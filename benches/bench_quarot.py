"""Wall time of QuaRot (rotate + RTN) on a Llama-2-7B-shaped random model.

Random weights (the arithmetic does not depend on their values): hidden 4096,
MLP 11008 (= 172 x 64), 32 heads of 128, vocab 32000. The model is built with
`--layers` counts (e.g. 2,4): per-block time = slope between them, fixed cost
(embeddings, lm_head, norms) = the intercept, and the 32-block time is
extrapolated (and measured directly when 32 is in the list). Also timed: the
online Hadamard transforms alone at [tokens, n] against the matmul of the
linear they precede. Writes raw JSON to --out.

GPU: python benches/bench_quarot.py --out quarot_7b.json --layers 2,4,32
CPU smoke: python benches/bench_quarot.py --out /tmp/q.json --tiny --group 16 --layers 1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.calibrate.quarot import QuaRotOptions, rotate  # noqa: E402
from quant.calibrate.rtn import quantize_linears  # noqa: E402
from quant.config.scheme import QuantScheme  # noqa: E402
from quant.modules.rotation import HadamardRotation, set_input_rotation  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
TINY = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=1000)


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def build(shape: dict, layers: int, dtype: torch.dtype, dev: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, num_hidden_layers=layers, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def time_quarot(shape, layers, scheme, options, dtype, dev) -> dict[str, float]:
    model = build(shape, layers, dtype, dev)
    sync(dev)
    t0 = time.perf_counter()
    rotate(model, scheme, options)
    sync(dev)
    t1 = time.perf_counter()
    rots = {n: m.input_rotation for n, m in model.named_modules()
            if getattr(m, "input_rotation", None) is not None}
    quantize_linears(model, scheme)
    for n, r in rots.items():
        set_input_rotation(model.get_submodule(n), r)
    sync(dev)
    t2 = time.perf_counter()
    del model
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"rotate_s": t1 - t0, "rtn_s": t2 - t1, "total_s": t2 - t0}


def time_online(n: int, out_features: int, tokens: int, dtype, dev, reps: int = 20) -> dict:
    x = torch.randn(tokens, n, device=dev, dtype=dtype)
    w = torch.randn(out_features, n, device=dev, dtype=dtype)
    rot = HadamardRotation(n, fp32=True).to(dev)

    def bench(fn) -> float:
        fn()
        sync(dev)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(dev)
        return (time.perf_counter() - t) / reps * 1e6

    return {"n": n, "tokens": tokens, "hadamard_us": bench(lambda: rot(x)),
            "linear_us": bench(lambda: x @ w.t())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--scheme", default="W4A4KV4")
    ap.add_argument("--preset", default="efficientqat", help="scheme preset: efficientqat | llm-qat")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--fuse-dtype", default="float64")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    shape = TINY if args.tiny else LLAMA2_7B
    scheme = QuantScheme.from_name(args.scheme, preset=args.preset, group_size=args.group)
    options = QuaRotOptions(fuse_dtype=args.fuse_dtype)
    res: dict = {"settings": vars(args) | {"out": str(args.out), "device": dev, "shape": shape,
                                            "torch": torch.__version__,
                                            "gpu": torch.cuda.get_device_name() if dev == "cuda"
                                            else None}}
    counts = [int(x) for x in args.layers.split(",")]
    runs = {}
    for n in counts:
        runs[n] = time_quarot(shape, n, scheme, options, dtype, dev)
        print(n, "layers:", {k: round(v, 2) for k, v in runs[n].items()}, flush=True)
    res["runs"] = {str(k): v for k, v in runs.items()}
    if len(counts) >= 2:
        a, b = counts[0], counts[1]
        per_block = (runs[b]["total_s"] - runs[a]["total_s"]) / (b - a)
        fixed = runs[a]["total_s"] - a * per_block
        res["per_block_s"] = per_block
        res["fixed_s"] = fixed
        res["extrapolated_32_blocks_s"] = fixed + 32 * per_block
    res["online"] = [time_online(shape["intermediate_size"], shape["hidden_size"], args.tokens,
                                 dtype, dev),
                     time_online(shape["hidden_size"], shape["hidden_size"], args.tokens, dtype, dev)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
