"""PPL of quantization recipes side by side on one model (GPU or CPU), one run.

A recipe is `calibrate[+blockwise][+e2e]:SCHEME`, each part a method name from the
library's registries (`quant.calibrate.CALIBRATE`, `blockwise_methods()`, `e2e_methods()`),
for example `rtn:W4g64`, `awq+tesseraq+e2e-qp:W2g64`, `quarot:W4A4KV4`. SCHEME is
`W<w>A<a>KV<kv>` or `W<w>g<group>`: weight-only schemes use the `efficientqat` preset
(asymmetric, learned step sizes and zero points, group 64 unless `g` says otherwise);
schemes that quantize activations or the KV cache use the `llm-qat` preset (symmetric
min-max, per-channel weights, per-token activations and KV cache).

Recipes that share a prefix share its work: `awq:W3g64`, `awq+tesseraq:W3g64` and
`awq+tesseraq+e2e-qp:W3g64` calibrate once and run TesseraQ once.

Data (the stages' protocol, never the evaluation texts): calibration methods get
`--calib-samples` random windows of `--calib-seq-len` tokens from the calibration text;
block-wise and end-to-end training get `--train-samples` windows of `--seq-len` from its
first 95%, validation windows from the last 5%. The E2E-QP learning rate is chosen among
`--e2e-lr-mults` x the paper's by that validation loss. PPL is `quant.eval.ppl.perplexity`
at `--seq-len` on every text of `<data>/eval/`, fp32 forward (bf16 autocast on GPU only
inside training).

Usage: python benches/quality_recipes.py --model DIR --data DIR --out results.json \\
           --recipes rtn:W4g64,awq:W4g64 [--options '{"tesseraq": {"iterations": 50}}']
Imports only quant.*, torch and transformers.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.blockwise.engine import BlockwiseContext, blockwise_methods  # noqa: E402
from quant.calibrate import CALIBRATE  # noqa: E402
from quant.config.scheme import QuantScheme  # noqa: E402
from quant.data import sample_windows, tokenize_text, windows  # noqa: E402
from quant.e2e.trainer import (  # noqa: E402
    E2EContext,
    TrainConfig,
    Trainer,
    e2e_methods,
    make_accelerator,
)
from quant.eval.ppl import perplexity  # noqa: E402
from quant.modules.runtime import apply_runtime_quantizers  # noqa: E402

T0 = time.time()
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_WEIGHT_ONLY = re.compile(r"^W(\d+)(?:g(-?\d+))?$")


def say(*a) -> None:
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def parse_scheme(text: str) -> QuantScheme:
    m = _WEIGHT_ONLY.match(text)
    if m:
        group = int(m.group(2)) if m.group(2) else -1
        return QuantScheme.from_name(f"W{m.group(1)}A16KV16", preset="efficientqat", group_size=group)
    return QuantScheme.from_name(text, preset="llm-qat")


def parse_recipe(text: str) -> tuple[tuple[str, ...], str]:
    methods, _, scheme = text.partition(":")
    if not scheme:
        raise SystemExit(f"recipe {text!r} has no ':SCHEME' part, e.g. awq+tesseraq:W3g64")
    steps = tuple(methods.split("+"))
    calib = CALIBRATE.names()
    if steps[0] not in calib:
        raise SystemExit(f"recipe {text!r}: {steps[0]!r} is not a calibrate method; known: {calib}")
    for s in steps[1:]:
        if s not in blockwise_methods().names() + e2e_methods().names():
            raise SystemExit(f"recipe {text!r}: {s!r} is not a block-wise or e2e method; known: "
                             f"{blockwise_methods().names() + e2e_methods().names()}")
    parse_scheme(scheme)
    return steps, scheme


def ppl_all(model, evals: dict[str, torch.Tensor], seq_len: int, windows: int) -> dict[str, float]:
    model.to(DEV).eval()
    with torch.no_grad():
        out = {k: perplexity(model, ids, seq_len, batch_size=4, max_windows=windows).ppl
               for k, ids in evals.items()}
    model.cpu()
    return out


class Runner:
    """Runs one step of a recipe on a copy of its prefix's model; remembers every prefix."""

    def __init__(self, args, fp, tok) -> None:
        self.args, self.fp = args, fp
        calib = tokenize_text(tok, (args.data / "calib.txt").read_text())
        cut = int(calib.numel() * 0.95)
        self.calib_ids = sample_windows(calib[:cut], args.calib_samples, args.calib_seq_len, seed=0)
        self.train = sample_windows(calib[:cut], args.train_samples, args.seq_len, seed=1)
        self.val = windows(calib[cut:], args.seq_len)[: args.val_samples]
        self.options = json.loads(args.options) if args.options else {}
        self.models: dict[tuple, torch.nn.Module] = {}
        self.acc = make_accelerator()

    def _opts(self, entry, defaults: dict) -> object:
        return entry.options.from_dict({**defaults, **self.options.get(entry.name, {})}, entry.name)

    def step(self, scheme_text: str, steps: tuple[str, ...], info: dict) -> torch.nn.Module:
        key = (scheme_text, steps)
        if key in self.models:
            return self.models[key]
        scheme = parse_scheme(scheme_text)
        bits = scheme.weight.bits if scheme.weight else 16
        name = steps[-1]
        t = time.time()
        if len(steps) == 1:
            model = copy.deepcopy(self.fp)
            entry = CALIBRATE.get(name)
            model.to(DEV)
            metrics = entry.fn(model, scheme, self.calib_ids.to(DEV), self._opts(entry, {})) or {}
            model.cpu()
            apply_runtime_quantizers(model, scheme)
            info[name] = {"metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)}}
        elif name in blockwise_methods().names():
            model = copy.deepcopy(self.step(scheme_text, steps[:-1], info))
            entry = blockwise_methods().get(name)
            defaults = ({"epochs": 2, "batch_size": 2} if name == "block-ap" else {}) | {"cache": "gpu"}
            if DEV.type != "cuda":
                defaults["cache"] = "cpu"
            work = self.args.work / re.sub(r"[^A-Za-z0-9]+", "-", "-".join((scheme_text,) + steps))
            ctx = BlockwiseContext(DEV, work, 0, "-".join(steps))
            res = entry.fn(model, self.train, self.val, self._opts(entry, defaults), ctx, bits)
            info[name] = {"block_val_mse_init": [b.get("val_loss_init") for b in res.per_block],
                          "block_val_mse": [b["val_loss_final"] for b in res.per_block],  # the state kept
                          "blocks_kept_init": sum(b["kept"] == "init" for b in res.per_block)}
        else:
            base = self.step(scheme_text, steps[:-1], info)
            model, info[name] = self._e2e(base, scheme, bits, name)
        info.setdefault(name, {})["seconds"] = round(time.time() - t, 1)
        self.models[key] = model
        return model

    def _e2e(self, base, scheme, bits: int, name: str):
        entry = e2e_methods().get(name)
        paper = 2e-5 if bits <= 2 else 1e-5
        lrs = [m * paper for m in (float(x) for x in self.args.e2e_lr_mults.split(","))]
        best, tried = None, {}
        for lr in lrs:
            student = copy.deepcopy(base)
            ctx = E2EContext(scheme, self.acc.device, torch.float32)
            objective = entry.fn(student, self._opts(entry, {"lr": lr}), ctx)
            cfg = TrainConfig(epochs=1, batch_size=self.args.e2e_batch, save_every=0, log_every=20)
            work = self.args.work / f"e2e-{id(base)}-{lr}"
            trainer = Trainer(student, objective, cfg, work, self.acc, 0, f"{name}{lr}")
            out = trainer.fit({"input_ids": self.train}, {"input_ids": self.val})
            student = self.acc.unwrap_model(trainer.model, keep_fp32_wrapper=False).cpu()
            tried[str(lr)] = {"val_loss_before": out.val_loss_before, "val_loss": out.val_loss_after}
            if best is None or out.val_loss_after < best[0]:
                best = (out.val_loss_after, lr, student)
        return best[2], {"lr": best[1], "tried": tried}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="fp32 safetensors model directory")
    ap.add_argument("--data", type=Path, required=True, help="calib.txt + eval/*.txt (tasks.prepare)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipes", required=True, help="comma-separated, e.g. rtn:W4g64,awq+tesseraq:W3g64")
    ap.add_argument("--options", default="", help='JSON: method name -> options, e.g. {"tesseraq": {"iterations": 50}}')
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--train-samples", type=int, default=256)
    ap.add_argument("--val-samples", type=int, default=16)
    ap.add_argument("--e2e-batch", type=int, default=4)
    ap.add_argument("--e2e-lr-mults", default="1,5",
                    help="E2E-QP learning rates as multiples of the paper's (2e-5 at W2, 1e-5 above); "
                         "the best by validation loss is kept")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--deadline-s", type=float, default=0, help="start no recipe after this many seconds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quality-recipes"))
    args = ap.parse_args()
    recipes = [parse_recipe(r.strip()) for r in args.recipes.split(",") if r.strip()]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    evals = {p.stem: tokenize_text(tok, p.read_text()) for p in sorted((args.data / "eval").glob("*.txt"))}
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "device": str(DEV), "recipes": {}}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    results["fp"] = ppl_all(fp, evals, args.seq_len, args.eval_windows)
    say("fp", results["fp"])
    runner = Runner(args, fp, tok)
    for steps, scheme in recipes:
        name = f"{'+'.join(steps)}:{scheme}"
        if args.deadline_s and time.time() - T0 > args.deadline_s:
            results["recipes"][name] = {"skipped": "deadline"}
            continue
        info: dict = {}
        t = time.time()
        try:
            model = runner.step(scheme, steps, info)
            ppl = ppl_all(model, evals, args.seq_len, args.eval_windows)
            ratio = {k: round(v / results["fp"][k], 4) for k, v in ppl.items()}
            results["recipes"][name] = {"ppl": ppl, "ppl_ratio": ratio, "steps": info,
                                        "seconds": round(time.time() - t, 1)}
            say(name, ppl, ratio)
        except Exception as exc:  # a failing recipe is recorded and does not stop the others
            results["recipes"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            say(name, "FAILED", type(exc).__name__, exc)
        args.out.write_text(json.dumps(results, indent=2, default=str))
    print("\n| recipe | " + " | ".join(f"PPL {k} (x fp)" for k in evals) + " |")
    print("|---|" + "---:|" * len(evals))
    print("| fp | " + " | ".join(f"{results['fp'][k]:.2f}" for k in evals) + " |")
    for name, r in results["recipes"].items():
        if "ppl" in r:
            print(f"| {name} | " + " | ".join(f"{r['ppl'][k]:.2f} ({r['ppl_ratio'][k]:.2f}x)" for k in evals) + " |")
        else:
            print(f"| {name} | {r.get('error') or r.get('skipped')} |")


if __name__ == "__main__":
    main()
