"""GGUF export checked in llama.cpp: logits, perplexity and CPU decode speed, in one run.

The calibrated model (artifacts/calibrate/model, W4 g64 asymmetric RTN by default) is
converted to fp16 (quant.export.half) and exported as GGUF (Q4_1 blocks written from
its integer codes); the full-precision model (artifacts/prepare/model) is written as
an F16 GGUF by the same writer. Both files are run in llama.cpp (llama-cpp-python,
CPU) beside this project's torch models:

- logits on a few prompts: llama.cpp on our Q4_1 file vs our fake-quant model;
- perplexity on the held-out text (same token ids, same windows): ours vs llama.cpp,
  for the W4 model and for the F16 model;
- greedy decode tokens/s of the Q4_1 file vs the F16 file, interleaved repeats in one
  process, same threads; the ratio is printed side by side;
- llama.cpp's tokenizer vs the Hugging Face tokenizer on text samples.

    python -m tasks.prepare && python -m tasks.calibrate
    python -m benches.gguf_llamacpp --out docs/results/export_gguf.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
]


def our_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def prompt_ids(tok, text_ids: torch.Tensor) -> list[list[int]]:
    chats = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
             for p in PROMPTS]
    chats = [list(c["input_ids"]) if isinstance(c, dict) else list(c) for c in chats]
    return [*chats, text_ids[:128].tolist()]


def logit_check(llm, model, prompts: list[list[int]]) -> dict:
    from quant.export import llamacpp as lc

    diffs, rel, agree = [], [], []
    for ids in prompts:
        got, want = lc.logits(llm, ids), our_logits(model, ids)
        diffs.append(float(np.abs(got - want).max()))
        rel.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
        agree.append(float((got.argmax(-1) == want.argmax(-1)).mean()))
    return {"max_abs_logit_diff": max(diffs), "rel_l2_logit_diff": max(rel), "top1_agreement": min(agree),
            "prompt_tokens": [len(p) for p in prompts]}


def decode_speed(paths: dict[str, Path], threads: int, n_tokens: int, repeats: int, prompt: list[int]):
    """Median greedy tokens/s per file; files alternate so CPU contention hits all alike."""
    from quant.export import llamacpp as lc

    llms = {k: lc.load(p, n_ctx=512, threads=threads, logits_all=False) for k, p in paths.items()}
    for llm in llms.values():  # warm-up: page the weights in
        lc.decode_tokens_per_s(llm, prompt, 8)
    runs = {k: [] for k in llms}
    for _ in range(repeats):
        for k, llm in llms.items():
            runs[k].append(lc.decode_tokens_per_s(llm, prompt, n_tokens))
    return {k: {"median": statistics.median(v), "runs": [round(x, 2) for x in v]} for k, v in runs.items()}


def main() -> None:
    from quant.e2e.data import tokenize_text, windows
    from quant.eval.ppl import perplexity
    from quant.export import llamacpp as lc
    from quant.export.base import export
    from quant.export.gguf_format import GGUF_FILE, write_gguf
    from quant.export.half import to_half
    from quant.models.checkpoint import load_model, read_scheme

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantized", default="artifacts/calibrate/model")
    ap.add_argument("--base", default="artifacts/prepare/model")
    ap.add_argument("--text", default="artifacts/prepare/data/eval/embedded-wiki.txt")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    scheme = read_scheme(args.quantized)

    model, tok = load_model(args.quantized, torch.float32)
    to_half(model, torch.float16)
    t0 = time.time()
    fp = export(model, tok, scheme, "gguf", work / "w4")
    export_s = time.time() - t0
    model.float()  # the half values, computed in float32 like every PPL here
    base, _ = load_model(args.base, torch.float32)
    write_gguf(base, tok, work / "f16.gguf", torch.float16)
    files = {"w4": work / "w4" / GGUF_FILE, "f16": work / "f16.gguf"}
    sizes = {k: p.stat().st_size for k, p in files.items()}

    ids = tokenize_text(tok, Path(args.text).read_text())
    chunks = windows(ids, args.seq_len, args.windows)
    ours = {"w4": perplexity(model, ids, args.seq_len, 1, args.windows).ppl,
            "f16": perplexity(base, ids, args.seq_len, 1, args.windows).ppl}
    llama = {}
    checks = {}
    for k, path in files.items():
        llm = lc.load(path, n_ctx=args.seq_len, threads=args.threads)
        llama[k] = lc.perplexity(llm, chunks.tolist())
        checks[k] = logit_check(llm, model if k == "w4" else base, prompt_ids(tok, ids))
        if k == "w4":
            samples = [Path(args.text).read_text()[i * 997: i * 997 + 300] for i in range(5)]
            same = sum(lc.tokenize(llm, s, add_special=False) == tok(s, add_special_tokens=False)["input_ids"]
                       for s in samples)
        del llm
    speed = decode_speed(files, args.threads, args.decode_tokens, args.repeats, ids[:32].tolist())

    n_params = sum(p.numel() for p in base.parameters())
    result = {
        "model": str(args.quantized), "scheme": scheme.name, "gguf_type": "Q4_1",
        "size_bytes": sizes, "size_ratio_f16_over_w4": sizes["f16"] / sizes["w4"],
        "bits_per_weight_quantized_linears": fp.bits_per_weight,
        "bits_per_parameter_whole_file": {k: 8 * s / n_params for k, s in sizes.items()},
        "export_seconds": round(export_s, 2),
        "logits_vs_ours": checks,
        "ppl": {"seq_len": args.seq_len, "windows": int(chunks.shape[0]), "text": args.text,
                "ours": ours, "llama_cpp": llama,
                "rel_diff": {k: llama[k] / ours[k] - 1 for k in ours}},
        "tokenizer_samples_identical": f"{same}/5",
        "decode_tokens_per_s": speed, "decode_tokens": args.decode_tokens, "threads": args.threads,
        "decode_speedup_w4_over_f16": speed["w4"]["median"] / speed["f16"]["median"],
        "llama_cpp_python": _version("llama_cpp_python"), "cpu": platform.processor() or platform.machine(),
        "commands": ["python -m tasks.prepare", "python -m tasks.calibrate",
                     "python -m benches.gguf_llamacpp --out docs/results/export_gguf.json"],
    }
    print(f"size      W4 (Q4_1) {sizes['w4'] / 1e6:8.1f} MB   F16 {sizes['f16'] / 1e6:8.1f} MB   "
          f"ratio {result['size_ratio_f16_over_w4']:.2f}x   bpw (linears) {fp.bits_per_weight:.3f}")
    for k in ("w4", "f16"):
        print(f"PPL {k:4s}  ours {ours[k]:8.4f}   llama.cpp {llama[k]:8.4f}   "
              f"diff {100 * result['ppl']['rel_diff'][k]:+.3f}%   max |dlogit| {checks[k]['max_abs_logit_diff']:.4f}"
              f"   top-1 agree {checks[k]['top1_agreement']:.3f}")
    print(f"decode    W4 {speed['w4']['median']:7.1f} tok/s   F16 {speed['f16']['median']:7.1f} tok/s   "
          f"ratio {result['decode_speedup_w4_over_f16']:.2f}x  ({args.threads} threads)")
    print(f"tokenizer llama.cpp == transformers on {same}/5 text samples")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    assert math.isfinite(llama["w4"])


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
