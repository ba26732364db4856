"""Synthesis speed: this generator vs the one-sequence-at-a-time reference, in one run.

Both run on the same model, device and dtype, with the same work per sequence:
start token, greedy up to the prefix length (3, 4, 5 in turn), then plain
sampling (temperature 1, no top-k/top-p) up to `--seq-len` tokens, EOS ignored
(`on_eos: continue` here, EOS disabled for `generate`), so every sequence has
the same length in both.

- generator: `quant.synth.sampling.generate` on `--sequences` sequences in batches of
  `--batch` (KV cache preallocated, all rows decode together);
- reference (LLM-QAT's approach): per sequence, `model.generate(greedy,
  max_length=p)` then `model.generate(do_sample=True, max_length=seq_len)`.
  At 2048 tokens one sequence takes minutes, so each reference sequence runs
  under `max_time=--ref-seconds` (HF's own time limit) and tokens/s counts the
  tokens it produced; since the reference's per-token cost grows with length,
  timing only its first tokens flatters it (the ratio is conservative).
- GPU roofline: bytes a decode step must read (every weight once, plus the
  whole KV cache written so far) summed over the steps, over the HBM bandwidth
  measured with a large device-to-device copy (bytes read + written), divided
  by the measured generation time.
- a correctness check first: the decoder's logits vs the model's own forward.

Usage (`--model`: a shape of benches.common.SHAPES, `embedded`, or a model directory):
  python -m benches.speed.synth --model llama-2-7b --seq-len 2048 --batch 48 --sequences 48   # GPU
  python -m benches.speed.synth --model embedded --seq-len 128 --batch 24 --sequences 24      # CPU
  python -m benches.speed.synth --small                                                       # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benches import common
from quant.synth.decode import KVDecoder
from quant.synth.sampling import Item, SynthesisConfig, batches, generate


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """A random model of a shape of benches.common.SHAPES, the embedded SmolLM2, or a directory."""
    if name in common.SHAPES:
        return common.build_model(name, dtype=dtype, device=device)
    from quant.load import load_model

    model, _ = load_model("embedded:smollm2-135m" if name == "embedded" else name, dtype, "cpu")
    return model.to(device).eval()


def hbm_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 4 GiB device-to-device copy, counting bytes read and written."""
    x = torch.empty(1 << 30, dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    common.sync()
    t, reps = time.perf_counter(), 20
    for _ in range(reps):
        y.copy_(x)
    common.sync()
    bw = 2 * x.numel() * 4 * reps / (time.perf_counter() - t)
    del x, y
    torch.cuda.empty_cache()
    return bw


def decode_error(model, device) -> float:
    """max |decoder logits - forward logits| / max |forward logits| on 2 x 16 random tokens
    (teacher-forced through the decoder, eagerly)."""
    ids = torch.randint(3, model.config.vocab_size, (2, 17), device=device)
    seen = []

    def head(logits, pos):
        seen.append(logits.clone())
        return ids.index_select(1, pos + 1).squeeze(1)

    with torch.inference_mode():
        ref = model(ids[:, :16]).logits.float()
        dec = KVDecoder(model, 2, 16, head)
        dec.inp.copy_(ids[:, 0])
        for _ in range(16):
            dec.step()
    return float((torch.stack(seen, 1) - ref).abs().max() / ref.abs().max())


def items_for(n: int, vocab: int) -> list[Item]:
    starts = [100 + (i // 3) * ((vocab - 200) // max(1, n // 3)) for i in range(n)]
    return [Item(i, s, 3 + i % 3) for i, s in enumerate(starts)]


def run_generator(model, items, seq_len, batch, device, graphs: bool = True) -> dict:
    cfg = SynthesisConfig(shards=(0,), seq_len=seq_len, batch_size=batch, on_eos="continue", cuda_graphs=graphs,
                          top_k=0)  # as the generate() baselines below
    warm = SynthesisConfig(shards=(0,), seq_len=16, on_eos="continue", cuda_graphs=graphs, top_k=0)
    generate(model, items[: min(batch, 4)], warm, 0)
    common.sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    tokens, seqs = 0, []
    for chunk in batches(items, batch):
        out = generate(model, chunk, cfg, 0)
        tokens += sum(len(g.ids) - 1 for g in out)
        seqs += [g.ids for g in out]
    common.sync()
    seconds = time.perf_counter() - t
    res = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "cuda_graphs": graphs,
           "batch": batch, "seq_len": seq_len}
    if device.type == "cuda":
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res | {"_ids": seqs}


def run_reference(model, items, seq_len, seconds_each, device) -> dict:
    """LLM-QAT's loop: greedy generate to the prefix length, sampling generate to seq_len."""
    model.generation_config.eos_token_id = None  # same length as the generator's sequences
    model.generation_config.pad_token_id = 0
    tokens, total = 0, 0.0
    for it in items:
        ids = torch.tensor([[it.start_id]], device=device)
        common.sync()
        t = time.perf_counter()
        with torch.inference_mode():
            prefix = model.generate(ids, do_sample=False, max_length=it.prefix_len)
            out = model.generate(prefix, do_sample=True, max_length=seq_len, top_k=0, top_p=1.0,
                                 temperature=1.0, max_time=seconds_each)
        common.sync()
        total += time.perf_counter() - t
        tokens += out.shape[1] - 1
    return {"tokens": tokens, "seconds": total, "tokens_per_s": tokens / total, "sequences": len(items)}


def reference_profile(model, seq_len: int, points: int, new: int, device) -> dict:
    """Per-token seconds of the reference's sampling `generate` at `points` positions
    spread over the sequence (decode of `new` tokens after a prefix of that length, the
    prefill subtracted), integrated piecewise-linearly into the time of one whole
    sequence: the reference's per-token cost grows with the position (its cache is
    concatenated each step), so timing only its first tokens would flatter it."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    new = max(2, min(new, (seq_len - 1) // 2))
    starts = [1 + round(i * (seq_len - 1 - new) / max(points - 1, 1)) for i in range(points)]
    per_token = []
    for p0 in starts:
        ids = torch.randint(3, model.config.vocab_size, (1, p0), device=device)
        times = []
        for n in (1, new):
            common.sync()
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, do_sample=True, max_new_tokens=n, min_new_tokens=n, top_k=0, top_p=1.0)
            common.sync()
            times.append(time.perf_counter() - t)
        per_token.append((times[1] - times[0]) / (new - 1))
    xs = [p + new / 2 for p in starts]
    seconds = float(np.interp(np.arange(1, seq_len), xs, per_token).sum())
    return {"positions": starts, "seconds_per_token": per_token, "sequence_seconds": seconds,
            "tokens_per_s": (seq_len - 1) / seconds, "method": f"{points} points x {new} tokens, interpolated"}


def decode_bytes(model, seq_len: int, batch_sizes: list[int]) -> float:
    """Bytes the decode steps must read: every weight once per step + the KV cache so far."""
    cfg = model.config
    es = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * es
    if not cfg.tie_word_embeddings:  # the embedding table is gathered (B rows), not read
        weights -= model.get_input_embeddings().weight.numel() * es
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_per_token = cfg.num_hidden_layers * 2 * kv_heads * head_dim * es
    steps = seq_len - 1
    total = 0.0
    for b in batch_sizes:  # step t attends t + 1 positions
        total += steps * weights + b * kv_per_token * steps * (steps + 1) / 2
    return total


def profile_steps(model, batch: int, position: int, graphs: bool, device) -> str:
    """Top device kernels of 8 decode steps at `position` (cache contents are arbitrary)."""
    vocab = model.config.vocab_size
    dec = KVDecoder(model, batch, position + 16, lambda logits, pos: logits.argmax(-1) % vocab, graphs)
    dec.position = position
    dec.pos.fill_(position)
    with torch.inference_mode():
        for _ in range(3):  # warm-up (and graph capture)
            dec.step()
        common.sync()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            t = time.perf_counter()
            for _ in range(8):
                dec.step()
            common.sync()
            ms = (time.perf_counter() - t) / 8 * 1e3
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10)
    return f"{ms:.2f} ms/step (profiled, graphs={graphs}) at position {position}, batch {batch}\n{table}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded", help=f"{' | '.join(common.SHAPES)} | embedded | <model dir>")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--sequences", type=int, default=24)
    ap.add_argument("--ref-sequences", type=int, default=2)
    ap.add_argument("--ref-seconds", type=float, default=60.0, help="time limit per reference sequence")
    ap.add_argument("--ref-points", type=int, default=0,
                    help="also estimate a whole reference sequence from this many positions (0 = off)")
    ap.add_argument("--profile", type=int, default=None, help="GPU: profile decode steps at this position")
    ap.add_argument("--graphs", default="on", choices=["on", "off"], help="CUDA graphs for the main run")
    ap.add_argument("--compare-seq-len", type=int, default=0,
                    help="GPU: also time graphs on vs off at this length and compare their tokens")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny model, 2 short sequences")
    common.add_out_arg(ap, "speed-synth")
    args = ap.parse_args(argv)
    if args.small:
        args.model, args.device, args.seq_len, args.batch, args.sequences = "tiny", "cpu", 16, 2, 2
        args.ref_sequences, args.ref_seconds = 1, 5.0
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    res: dict = {}
    if device.type == "cuda":
        res["hbm_bytes_per_s"] = hbm_bandwidth(device)
    t = time.perf_counter()
    model = build_model(args.model, device, dtype)
    res["model_build_s"] = time.perf_counter() - t
    res["params"] = sum(p.numel() for p in model.parameters())
    res["decode_rel_error"] = decode_error(model, device)
    items = items_for(args.sequences, model.config.vocab_size)
    if args.compare_seq_len and device.type == "cuda":
        runs = [run_generator(model, items[: args.batch], args.compare_seq_len, args.batch, device, g)
                for g in (False, True)]
        same = sum(a == b for a, b in zip(runs[0].pop("_ids"), runs[1].pop("_ids"), strict=True))
        res["graphs_vs_eager"] = {"eager": runs[0], "graphs": runs[1], "identical_sequences": same,
                                  "sequences": len(items[: args.batch])}
        print("graphs_vs_eager:", json.dumps(res["graphs_vs_eager"]), flush=True)
    res["generator"] = run_generator(model, items, args.seq_len, args.batch, device, args.graphs == "on")
    res["generator"].pop("_ids")
    print("generator:", json.dumps(res["generator"]), "decode_rel_error:", res["decode_rel_error"], flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["reference"] = run_reference(model, items[: args.ref_sequences], args.seq_len, args.ref_seconds, device)
    res["ratio"] = res["generator"]["tokens_per_s"] / res["reference"]["tokens_per_s"]
    print("reference:", json.dumps(res["reference"]), flush=True)
    if args.ref_points:
        res["reference_whole"] = reference_profile(model, args.seq_len, args.ref_points, 64, device)
        res["ratio_whole"] = res["generator"]["tokens_per_s"] / res["reference_whole"]["tokens_per_s"]
    if args.profile is not None and device.type == "cuda":
        print(profile_steps(model, args.batch, args.profile, args.graphs == "on", device))
    if device.type == "cuda":
        sizes = [len(c) for c in batches(items, args.batch)]
        need = decode_bytes(model, args.seq_len, sizes) / res["hbm_bytes_per_s"]
        res["roofline_seconds"] = need
        res["roofline_fraction"] = need / res["generator"]["seconds"]
    g, r = res["generator"], res["reference"]
    print(f"\n| {common.device_name(device)} | {args.model} | seq_len {args.seq_len} | batch {args.batch} | graphs {args.graphs} |")
    print(f"| generator | {g['tokens_per_s']:.1f} tok/s ({g['tokens']} tokens, {g['seconds']:.1f} s) |")
    print(f"| reference | {r['tokens_per_s']:.2f} tok/s ({r['tokens']} tokens, {r['seconds']:.1f} s) |")
    print(f"| ratio | {res['ratio']:.1f}x |")
    if "reference_whole" in res:
        w = res["reference_whole"]
        print(f"| reference, whole sequence (estimated) | {w['tokens_per_s']:.2f} tok/s "
              f"({w['sequence_seconds']:.0f} s per sequence; {w['method']}) |")
        print(f"| ratio, whole sequence | {res['ratio_whole']:.1f}x |")
    print(f"| decode vs forward | rel. error {res['decode_rel_error']:.2e} |")
    if "graphs_vs_eager" in res:
        c = res["graphs_vs_eager"]
        print(f"| seq_len {args.compare_seq_len}: eager {c['eager']['tokens_per_s']:.0f} tok/s, CUDA graphs "
              f"{c['graphs']['tokens_per_s']:.0f} tok/s; identical sequences {c['identical_sequences']}/{c['sequences']} |")
    if "roofline_fraction" in res:
        print(f"| roofline | {100 * res['roofline_fraction']:.1f}% of {res['hbm_bytes_per_s'] / 1e12:.2f} TB/s "
              f"({res['roofline_seconds']:.1f} s of bytes) |")
    common.say("wrote", common.write_result(args, res))


if __name__ == "__main__":
    main()
