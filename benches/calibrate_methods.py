"""PPL and wall time of calibrate methods (by name from CALIBRATE) on one model, no training.

For each bit width (asymmetric, --group) and each method: a fresh copy of the
full-precision model, the method with its default options (calibration: --samples
random windows of --seq-len tokens from calib.txt, the GPTQ/AWQ protocol, seed 0),
then PPL (quant.eval.ppl, --eval-seq-len windows, at most --eval-windows per text)
on every text of DATA/eval. Writes raw JSON to --out after every step.

CPU (embedded model, small):  python benches/calibrate_methods.py --model DIR --data DIR
    --out docs/results/calibrate_methods_cpu.json --samples 32 --seq-len 512
GPU: the same with --device cuda and the full settings of docs/issues/issue-11-awq.md.
A method may be listed twice with other options as NAME@TAG, e.g.
    --methods rtn,gptq,gptq@act,quarot,quarot@gptq
    --options '{"gptq@act": {"act_order": true}, "quarot@gptq": {"weights": "gptq"}}'
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.calibrate import CALIBRATE  # noqa: E402
from quant.config.scheme import QuantScheme  # noqa: E402
from quant.data import sample_windows, tokenize_text  # noqa: E402
from quant.eval import lm_tasks  # noqa: E402
from quant.eval.ppl import perplexity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="fp32 safetensors model directory")
    ap.add_argument("--data", type=Path, required=True, help="calib.txt + eval/*.txt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", default="rtn,awq")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None, help="per text (default: all)")
    ap.add_argument("--options", default="{}", help='JSON {method or method@tag: {option: value}}')
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--tasks", default="", help="zero-shot tasks (quant.eval.lm_tasks), e.g. all")
    ap.add_argument("--task-limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--task-batch-size", default="16")
    ap.add_argument("--work", type=Path, default=Path("/tmp/calibrate-methods"))
    args = ap.parse_args()
    if args.threads:  # on a shared, oversubscribed CPU one thread is several times faster
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model)
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    calib = sample_windows(tokenize_text(tok, (args.data / "calib.txt").read_text()),
                           args.samples, args.seq_len, seed=0)
    evals = {p.stem: tokenize_text(tok, p.read_text()) for p in sorted((args.data / "eval").glob("*.txt"))}
    method_options = json.loads(args.options)
    results: dict[str, object] = {
        "command": " ".join(sys.argv),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }

    names = tuple(lm_tasks.TASK_NAMES if args.tasks == "all" else filter(None, args.tasks.split(",")))
    batch = args.task_batch_size if args.task_batch_size == "auto" else int(args.task_batch_size)

    def ppl(model) -> dict[str, float]:
        model.to(args.device)
        out = {k: round(perplexity(model, ids, args.eval_seq_len, 1, args.eval_windows).ppl, 3)
               for k, ids in evals.items()}
        if names:  # zero-shot accuracy, as the evaluate stage runs it
            run = lm_tasks.TaskRun(names=names, limit=args.task_limit, batch_size=batch)
            acc = lm_tasks.extract_metrics(lm_tasks.run_tasks(model, tok, run, args.work), names)
            out |= {f"{n}/acc": round(m["acc"], 4) for n, m in acc.items()}
            out["avg_acc"] = round(lm_tasks.average(acc), 4)
        model.cpu()
        return out

    def dump() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    results["fp"] = ppl(fp)
    print("fp", results["fp"], flush=True)
    dump()
    for bits in (int(b) for b in args.bits.split(",")):
        scheme = QuantScheme.from_name(f"W{bits}A16KV16", preset="efficientqat", group_size=args.group)
        for label in args.methods.split(","):  # NAME or NAME@TAG (one method, other options)
            name = label.partition("@")[0]
            entry = CALIBRATE.get(name, "--methods")
            opts = entry.options.from_dict(method_options.get(label, {}), f"--options.{label}")
            model = copy.deepcopy(fp).to(args.device)
            t = time.time()
            metrics = entry.fn(model, scheme, calib, opts) or {}
            seconds = time.time() - t
            metrics.pop("files", None)
            r = {"seconds": round(seconds, 1), "metrics": metrics, "ppl": ppl(model)}
            r["ppl_ratio"] = {k: round(r["ppl"][k] / results["fp"][k], 4) for k in evals}
            results[f"{scheme.name}/{label}"] = r
            print(scheme.name, label, r, flush=True)
            dump()
    results["wall_seconds"] = round(time.time() - t0, 1)
    dump()


if __name__ == "__main__":
    main()
