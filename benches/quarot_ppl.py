"""PPL of RTN vs QuaRot + RTN at weight-activation-KV schemes (embedded SmolLM2-135M).

For each scheme (default W4A8KV4, W4A4KV16, W4A4KV4; weights g64 asymmetric,
activations and KV per-token asymmetric, min-max, dynamic): the `rtn` and the
`quarot` calibrate methods exactly as the calibrate stage runs them (method,
then `apply_runtime_quantizers`), then quant.eval.ppl.perplexity on every text
of --data/eval. The QuantLinears are materialized as plain linears holding their
dequantized weights (what `save_quantized` writes, the same function), so the weights
are not fake-quantized again at every forward. Wall time of each calibration is recorded.

Usage: python benches/quarot_ppl.py --model DIR --data DIR --out results.json
       [--windows 4 --seq-len 512]   (CPU: few short windows; GPU: --windows 0 = whole texts)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.calibrate import CALIBRATE  # noqa: E402
from quant.config.scheme import QuantScheme  # noqa: E402
from quant.data import tokenize_text  # noqa: E402
from quant.eval.ppl import perplexity  # noqa: E402
from quant.models.arch import set_module  # noqa: E402
from quant.modules.linear import quant_linears  # noqa: E402
from quant.modules.rotation import move_input_rotation  # noqa: E402
from quant.modules.runtime import apply_runtime_quantizers  # noqa: E402

T0 = time.time()


def say(*a) -> None:
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def materialize(model) -> None:
    """QuantLinear -> plain linear holding its dequantized weight (what save_quantized writes):
    the same function without re-quantizing the weights at every forward (CPU speed)."""
    for name, ql in list(quant_linears(model)):
        lin = ql.to_linear()
        move_input_rotation(ql, lin)
        set_module(model, name, lin)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="directory with eval/*.txt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--schemes", default="W4A8KV4,W4A4KV16,W4A4KV4")
    ap.add_argument("--preset", default="efficientqat", help="scheme preset: efficientqat | llm-qat")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--methods", default="rtn,quarot")
    ap.add_argument("--windows", type=int, default=4, help="windows per text; 0 = all")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-chars", type=int, default=0, help="truncate texts (CPU speed); 0 = all")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    evals = {}
    for p in sorted((args.data / "eval").glob("*.txt")):
        text = p.read_text()
        evals[p.stem] = tokenize_text(tok, text[: args.max_chars] if args.max_chars else text)
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    windows = args.windows or None
    res: dict = {"settings": {k: str(v) for k, v in vars(args).items()} | {
        "device": dev, "torch": torch.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads()}}

    def ppl(model) -> dict[str, float]:
        model.to(dev)
        out = {k: round(perplexity(model, ids, args.seq_len, args.batch, windows).ppl, 3)
               for k, ids in evals.items()}
        model.cpu()
        return out

    def dump() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))

    t = time.time()
    res["fp"] = {"ppl": ppl(fp), "eval_seconds": round(time.time() - t, 1)}
    say("fp", res["fp"])
    dump()
    for name in args.schemes.split(","):
        scheme = QuantScheme.from_name(name, preset=args.preset, group_size=args.group)
        for method in args.methods.split(","):
            entry = CALIBRATE.get(method, "--methods")
            model = copy.deepcopy(fp).to(dev)
            t = time.time()
            metrics = entry.fn(model, scheme, None, entry.options())
            materialize(model)
            apply_runtime_quantizers(model, scheme)
            seconds = round(time.time() - t, 1)
            t = time.time()
            r = {"ppl": ppl(model), "calibrate_seconds": seconds,
                 "eval_seconds": round(time.time() - t, 1), "metrics": metrics}
            r["ppl_ratio"] = {k: round(v / res["fp"]["ppl"][k], 3) for k, v in r["ppl"].items()}
            res[f"{scheme.name}/{method}"] = r
            say(scheme.name, method, r["ppl"], f"calibrate {seconds}s")
            dump()
            del model
    res["total_seconds"] = round(time.time() - T0, 1)
    dump()
    print("\n| scheme | method | " + " | ".join(f"PPL {k}" for k in evals) + " | calibrate s |")
    print("|---|---|" + "---:|" * (len(evals) + 1))
    print("| fp32 | - | " + " | ".join(f"{res['fp']['ppl'][k]:.2f}" for k in evals) + " | - |")
    for key, r in res.items():
        if "/" in key:
            s, m = key.split("/")
            cells = " | ".join(f"{r['ppl'][k]:.2f}" for k in evals)
            print(f"| {s} | {m} | {cells} | {r['calibrate_seconds']} |")


if __name__ == "__main__":
    main()
