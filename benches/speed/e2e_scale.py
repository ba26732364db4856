"""E2E-QP and KD-QAT training speed on 1 vs 2 GPUs, Llama-2-7B-shaped (GPU; `--small`: CPU smoke run).

Model: random-initialised `--shape` (default llama-2-7b: hidden 4096, MLP 11008, 32 heads,
vocab 32000), `--layers` decoder layers (default: the shape's, 32), bf16, every decoder
linear a `QuantLinear` (min-max init, `quant.calibrate.rtn.quantize_linears`); the method's
registered setup (`quant.methods`, kind e2e) prepares the student and its objective:

- E2E-QP (`quant.e2e.e2e_qp`): W2 g64 asymmetric, frozen on the integer grid, only the
  step sizes train (fp32), causal-LM loss. The student fits one GPU, so 2 GPUs run DDP.
- KD-QAT (`quant.e2e.kd`): W4 g64 asymmetric, every weight and step size trains (fp32
  masters + AdamW: 16 bytes per parameter, 108 GB for 7B), the loss is the
  distillation from the bf16 teacher (the model before quantization, replicated on
  every process). 1 GPU: one process (it fits an H200 only barely, if at all: the
  result says `oom`); 2 GPUs: FSDP2 (student sharded, `quant.e2e.distributed`).

Each configuration runs as its own job started through accelerate's launcher
(`accelerate launch --num_processes N ...`, built by tasks/launch.py), exactly the
trainer the `e2e` stage runs (`quant.e2e.trainer.Trainer`: fp32 masters, bf16 autocast,
gradient checkpointing, clipping), per-process batch `--batch` x `--seq` tokens, no
checkpoints written. Steps/s is timed over the steps after `--warmup`, from the host
sync at each step's log point; tokens/s = steps/s x processes x batch x seq; peak memory
is the largest `torch.cuda.max_memory_allocated` over the processes during training.
Everything is measured in one run, and the 2-GPU / 1-GPU ratios are computed from it
(tokens/s ratio: 2.0 would be perfect scaling; steps/s ratio: each 2-GPU step does twice
the work).

With `--layers L` fewer than the shape's N (a model that fits where N layers do not), the
result also states steps/s extrapolated to N layers as `L/N` of the measured rate: every per-step
cost is scaled with the layer count, including the embedding, lm_head and loss that do
not grow with it, so the extrapolation is a lower bound on the N-layer rate.

Usage:
  python -m benches.speed.e2e_scale                           # GPUs (2 for the ratios)
  python -m benches.speed.e2e_scale --layers 16 --methods kd  # fewer layers, extrapolated
  python -m benches.speed.e2e_scale --small                   # CPU smoke run (gloo, tiny shapes)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benches import common

# (method, processes, strategy): DDP where the student fits one GPU, FSDP for KD
PLAN = {"e2e-qp": ((1, "ddp"), (2, "ddp")), "kd": ((1, "ddp"), (2, "fsdp"))}
SCHEMES = {"e2e-qp": "W2A16KV16", "kd": "W4A16KV16"}


# ---------------------------------------------------------------------------
# One configuration (runs inside the processes accelerate's launcher starts)


def build(args: argparse.Namespace, device: torch.device):
    """(student, objective) as the e2e stage would build them, on `device`."""
    from quant import methods
    from quant.calibrate.rtn import quantize_linears
    from quant.config.scheme import QuantScheme
    from quant.e2e.trainer import E2EContext

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = common.build_model(args.shape, layers=args.layers, dtype=dtype, device=device)
    teacher = copy.deepcopy(model).eval() if args.method == "kd" else None  # the model before quantization
    scheme = QuantScheme.from_name(SCHEMES[args.method], preset="efficientqat", group_size=args.group_size)
    quantize_linears(model, scheme)
    ctx = E2EContext(scheme, device, dtype, seed=0, teacher=teacher)
    m = methods.method(args.method, "e2e")
    return model, m.fn(model, m.options(), ctx)


def peak_gib(acc, device: torch.device) -> float:
    """The largest peak over the processes: GPU memory allocated, or host RSS on the CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return float(acc.gather(torch.tensor([float(peak)], device=device)).max()) / 2**30


def worker(args: argparse.Namespace) -> None:
    from quant.e2e.distributed import make_accelerator
    from quant.e2e.trainer import TrainConfig, Trainer

    acc = make_accelerator("cpu" if args.small else "cuda", args.strategy)
    device = acc.device
    result = {"method": args.method, "processes": acc.num_processes, "strategy": args.strategy,
              "distributed_type": str(acc.distributed_type.value), "layers": args.layers}
    try:
        model, objective = build(args, device)
        steps = args.warmup + args.steps
        cfg = TrainConfig(epochs=1, max_steps=steps, batch_size=args.batch, grad_accum=1, warmup_ratio=0.0,
                          max_grad_norm=1.0, grad_checkpointing=True, save_every=0, log_every=1)
        times: dict[int, float] = {}

        def log_fn(step: int, _entry: dict[str, float]) -> None:  # at the host sync of every step
            times[step] = time.perf_counter()

        trainer = Trainer(model, objective, cfg, Path(args.work), accelerator=acc, seed=0, log_fn=log_fn)
        trainer.save = lambda: None  # speed only: no checkpoints
        ids = torch.randint(3, model.config.vocab_size, (acc.num_processes * args.batch * steps, args.seq),
                            generator=torch.Generator().manual_seed(0))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.fit({"input_ids": ids})
    except torch.cuda.OutOfMemoryError as exc:  # no collective after this: the launcher stops the others
        result.update(oom=True, error=str(exc).splitlines()[0],
                      peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)
        Path(f"{args.out}.oom-{acc.process_index}").write_text(json.dumps(result))
        sys.exit(3)
    peak = peak_gib(acc, device)  # every process takes part
    if acc.is_main_process:  # log_fn ran here only
        steps_per_s = args.steps / (times[steps] - times[args.warmup])
        result.update(steps_per_s=steps_per_s,
                      tokens_per_s=steps_per_s * acc.num_processes * args.batch * args.seq, peak_gib=peak, oom=False)
        Path(args.out).write_text(json.dumps(result))
    acc.wait_for_everyone()


