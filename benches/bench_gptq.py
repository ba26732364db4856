"""GPTQ calibration time on a Llama-2-7B-shaped random model (GPU), per block and for 32.

The model has the shapes of Llama-2-7B (hidden 4096, MLP 11008, 32 heads, vocab
32000) but only --layers decoder blocks, random init, held on the host in
--dtype; quant.calibrate.gptq runs exactly as `calibrate.method: gptq` runs it
(published defaults: block size 128, percdamp 0.01, true sequential; --act-order
for desc_act) on --samples x --seq-len calibration tokens (GPTQ: 128 x 2048 of
C4; here 128 x 512 by default, as the calibrate stage), moving one block at a
time to the device. Reported: seconds to capture block 0's inputs, seconds per
block, the extrapolation capture + 32 x mean block seconds, peak device memory.
Random weights say nothing about quality; only the timing carries over.

Usage (device): python benches/bench_gptq.py --out docs/results/gptq_bench_gpu.json
CPU smoke test: python benches/bench_gptq.py --out /tmp/g.json --hidden 128 --intermediate 384
    --heads 4 --vocab 512 --samples 4 --seq-len 64 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.calibrate.awq import model_fingerprint  # noqa: E402
from quant.calibrate.gptq import GPTQOptions, run_gptq  # noqa: E402
from quant.config.scheme import QuantScheme  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument("--batch-size", type=int, default=16, help="calibration sequences per forward")
    ap.add_argument("--extrapolate-to", type=int, default=32)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(4096, args.seq_len))
    model = LlamaForCausalLM(config).to(DTYPES[args.dtype]).eval()  # on the host
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme.from_name(f"W{args.bits}A16KV16", preset="efficientqat", group_size=args.group)
    options = GPTQOptions(batch_size=args.batch_size, act_order=args.act_order)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    results = run_gptq(model, scheme.weight, ids, options, model_fingerprint(model), lm_head=False,
                       device=device)
    total = time.perf_counter() - t
    per_block = results.block_seconds
    steady = per_block[1:] or per_block  # block 0 includes one-time kernel warm-up
    mean = sum(steady) / len(steady)
    out = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "scheme": scheme.name,
        "options": options.to_dict(),
        "capture_seconds": round(results.capture_seconds, 3),
        "block_seconds": [round(s, 3) for s in per_block],
        "total_seconds": round(total, 3),
        f"extrapolated_{args.extrapolate_to}_blocks_seconds": round(
            results.capture_seconds + args.extrapolate_to * mean, 1),
        "peak_device_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda" else None,
        "mean_loss": sum(x.loss for x in results.layers.values()) / max(1, len(results.layers)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
