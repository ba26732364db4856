"""e2e: end-to-end training of the quantized model (the recipe's e2e step: `e2e-qp` or `kd`;
with `steps: []` the input model passes through unchanged).

Reads artifacts/<e2e.model>/model (default: block_ap, frozen on the integer
grid; never the reference weights GPTQ keeps for block-wise training: e2e losses take
their targets from labels or the teacher, so the output carries none) and the
training data (see tasks.training_data.training_sequences); writes
artifacts/e2e/model and metrics/e2e.json; the training loss, learning rate and
gradient norm go to MLflow as step metrics. Saved steps live in .state/e2e; a
killed run continues from the last one (with the same processes and strategy).

Several processes: `e2e.distributed` (quant.e2e.distributed.DistributedConfig).
`python -m tasks.e2e` (what dvc.yaml and the Prefect flow run) stays the command:
with `processes: 1` it trains in this process as always; with N > 1 (or `auto`, one
per visible GPU) it checks the params here, then starts N copies of itself through
accelerate's launcher (tasks/launch.py). `strategy: ddp` replicates the student on
every process; `strategy: fsdp` (GPUs only) shards the student's parameters,
gradients and AdamW state with FSDP2, for students whose training state does not fit
one GPU (KD of a 7B model); the teacher is replicated. Every process trains; only
rank 0 opens the MLflow run and writes the outputs (under FSDP the model is
gathered whole to rank 0 first). `train.batch_size` is per process.

Bad values fail before any process starts or any model is loaded (`plan`): processes
< 1, more processes than visible GPUs, FSDP on a CPU run or on one process, an
unknown strategy, a sample count that makes no full step over the processes.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quant.checkpoint import load_quantized, read_scheme, read_steps, save_quantized, steps_record
from quant.config import Config, ConfigError
from quant.config.scheme import QuantScheme
from quant.data import split_samples
from quant.e2e.distributed import DistributedConfig, make_accelerator, resolve_processes
from quant.e2e.trainer import E2EContext, TrainConfig, no_full_step, train
from quant.io import fingerprint
from quant.models.hub import resolve_device
from quant.recipe import Step, check_steps
from tasks.common import Params, log_artifact, pass_through, setup_torch, stage_dir, write_json
from tasks.launch import stage_entry
from tasks.tracking import log_step
from tasks.training_data import DataConfig, training_sequences

STATE_DIR = Path(".state") / "e2e"


@dataclass(frozen=True)
class E2EStageConfig(Config):
    steps: tuple[Step, ...] = field(default_factory=lambda: (Step("e2e-qp"),))  # none or one
    model: str = "block_ap"  # the stage whose quantized model is trained
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        check_steps("e2e", self.steps, "steps")


@dataclass(frozen=True)
class Plan:
    """What `plan` checked: everything the run needs that costs no model or data."""

    cfg: E2EStageConfig
    src: Path
    scheme: QuantScheme
    processes: int


def plan(params: Params) -> Plan:
    """Check the params and the inputs' presence (no model, no data, no process group).
    Runs in the launching process too, so bad values fail before any process starts."""
    cfg = params.section("e2e", E2EStageConfig)
    if not cfg.steps:  # passes its input through: one process
        return Plan(cfg, _source(cfg), _scheme(cfg), 1)
    processes = resolve_processes(cfg.distributed, resolve_device(params.base.device), params.base.device)
    msg = no_full_step(cfg.data.train_samples, processes, cfg.train)
    if msg is not None:
        raise ConfigError(msg)
    scheme = _scheme(cfg)
    check_steps("e2e", cfg.steps, "e2e.steps", scheme)
    return Plan(cfg, _source(cfg), scheme, processes)


def _source(cfg: E2EStageConfig) -> Path:
    src = stage_dir(cfg.model) / "model"
    if not src.exists():
        raise ConfigError(f"e2e.model={cfg.model!r}: {src} does not exist; run that stage first")
    return src


def _scheme(cfg: E2EStageConfig) -> QuantScheme:
    scheme = read_scheme(_source(cfg))
    if scheme is None:
        raise ConfigError(f"e2e.model={cfg.model!r}: {_source(cfg)} is not a quantized model")
    return scheme


def run(params: Params) -> dict[str, Any]:
    t0 = time.time()
    p = plan(params)
    cfg, src, scheme = p.cfg, p.src, p.scheme
    if not cfg.steps:  # the recipe has no e2e step
        pass_through(src, stage_dir("e2e") / "model")
        metrics = {"method": "none", "scheme": scheme.name, "input_model": cfg.model,
                   "passed_through": cfg.model}
        write_json("metrics/e2e.json", metrics)
        return metrics
    device, dtype = setup_torch(params.base)
    acc = make_accelerator(device, cfg.distributed.strategy)
    if acc.num_processes != p.processes:
        raise ConfigError(
            f"e2e.distributed.processes={cfg.distributed.processes!r} gives {p.processes} process(es) but this "
            f"run has {acc.num_processes}; start the stage with `python -m tasks.e2e`, which launches them")
    seqs, source = training_sequences(src, cfg.data, "e2e")
    train_ids, val_ids = split_samples(seqs, cfg.data.train_samples, cfg.data.val_samples,
                                       params.base.seed, "e2e.data")
    model, tokenizer = load_quantized(src, dtype, "cpu")
    ctx = E2EContext(scheme, acc.device, dtype, stage_dir("prepare") / "model", params.base.seed)
    fp = fingerprint(cfg.to_dict(), scheme.to_dict(), params.base.seed, acc.num_processes,
                     files=(src / "quantization.json", src / "qparams.safetensors"),
                     tensors=(train_ids, val_ids))

    def log_fn(step: int, entry: dict[str, float]) -> None:
        log_step({f"train_{k}": v for k, v in entry.items() if k != "step"}, step)

    result, student = train(model, cfg.steps, train_ids, val_ids, cfg.train, ctx, STATE_DIR, acc, fp, log_fn)
    method = cfg.steps[0].method
    metrics = {
        "method": method, "scheme": scheme.name, "input_model": cfg.model, "data": source,
        "train_samples": len(train_ids), "val_samples": len(val_ids), "seq_len": int(train_ids.shape[1]),
        "processes": acc.num_processes, "strategy": cfg.distributed.strategy,
        "global_batch": cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes,
        "steps": result.steps, "resumed_from_step": result.resumed_from,
        "train_loss": result.train_loss, "seconds": round(time.time() - t0, 2),
    }
    if result.val_loss_before is not None:
        metrics.update(val_loss_before=result.val_loss_before, val_loss=result.val_loss_after,
                       val_ppl_before=math.exp(result.val_loss_before), val_ppl=math.exp(result.val_loss_after))
    if acc.is_main_process:
        out = stage_dir("e2e")
        save_quantized(student, tokenizer, scheme, out / "model", extra=steps_record(read_steps(src), cfg.steps))
        write_json("metrics/e2e.json", metrics)
        log_artifact("metrics/e2e.json")
        shutil.rmtree(STATE_DIR, ignore_errors=True)
    acc.wait_for_everyone()
    return metrics


def launch_processes(params: Params) -> int:
    """How many processes `python -m tasks.e2e` starts (raises on bad params)."""
    return plan(params).processes


if __name__ == "__main__":
    stage_entry("e2e", "tasks.e2e", run, launch_processes)
