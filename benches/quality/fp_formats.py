"""Quality of FP quantization (LLM-FP4) on a model: min-max INT/FP, FP search, MXFP4/NVFP4.

Rows, for every scheme of --schemes (W4A4, W4A8, W8A8; weights per output channel):
  minmax-int      INT weights (asymmetric min-max) + INT activations (per-tensor min-max of
                  the current input, dynamic)
  minmax-fp       FP weights (min-max bias per channel) + FP activations (per-tensor min-max
                  bias, dynamic); 4 bits = E2M1, 8 bits = E4M3
  search          calibrate.method fp-search without pre-shift (static per-tensor act bias)
  search-preshift fp-search with the pre-shifted per-channel activation bias
with --rotate, QuaRot (calibrate.method quarot: residual + online Hadamard rotations, seed 0,
online: auto) followed by
  quarot-minmax-fp         min-max FP weights (weights: rtn) + dynamic per-tensor FP activations
  quarot+search            weights: fp-search without pre-shift (the search sees the rotated
                           inputs of o_proj / down_proj)
  quarot+search-preshift   weights: fp-search with the pre-shift
and (--block) weight-only and W4A4 round-to-nearest rows of MXFP4 (g32), NVFP4 (g16) beside
symmetric INT4 g32 / g16 (W4A4 INT rows use per-token INT4 activations: the activation
quantizer has no group granularity).

PPL: quant.eval.ppl.perplexity on every eval/*.txt of --data (--eval-windows windows of
--seq-len), fp32 forward; with --tasks the zero-shot tasks of quant.eval.lm_tasks.
Resumable: rows already in --out are skipped, so the table can be filled by several runs.
--timing-7b instead times fp-search on a Llama-2-7B-shaped model with --timing-layers
random layers (32 x 1024 random calibration tokens) and extrapolates to 32 layers.

    python benches/quality_fp.py --model DIR --data DIR --out results.json
Imports only quant.*, torch, transformers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.calibrate import CALIBRATE  # noqa: E402
from quant.config.scheme import QuantScheme  # noqa: E402
from quant.data import sample_windows, tokenize_text  # noqa: E402
from quant.eval.ppl import perplexity  # noqa: E402
from quant.modules.runtime import apply_runtime_quantizers  # noqa: E402

T0 = time.time()
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP_OF_BITS = {4: "fp4-e2m1", 8: "fp8-e4m3", 6: "fp6-e2m3"}


def say(*a) -> None:
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def _act(fmt: str, granularity: str = "per_tensor") -> dict:
    return {"format": fmt, "granularity": granularity}


def rows(schemes: list[str], block: bool, rotate: bool = False) -> dict[str, tuple[str, dict, dict]]:
    """key -> (method, scheme dict, options: fp-search overrides, or quarot options whose
    `fp_search` holds fp-search overrides)."""
    out: dict[str, tuple[str, dict, dict]] = {}
    for name in schemes:
        w, a = (int(v) for v in name.upper().lstrip("W").split("A"))
        wf, af = FP_OF_BITS[w], FP_OF_BITS[a]
        fp = {"weight": {"format": wf, "group_size": -1}, "activation": _act(af)}
        out[f"{name}/minmax-int"] = ("rtn", {"weight": {"format": f"int{w}", "group_size": -1},
                                             "activation": _act(f"int{a}")}, {})
        out[f"{name}/minmax-fp"] = ("rtn", fp, {})
        out[f"{name}/search"] = ("fp-search", fp, {"pre_shift": False})
        out[f"{name}/search-preshift"] = ("fp-search", fp, {"pre_shift": True})
        if rotate:
            out[f"{name}/quarot-minmax-fp"] = ("quarot", fp, {})
            for key, pre_shift in (("quarot+search", False), ("quarot+search-preshift", True)):
                out[f"{name}/{key}"] = ("quarot", fp, {"weights": "fp-search",
                                                       "fp_search": {"pre_shift": pre_shift}})
    if block:
        weights = {"mxfp4": {"format": "mxfp4", "group_size": 32},
                   "nvfp4": {"format": "nvfp4", "group_size": 16},
                   "int4g32": {"format": "int4", "group_size": 32, "symmetric": True},
                   "int4g16": {"format": "int4", "group_size": 16, "symmetric": True}}
        for k, wspec in weights.items():
            out[f"W4A16/{k}"] = ("rtn", {"weight": wspec}, {})
            act = _act(wspec["format"]) if "fp4" in k else _act("int4", "per_token") | {"symmetric": True}
            out[f"W4A4/{k}"] = ("rtn", {"weight": wspec, "activation": act}, {})
    return out


def ppl_all(model, evals: dict[str, torch.Tensor], seq_len: int, windows: int) -> dict[str, float]:
    model.to(DEV).eval()
    out = {k: perplexity(model, ids, seq_len, batch_size=4, max_windows=windows).ppl for k, ids in evals.items()}
    model.cpu()
    return out


def task_scores(model, tok, names: str, limit: int | None) -> dict[str, object]:
    from quant.eval import lm_tasks

    run = lm_tasks.TaskRun(names=lm_tasks.TASK_NAMES if names == "all" else tuple(names.split(",")),
                           limit=limit, batch_size=32)
    model.to(DEV)
    res = lm_tasks.run_tasks(model, tok, run, tempfile.mkdtemp(prefix="fp-tasks-"))
    model.cpu()
    metrics = lm_tasks.extract_metrics(res, run.names)
    return {"avg_acc": lm_tasks.average(metrics), "tasks": metrics}


def timing_7b(args) -> dict[str, object]:
    """fp-search wall time on a Llama-2-7B-shaped model of --timing-layers layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads = (int(v) for v in args.timing_shape.split(","))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=args.timing_layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (args.calib_samples, args.calib_len))
    out = {}
    for pre_shift in (False, True):
        scheme = QuantScheme.from_dict(rows(["W4A4"], False)["W4A4/search"][1], "scheme")
        opts = search_options(args, {"pre_shift": pre_shift})
        if DEV.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        m = CALIBRATE.get("fp-search").fn(copy.deepcopy(model), scheme, ids, opts)
        wall = time.time() - t
        out[f"pre_shift={pre_shift}"] = {"seconds": round(wall, 1), "search_s": m["search_s"],
                                         "extrapolated_32_layers_s": round(wall * 32 / args.timing_layers, 1)}
        say("7B-shaped", out)
    return {"layers": args.timing_layers, "shape": args.timing_shape, "calib": [args.calib_samples, args.calib_len],
            "device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", **out}


