"""Wall time of the zero-shot commonsense tasks (quant.eval.lm_tasks) on one model.

    python benches/bench_lm_tasks.py --model artifacts/prepare/model --limit 10
    python benches/bench_lm_tasks.py --model embedded:smollm2-135m --device cuda \
        --dtype bfloat16 --batch-size auto            # full validation sets on a GPU

Each task runs as its own `simple_evaluate` call so the time of each is printed,
then the total and the average accuracy. Times include lm-eval's request building
and, with `--batch-size auto`, its batch-size search, as in the evaluate stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from quant.eval import lm_tasks  # noqa: E402
from quant.load import load_model  # noqa: E402
from quant.models.hub import EMBEDDED_PREFIX, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="artifacts/prepare/model", help="local model dir or embedded:<key>")
    ap.add_argument("--tasks", default=",".join(lm_tasks.TASK_NAMES))
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task (default: all)")
    ap.add_argument("--batch-size", default="8", help="an integer or 'auto'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", default=None, help="also write the timings and metrics here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-lm-tasks-"))
    model_dir = args.model
    if model_dir.startswith(EMBEDDED_PREFIX):
        model_dir = resolve_model(model_dir, work / "model")
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(model_dir, dtype, args.device)
    batch = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
    names = tuple(args.tasks.split(","))

    seconds: dict[str, float] = {}
    metrics: dict[str, dict[str, float]] = {}
    for name in names:
        run = lm_tasks.TaskRun(names=(name,), limit=args.limit, batch_size=batch)
        t0 = time.perf_counter()
        results = lm_tasks.run_tasks(model, tokenizer, run, work / "tasks")
        seconds[name] = time.perf_counter() - t0
        metrics.update(lm_tasks.extract_metrics(results, (name,)))
        print(f"{name:>14}: {seconds[name]:7.1f} s  n={metrics[name].get('n')}  "
              f"acc={metrics[name]['acc']:.4f}", flush=True)
    total = sum(seconds.values())
    avg = lm_tasks.average(metrics)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"{'total':>14}: {total:7.1f} s on {device}, {args.dtype}, batch {args.batch_size}, "
          f"limit {args.limit}; average acc {avg:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"seconds": seconds, "total_seconds": total, "device": device, "metrics": metrics,
             "avg_acc": avg, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
