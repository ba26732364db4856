"""Wall time of the zero-shot commonsense tasks (quant.eval.lm_tasks) on one model.

    python -m benches.speed.lm_tasks --model artifacts/prepare/model --limit 10
    python -m benches.speed.lm_tasks --model embedded:smollm2-135m --device cuda \
        --dtype bfloat16 --batch-size auto            # full validation sets on a GPU
    python -m benches.speed.lm_tasks --small          # CPU smoke run: one task, 2 documents

Each task runs as its own `simple_evaluate` call so the time of each is printed, then the
total and the average accuracy. Times include lm-eval's request building and, with
`--batch-size auto`, its batch-size search, as in the evaluate stage.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from benches import common
from quant.eval import lm_tasks
from quant.load import load_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:smollm2-135m", help="model directory, embedded:<key> or HF id")
    ap.add_argument("--tasks", default=",".join(lm_tasks.TASK_NAMES))
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task (default: all)")
    ap.add_argument("--batch-size", default="8", help="an integer or 'auto'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny random model, boolq, 2 documents")
    common.add_out_arg(ap, "speed-lm_tasks")
    args = ap.parse_args(argv)
    if args.small:
        args.tasks, args.limit, args.batch_size, args.device = "boolq", 2, "2", "cpu"
        model, tokenizer = common.load_fp_model(args.model, small=True)
    else:
        model, tokenizer = load_model(args.model, getattr(torch, args.dtype), args.device)
    batch = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
    seconds: dict[str, float] = {}
    metrics: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lm-tasks-") as work:
        for name in args.tasks.split(","):
            run = lm_tasks.TaskRun(names=(name,), limit=args.limit, batch_size=batch)
            seconds[name], results = common.timed(lambda run=run: lm_tasks.run_tasks(model, tokenizer, run, work))
            metrics.update(lm_tasks.extract_metrics(results, (name,)))
            print(f"{name:>14}: {seconds[name]:7.1f} s  n={metrics[name].get('n')}  "
                  f"acc={metrics[name]['acc']:.4f}", flush=True)
    total, avg = sum(seconds.values()), lm_tasks.average(metrics)
    print(f"{'total':>14}: {total:7.1f} s on {common.device_name(args.device)}, {args.dtype}, batch "
          f"{args.batch_size}, limit {args.limit}; average acc {avg:.4f}")
    path = common.write_result(args, {"seconds": seconds, "total_seconds": total, "metrics": metrics,
                                      "avg_acc": avg})
    common.say("wrote", path)


if __name__ == "__main__":
    main()