def search_dict(args, extra: dict) -> dict:
    return {"rounds": args.rounds, "candidates": args.candidates, "search_tokens": args.search_tokens,
            "search_format": not args.no_format_search, "device": str(DEV), "fold": args.fold, **extra}


def search_options(args, extra: dict):
    return CALIBRATE.get("fp-search").options.from_dict(search_dict(args, extra), "options")


def method_options(args, method: str, extra: dict):
    """The options of one row: the command line's search settings under its overrides."""
    entry = CALIBRATE.get(method)
    if method == "fp-search":
        return search_options(args, extra)
    if method == "quarot" and extra.get("weights") == "fp-search":
        extra = {**extra, "fp_search": search_dict(args, extra.get("fp_search", {}))}
    return entry.options.from_dict(extra, "options")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="fp32 safetensors model directory")
    ap.add_argument("--data", type=Path, help="calib.txt + eval/*.txt (what tasks.prepare writes)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--schemes", default="W4A4,W4A8,W8A8")
    ap.add_argument("--only", default="", help="comma-separated row keys (default: all)")
    ap.add_argument("--block", action="store_true", help="add the MXFP4/NVFP4 vs INT4 rows")
    ap.add_argument("--rotate", action="store_true",
                    help="add the QuaRot rows (quarot-minmax-fp, quarot+search, quarot+search-preshift)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--search-tokens", type=int, default=4096)
    ap.add_argument("--no-format-search", action="store_true")
    ap.add_argument("--fold", default="quantized", choices=["weight", "quantized"],
                    help="pre-shift 2^-k into the weight before (weight) or after (quantized) "
                         "weight quantization")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--tasks", default="", help="'all' or lm_tasks names, e.g. boolq,piqa")
    ap.add_argument("--task-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timing-7b", action="store_true")
    ap.add_argument("--timing-layers", type=int, default=2)
    ap.add_argument("--timing-shape", default="4096,11008,32", help="hidden,intermediate,heads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["settings"] = {k: str(v) for k, v in vars(args).items()}

    def dump() -> None:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(args.out)

    if args.timing_7b:
        results["timing_7b"] = timing_7b(args)
        dump()
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    calib = sample_windows(tokenize_text(tok, (args.data / "calib.txt").read_text()),
                           args.calib_samples, args.calib_len, seed=0)
    evals = {p.stem: tokenize_text(tok, p.read_text()) for p in sorted((args.data / "eval").glob("*.txt"))}
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    table = results.setdefault("rows", {})
    if "fp" not in table:
        table["fp"] = {"ppl": ppl_all(fp, evals, args.seq_len, args.eval_windows)}
        if args.tasks:
            table["fp"] |= task_scores(fp, tok, args.tasks, args.task_limit)
        say("fp", table["fp"])
        dump()
    wanted = set(filter(None, args.only.split(",")))
    for key, (method, scheme_dict, extra) in rows(args.schemes.split(","), args.block, args.rotate).items():
        if key in table or (wanted and key not in wanted):
            continue
        scheme = QuantScheme.from_dict(scheme_dict, "scheme")
        model = copy.deepcopy(fp)
        entry = CALIBRATE.get(method)
        opts = method_options(args, method, extra)
        t = time.time()
        metrics = entry.fn(model, scheme, calib, opts)
        row = {"method": method, "scheme": scheme.to_dict(), "calibrate_s": round(time.time() - t, 1),
               "metrics": metrics}
        apply_runtime_quantizers(model, scheme)
        row["ppl"] = ppl_all(model, evals, args.seq_len, args.eval_windows)
        if args.tasks:
            row |= task_scores(model, tok, args.tasks, args.task_limit)
        table[key] = row
        say(key, row["ppl"], f"calibrate {row['calibrate_s']}s")
        dump()
    names = list(evals)
    print("\n| row | " + " | ".join(f"PPL {k}" for k in names) + " | avg acc | calibrate s |")
    print("|---|" + "---:|" * (len(names) + 2))
    for key, r in table.items():
        acc = f"{r['avg_acc']:.4f}" if "avg_acc" in r else "-"
        print(f"| {key} | " + " | ".join(f"{r['ppl'][k]:.2f}" for k in names)
              + f" | {acc} | {r.get('calibrate_s', '-')} |")


if __name__ == "__main__":
    main()
