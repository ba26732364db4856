"""Quality of FP quantization (LLM-FP4) on a model: min-max INT/FP, FP search, MXFP4/NVFP4.

Rows, for every scheme of --schemes (W4A4, W4A8, W8A8; weights per output channel):
  minmax-int      INT weights (asymmetric min-max) + INT activations (per-tensor min-max of
                  the current input, dynamic)
  minmax-fp       FP weights (min-max bias per channel) + FP activations (per-tensor min-max
                  bias, dynamic); 4 bits = E2M1, 8 bits = E4M3
  search          the fp-search step without pre-shift (static per-tensor act bias)
  search-preshift fp-search with the pre-shifted per-channel activation bias
with --rotate, the quarot step (residual + online Hadamard rotations, seed 0, online: auto;
`norms: fuse`, the treatment the committed rows were measured with, unless --quarot-norms
online) followed by
  quarot-minmax-fp         rtn: min-max FP weights + dynamic per-tensor FP activations
  quarot+search            fp-search without pre-shift (the search sees the rotated inputs of
                           o_proj / down_proj)
  quarot+search-preshift   fp-search with the pre-shift
and (--block) weight-only and W4A4 round-to-nearest rows of MXFP4 (g32), NVFP4 (g16) beside
symmetric INT4 g32 / g16 (W4A4 INT rows use per-token INT4 activations: the activation
quantizer has no group granularity).

Each row is a recipe (quant.recipe.Recipe: its scheme, FP formats having no text form, and
its calibrate steps), run as benches.quality.recipes runs one. PPL: quant.eval.ppl.perplexity
on every evaluation text (--eval-windows windows of --seq-len), fp32 forward; with --tasks
the zero-shot tasks of quant.eval.lm_tasks. Resumable: rows already in --out are skipped, so
the table can be filled by several runs. The time of fp-search on a 7B-shaped model:
`python -m benches.speed.calibrate --method fp-search`.

    python -m benches.quality.fp_formats --model DIR --data DIR --rotate --block
    python -m benches.quality.fp_formats --small          # CPU smoke run
"""

from __future__ import annotations

import argparse
from typing import Any

from benches import common
from benches.quality.recipes import Runner
from quant.config.scheme import QuantScheme
from quant.recipe import Recipe, Step

FP_OF_BITS = {4: "fp4-e2m1", 8: "fp8-e4m3", 6: "fp6-e2m3"}


def _act(fmt: str, granularity: str = "per_tensor") -> dict:
    return {"format": fmt, "granularity": granularity}


