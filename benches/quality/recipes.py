"""PPL (and zero-shot accuracy) of quantization recipes side by side on one model, one run.

A recipe is `quant.recipe.Recipe` text, steps joined by `+` then the scheme
(`Recipe.parse`): `rtn:W4g64`, `awq+tesseraq+e2e-qp:W2g64`, `quarot+gptq:W4A4KV4`. Weight-only
schemes (`W3g64`) use the efficientqat preset (asymmetric, learned step sizes and zero points),
schemes with activations or KV cache (`W4A8KV4`) the llm-qat preset (symmetric min-max);
`--preset efficientqat` gives those asymmetric per-token activations and KV cache instead.
`--options` sets a method's options in every recipe that has it (`{"tesseraq": {"iterations":
50}}`); a recipe may carry a tag, `gptq:W4g64@act`, whose options come from the key `@act`
(`{"@act": {"gptq": {"act_order": true}}}`), so one method can run twice with other options.

Every step runs the library code the stages run (`quant.calibrate.calibrate`,
`quant.blockwise.engine.reconstruct`, `quant.e2e.trainer.train`), in memory. Recipes that
share a prefix share its work: `awq:W3g64`, `awq+tesseraq:W3g64` and `awq+tesseraq+e2e-qp:W3g64`
calibrate once and run TesseraQ once.

Data (the stages' protocol, never the evaluation texts): calibration steps get
`--calib-samples` random windows of `--calib-seq-len` tokens from the first 95% of the
calibration text; block-wise and end-to-end training get `--train-samples` windows of
`--seq-len` from it, validation windows from the last 5%. An e2e step's learning rate is
chosen among `--e2e-lr-mults` x its base lr (the step's `lr` option; e2e-qp without one: the
paper's 2e-5 at W2, 1e-5 above) by that validation loss. PPL is `quant.eval.ppl.perplexity`
at `--seq-len` on every evaluation text, fp32 forward (bf16 autocast on GPU only inside
training); `--tasks` adds the zero-shot tasks as the evaluate stage runs them.

    python -m benches.quality.recipes --recipes rtn:W4g64,awq:W4g64,awq+block-ap+e2e-qp:W4g64
    python -m benches.quality.recipes --recipes rtn:W4A8KV4,quarot+rtn:W4A8KV4 --preset efficientqat
    python -m benches.quality.recipes --recipes quarot+rtn:W4A8KV4,quarot+rtn:W4A8KV4@fuse \
        --options '{"@fuse": {"quarot": {"norms": "fuse"}}}'    # QuaRot's two norm treatments
    python -m benches.quality.recipes --recipes rtn:W4g64,gptq:W4g64,gptq:W4g64@act \\
        --options '{"@act": {"gptq": {"act_order": true}}}' --tasks all
    python -m benches.quality.recipes --small          # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benches import common
from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.recipe import Recipe, Step

SMALL_OPTIONS = {"block-ap": {"epochs": 1, "batch_size": 2},
                 "tesseraq": {"thresholds": [0.5, 0.1], "iterations": 2, "batch_size": 2}}


# ---------------------------------------------------------------------------
# Recipes from the command line


def with_preset(scheme: QuantScheme, preset: str) -> QuantScheme:
    """The same bit widths and group size under `preset` (auto: as the text says)."""
    if preset == "auto":
        return scheme
    a = scheme.activation.format.bits if scheme.activation else 16
    kv = scheme.kv_cache.format.bits if scheme.kv_cache else 16
    return QuantScheme.from_name(f"W{scheme.weight.bits}A{a}KV{kv}", preset=preset,
                                 group_size=scheme.weight.group_size)


def parse_recipes(texts: str, options: dict[str, Any], preset: str) -> dict[str, Recipe]:
    """label -> Recipe for `TEXT[@TAG],...`; options by method name, and by `@TAG`."""
    out = {}
    for label in filter(None, (t.strip() for t in texts.split(","))):
        text, at, tag = label.partition("@")
        steps, _, scheme_text = text.partition(":")
        names = steps.split("+")
        opts = {k: v for k, v in options.items() if k in names}
        if at:
            if f"@{tag}" not in options:
                raise SystemExit(f"recipe {label!r}: no options under the key '@{tag}' in --options")
            opts |= options[f"@{tag}"]
        try:
            scheme = with_preset(QuantScheme.parse(scheme_text, f"recipe {label!r}: scheme"), preset)
            out[label] = Recipe.parse(steps, opts, scheme=scheme)
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None
    return out


# ---------------------------------------------------------------------------
# Running recipes, sharing prefixes


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Runner:
    """Runs the stages of a recipe on a copy of its prefix's model; keeps the prefixes later
    recipes start from (`keep_for`). Work files live in a temporary directory under `work`,
    removed with the runner."""

    def __init__(self, fp, calib_ids: torch.Tensor, train_ids: torch.Tensor | None = None,
                 val_ids: torch.Tensor | None = None, work: Path | None = None,
                 e2e: tuple[int, int] = (1, 4), lr_mults: tuple[float, ...] = (1.0,)) -> None:
        self.fp, self.calib_ids, self.train_ids, self.val_ids = fp, calib_ids, train_ids, val_ids
        self._tmp = tempfile.TemporaryDirectory(prefix="quality-recipes-", dir=work)
        self.work = Path(self._tmp.name)
        self.e2e_epochs, self.e2e_batch = e2e  # end-to-end training: epochs, batch size
        self.lr_mults = lr_mults
        self.models: dict[str, torch.nn.Module] = {}
        self.info: dict[str, dict[str, Any]] = {}

    @staticmethod
    def stages(recipe: Recipe) -> list[tuple[str, str]]:
        """(stage kind, key of the model after it) for each stage the recipe runs; a key names
        the scheme and every step so far, so recipes with the same prefix share its keys."""
        out, key = [], _key(recipe.scheme.to_dict())
        for kind in ("calibrate", "blockwise", "e2e"):
            steps = getattr(recipe, kind)
            if steps:
                key = _key(key, kind, [s.spec() for s in steps])
                out.append((kind, key))
        return out

    def model(self, recipe: Recipe, info: dict[str, Any]) -> torch.nn.Module:
        """The quantized model of `recipe` (a cached prefix is reused); what each stage did in `info`."""
        model = self.fp
        for kind, key in self.stages(recipe):
            if key in self.models:
                info[kind] = {**self.info[key], "shared": True}  # an earlier recipe's prefix
            else:
                t = time.time()
                run = {"calibrate": self._calibrate, "blockwise": self._blockwise, "e2e": self._e2e}[kind]
                self.models[key], self.info[key] = run(model, recipe, key)
                self.info[key]["seconds"] = round(time.time() - t, 1)
                info[kind] = self.info[key]
            model = self.models[key]
        return model

    def keep_for(self, recipes: list[Recipe]) -> None:
        """Drop every cached model that none of `recipes` (those still to run) starts from."""
        needed = {key for r in recipes for _, key in self.stages(r)}
        for key in [k for k in self.models if k not in needed]:
            del self.models[key]
        common.free_memory()

    def _calibrate(self, _fp, recipe: Recipe, _key: str):
        from quant.calibrate import calibrate

        model = copy.deepcopy(self.fp).to(common.device())
        cal = calibrate(model, recipe.scheme, recipe.calibrate, self.calib_ids, seed=0)
        return model.cpu(), {"metrics": {k: v for k, v in cal.metrics.items() if isinstance(v, int | float)}}

    def _blockwise(self, base, recipe: Recipe, key: str):
        from quant.blockwise.engine import BlockwiseContext, reconstruct

        model = copy.deepcopy(base).cpu().float()  # the engine keeps fp32 master weights on the host
        ctx = BlockwiseContext(common.device(), self.work / f"blockwise-{key}", 0, key, train_ids=self.train_ids,
                               val_ids=self.val_ids, scheme=recipe.model_scheme)
        res = reconstruct(model, recipe.blockwise, ctx)
        return model, {"block_val_mse_init": [b.get("val_loss_init") for b in res.per_block],
                       "block_val_mse": [b["val_loss_final"] for b in res.per_block],  # the state kept
                       "blocks_kept_init": sum(b["kept"] == "init" for b in res.per_block)}

    def _e2e(self, base, recipe: Recipe, key: str):
        """Each learning rate on a copy of `base`; the best by validation loss is kept."""
        from quant.e2e.distributed import make_accelerator
        from quant.e2e.trainer import E2EContext, TrainConfig, train

        (step,) = recipe.e2e
        acc = make_accelerator()
        best, tried = None, {}
        for lr in (m * base_lr(step, recipe.model_scheme) for m in self.lr_mults):
            trial = Step(step.method, dataclasses.replace(step.options, lr=lr))
            teacher = copy.deepcopy(self.fp) if step.method == "kd" else None
            ctx = E2EContext(recipe.model_scheme, acc.device, torch.float32, seed=0, teacher=teacher)
            cfg = TrainConfig(epochs=self.e2e_epochs, batch_size=self.e2e_batch, save_every=0, log_every=20)
            res, student = train(copy.deepcopy(base), (trial,), self.train_ids, self.val_ids, cfg, ctx,
                                 self.work / f"e2e-{key}-{lr}", acc)
            tried[str(lr)] = {"val_loss_before": res.val_loss_before, "val_loss": res.val_loss_after,
                              "steps": res.steps}
            if best is None or res.val_loss_after < best[0]:
                best = (res.val_loss_after, lr, student.cpu())
        return best[2], {"lr": best[1], "tried": tried}


def base_lr(step: Step, scheme: QuantScheme) -> float:
    """The step's lr; e2e-qp at its default lr: the paper's (2e-5 at W2, 1e-5 above)."""
    if step.method == "e2e-qp" and step.options.lr == type(step.options)().lr:
        return 2e-5 if scheme.weight.bits <= 2 else 1e-5
    return step.options.lr


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(ap)
    ap.add_argument("--recipes", default=None, help="comma-separated, e.g. rtn:W4g64,awq+tesseraq:W3g64")
    ap.add_argument("--options", default="{}", help='JSON: method -> options, "@tag" -> {method: options}')
    ap.add_argument("--preset", default="auto", choices=["auto", "efficientqat", "llm-qat"],
                    help="scheme preset of every recipe (auto: as its scheme text says)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--train-samples", type=int, default=256)
    ap.add_argument("--val-samples", type=int, default=16)
    ap.add_argument("--e2e-epochs", type=int, default=1)
    ap.add_argument("--e2e-batch", type=int, default=4)
    ap.add_argument("--e2e-lr-mults", default="1,5", help="e2e learning rates as multiples of the base lr")
    ap.add_argument("--eval-windows", type=int, default=16, help="per text; 0 = whole texts")
    ap.add_argument("--deadline-s", type=float, default=0, help="start no recipe after this many seconds")
    ap.add_argument("--work", type=Path, default=None, help="block-wise / e2e work files (default: temp dir)")
    common.add_task_args(ap)
    common.add_out_arg(ap, "quality-recipes")
    args = ap.parse_args(argv)
    options = json.loads(args.options)
    if args.small:
        args.recipes = args.recipes or "rtn:W4g64,rtn+block-ap:W4g64,rtn+block-ap+e2e-qp:W4g64"
        options = {**SMALL_OPTIONS, **options}
        args.calib_samples, args.calib_seq_len, args.seq_len = 4, 64, 64
        args.train_samples, args.val_samples, args.e2e_batch, args.e2e_lr_mults, args.eval_windows = 8, 2, 2, "1", 2
    if not args.recipes:
        ap.error("--recipes is required (or --small)")
    recipes = parse_recipes(args.recipes, options, args.preset)
    common.set_threads(args.threads)
    run(args, recipes)


def run(args: argparse.Namespace, recipes: dict[str, Recipe]) -> None:
    from quant.data import sample_windows, tokenize_text, windows

    fp, tok = common.load_fp_model(args.model, args.small)
    calib_text, eval_texts = common.texts(args.data, args.small)
    evals = common.eval_ids(tok, eval_texts)
    calib = tokenize_text(tok, calib_text)
    cut = int(calib.numel() * 0.95)
    runner = Runner(fp, sample_windows(calib[:cut], args.calib_samples, args.calib_seq_len, seed=0),
                    sample_windows(calib[:cut], args.train_samples, args.seq_len, seed=1),
                    windows(calib[cut:], args.seq_len)[: args.val_samples], args.work, (args.e2e_epochs, args.e2e_batch),
                    tuple(float(x) for x in args.e2e_lr_mults.split(",")))
    windows_per_text = args.eval_windows or None
    results: dict[str, Any] = {"fp": {"ppl": common.perplexities(fp, evals, args.seq_len, windows_per_text)}}
    results["fp"] |= common.task_scores(fp, tok, args)
    results["recipes"] = {}
    common.say("fp", results["fp"])
    todo = list(recipes.values())
    for label, recipe in recipes.items():
        todo.pop(0)
        if args.deadline_s and time.perf_counter() - common.T0 > args.deadline_s:
            results["recipes"][label] = {"skipped": "deadline"}
            continue
        entry: dict[str, Any] = {"recipe": str(recipe), "params": recipe.params(), "stages": {}}
        t = time.time()
        try:
            model = runner.model(recipe, entry["stages"])
            entry["ppl"] = common.perplexities(model, evals, args.seq_len, windows_per_text)
            entry["ppl_ratio"] = {k: round(v / results["fp"]["ppl"][k], 4) for k, v in entry["ppl"].items()}
            entry |= common.task_scores(model, tok, args)
            common.say(label, entry["ppl"], entry["ppl_ratio"])
        except Exception as exc:  # a failing recipe is recorded and does not stop the others
            entry["error"] = f"{type(exc).__name__}: {exc}"
            common.say(label, "FAILED", entry["error"])
        entry["seconds"] = round(time.time() - t, 1)
        results["recipes"][label] = entry
        runner.keep_for(todo)
        common.write_result(args, results)
    path = common.write_result(args, results)
    print_table(results, list(evals))
    common.say("wrote", path)


def print_table(results: dict[str, Any], texts: list[str]) -> None:
    acc = "avg_acc" in results["fp"]
    print("\n| recipe | " + " | ".join(f"PPL {k} (x fp)" for k in texts) + (" | avg acc |" if acc else " |"))
    print("|---|" + "---:|" * (len(texts) + acc))
    fp = results["fp"]
    print("| fp | " + " | ".join(f"{fp['ppl'][k]:.2f}" for k in texts) + (f" | {fp['avg_acc']:.4f} |" if acc else " |"))
    for name, r in results["recipes"].items():
        if "ppl" in r:
            cells = " | ".join(f"{r['ppl'][k]:.2f} ({r['ppl_ratio'][k]:.2f}x)" for k in texts)
            print(f"| {name} | {cells}" + (f" | {r['avg_acc']:.4f} |" if acc else " |"))
        else:
            print(f"| {name} | {r.get('error') or r.get('skipped')} |")


if __name__ == "__main__":
    main()