# ---------------------------------------------------------------------------
# The run: every configuration through accelerate's launcher, then the ratios


def launch(args: argparse.Namespace, method: str, processes: int, strategy: str, tmp: Path) -> dict:
    from tasks.launch import LAUNCHER, launcher_args

    if args.small and strategy == "fsdp":  # FSDP shards over NCCL only (quant.e2e.distributed)
        strategy = "ddp"
    out = tmp / f"{method}-{processes}-{strategy}.json"
    target = ["-m", "benches.speed.e2e_scale", "--worker", "--method", method, "--strategy", strategy, "--shape", args.shape,
              "--layers", str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--group-size", str(args.group_size),
              "--work", str(tmp / f"work-{method}-{processes}"), "--out", str(out)]
    if args.small:
        target.append("--small")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))}
    if args.small:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([*LAUNCHER, *launcher_args(processes, target)], cwd=common.ROOT, env=env, capture_output=True,
                          text=True)
    ooms = sorted(tmp.glob(f"{out.name}.oom-*"))
    if ooms:
        return {**json.loads(ooms[0].read_text()), "processes": processes}
    if proc.returncode != 0 or not out.exists():
        return {"method": method, "processes": processes, "strategy": strategy, "failed": True,
                "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(out.read_text())
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    full = common.model_config(args.shape).num_hidden_layers
    if args.layers < full and "steps_per_s" in result:
        result[f"steps_per_s_{full}_layers_lower_bound"] = result["steps_per_s"] * args.layers / full
    return result


def ratios(results: list[dict]) -> dict[str, dict[str, float | None]]:
    out = {}
    for method in dict.fromkeys(r["method"] for r in results):
        by_n = {r["processes"]: r for r in results if r["method"] == method}
        one, two = by_n.get(1, {}), by_n.get(2, {})
        ok = "steps_per_s" in one and "steps_per_s" in two
        out[method] = {
            "strategy_2gpu": two.get("strategy"),
            "steps_per_s_ratio": two["steps_per_s"] / one["steps_per_s"] if ok else None,
            "tokens_per_s_ratio": two["tokens_per_s"] / one["tokens_per_s"] if ok else None,
            "peak_gib_ratio": two["peak_gib"] / one["peak_gib"] if ok else None,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="CPU smoke run: small shape on the CPU (gloo)")
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(common.SHAPES))
    ap.add_argument("--methods", nargs="+", choices=sorted(PLAN), default=sorted(PLAN))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's; 2 with --small)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; 32 with --small)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per process and step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 with --small)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--group-size", type=int, default=None, help="weight group size (default 64; 32 with --small)")
    common.add_out_arg(ap, "speed-e2e_scale")
    # inside a launched process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.small:
        args.shape = "small"
    args.layers = args.layers or (2 if args.small else common.model_config(args.shape).num_hidden_layers)
    args.seq = args.seq or (32 if args.small else 2048)
    args.steps = args.steps or (3 if args.small else 10)
    args.group_size = args.group_size or (32 if args.small else 64)
    if args.warmup < 1 or args.steps < 1 or args.batch < 1 or args.layers < 1:
        ap.error("--warmup, --steps, --batch and --layers must be >= 1 (the timing starts at a warmup step's sync)")
    if args.worker:
        worker(args)
        return
    common.require_cuda("speed.e2e_scale", args.small)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    results, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-scale-") as tmp:
        for method in args.methods:
            for processes, strategy in PLAN[method]:
                if not args.small and processes > gpus:
                    skipped.append(f"{method} on {processes} GPUs: {gpus} visible")
                    continue
                results.append(launch(args, method, processes, strategy, Path(tmp)))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = {
        "gpus_visible": gpus, "small_runs_on": "cpu (gloo)" if args.small else None,
        "model": {"shape": args.shape, "layers": args.layers, "seq": args.seq, "batch_per_process": args.batch,
                  "group_size": args.group_size, "schemes": {m: SCHEMES[m] for m in args.methods}},
        "timed_steps": args.steps, "warmup_steps": args.warmup,
        "results": results, "ratios_2_over_1": ratios(results), "skipped": skipped,
    }
    print(json.dumps(report, indent=2))
    common.say("wrote", common.write_result(args, report))


if __name__ == "__main__":
    main()