def rows(schemes: list[str], block: bool, rotate: str | None, search: dict[str, Any]) -> dict[str, Recipe]:
    """Row key -> the recipe of that row; `search` holds the fp-search options of every row,
    `rotate` QuaRot's norms option in the QuaRot rows (None: no QuaRot rows)."""
    out: dict[str, Recipe] = {}

    def add(key: str, scheme: dict, *steps: Step) -> None:
        out[key] = Recipe(QuantScheme.from_dict(scheme, f"row {key}: scheme"), steps)

    def fp_search(pre_shift: bool) -> Step:
        return Step("fp-search", {**search, "pre_shift": pre_shift})

    for name in schemes:
        w, a = (int(v) for v in name.upper().lstrip("W").split("A"))
        fp = {"weight": {"format": FP_OF_BITS[w], "group_size": -1}, "activation": _act(FP_OF_BITS[a])}
        add(f"{name}/minmax-int", {"weight": {"format": f"int{w}", "group_size": -1},
                                   "activation": _act(f"int{a}")}, Step("rtn"))
        add(f"{name}/minmax-fp", fp, Step("rtn"))
        add(f"{name}/search", fp, fp_search(False))
        add(f"{name}/search-preshift", fp, fp_search(True))
        if rotate:
            quarot = Step("quarot", {"norms": rotate})
            add(f"{name}/quarot-minmax-fp", fp, quarot, Step("rtn"))
            add(f"{name}/quarot+search", fp, quarot, fp_search(False))
            add(f"{name}/quarot+search-preshift", fp, quarot, fp_search(True))
    if block:
        weights = {"mxfp4": {"format": "mxfp4", "group_size": 32},
                   "nvfp4": {"format": "nvfp4", "group_size": 16},
                   "int4g32": {"format": "int4", "group_size": 32, "symmetric": True},
                   "int4g16": {"format": "int4", "group_size": 16, "symmetric": True}}
        for k, wspec in weights.items():
            add(f"W4A16/{k}", {"weight": wspec}, Step("rtn"))
            act = _act(wspec["format"]) if "fp4" in k else _act("int4", "per_token") | {"symmetric": True}
            add(f"W4A4/{k}", {"weight": wspec, "activation": act}, Step("rtn"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(ap)
    ap.add_argument("--schemes", default="W4A4,W4A8,W8A8")
    ap.add_argument("--only", default="", help="comma-separated row keys (default: all)")
    ap.add_argument("--block", action="store_true", help="add the MXFP4/NVFP4 vs INT4 rows")
    ap.add_argument("--rotate", action="store_true",
                    help="add the QuaRot rows (quarot-minmax-fp, quarot+search, quarot+search-preshift)")
    ap.add_argument("--quarot-norms", default="fuse", choices=["fuse", "online"],
                    help="QuaRot's norms option in the --rotate rows (fuse: as the committed rows)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--search-tokens", type=int, default=4096)
    ap.add_argument("--no-format-search", action="store_true")
    ap.add_argument("--fold", default="quantized", choices=["weight", "quantized"],
                    help="pre-shift 2^-k into the weight before (weight) or after (quantized) weight quantization")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None)
    common.add_task_args(ap)
    common.add_out_arg(ap, "quality-fp_formats")
    args = ap.parse_args(argv)
    if args.small:
        args.schemes, args.calib_samples, args.calib_len, args.seq_len, args.eval_windows = "W4A8", 4, 64, 64, 2
        args.rounds, args.candidates, args.search_tokens = 1, 4, 64
    common.set_threads(args.threads)
    search = {"rounds": args.rounds, "candidates": args.candidates, "search_tokens": args.search_tokens,
              "search_format": not args.no_format_search, "fold": args.fold}
    table_rows = rows(args.schemes.split(","), args.block, args.quarot_norms if args.rotate else None, search)
    wanted = set(filter(None, args.only.split(",")))
    run(args, {k: r for k, r in table_rows.items() if not wanted or k in wanted})


def run(args: argparse.Namespace, recipes: dict[str, Recipe]) -> None:
    from quant.data import sample_windows, tokenize_text

    results = common.read_result(args)
    table = results.setdefault("rows", {})
    fp, tok = common.load_fp_model(args.model, args.small)
    calib_text, eval_texts = common.texts(args.data, args.small)
    evals = common.eval_ids(tok, eval_texts)
    if "fp" not in table:
        table["fp"] = {"ppl": common.perplexities(fp, evals, args.seq_len, args.eval_windows)}
        table["fp"] |= common.task_scores(fp, tok, args)
        common.say("fp", table["fp"])
        common.write_result(args, results)
    calib = sample_windows(tokenize_text(tok, calib_text), args.calib_samples, args.calib_len, seed=0)
    runner = Runner(fp, calib)
    todo = [(k, r) for k, r in recipes.items() if k not in table]
    for i, (key, recipe) in enumerate(todo):
        info: dict[str, Any] = {}
        model = runner.model(recipe, info)
        row = {"recipe": str(recipe), "params": recipe.params(), "calibrate_s": info["calibrate"]["seconds"],
               "metrics": info["calibrate"]["metrics"]}
        row["ppl"] = common.perplexities(model, evals, args.seq_len, args.eval_windows)
        row |= common.task_scores(model, tok, args)
        table[key] = row
        runner.keep_for([r for _, r in todo[i + 1 :]])
        common.say(key, row["ppl"], f"calibrate {row['calibrate_s']}s")
        common.write_result(args, results)
    names = list(evals)
    print("\n| row | " + " | ".join(f"PPL {k}" for k in names) + " | avg acc | calibrate s |")
    print("|---|" + "---:|" * (len(names) + 2))
    for key, r in table.items():
        acc = f"{r['avg_acc']:.4f}" if "avg_acc" in r else "-"
        print(f"| {key} | " + " | ".join(f"{r['ppl'][k]:.2f}" for k in names)
              + f" | {acc} | {r.get('calibrate_s', '-')} |")
    common.say("wrote", common.write_result(args, results))


if __name__ == "__main__":
    main()
