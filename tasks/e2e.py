"""e2e: end-to-end training of the quantized model (method `e2e-qp`; `kd` from quant/kd.py).

Reads artifacts/<e2e.model>/model (default: block_ap, frozen on the integer
grid) and the training data (see tasks.training_data.training_sequences); writes
artifacts/e2e/model and metrics/e2e.json; the training loss, learning rate and
gradient norm go to MLflow as step metrics. Saved steps live in .state/e2e; a
killed run continues from the last one.

Several GPUs: `accelerate launch -m tasks.e2e` (DDP). Every process trains;
only the main process opens the MLflow run and writes outputs.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quant.config import Config, ConfigError
from quant.e2e.trainer import (
    E2EContext,
    TrainConfig,
    Trainer,
    e2e_methods,
    make_accelerator,
    split_samples,
)
from quant.models.checkpoint import load_model, read_scheme, save_quantized
from tasks.common import (
    Params,
    load_params,
    log_artifact,
    main,
    setup_torch,
    stage_dir,
    write_json,
)
from tasks.tracking import log_step
from tasks.training_data import DataConfig, fingerprint, training_sequences

STATE_DIR = Path(".state") / "e2e"


@dataclass(frozen=True)
class E2EStageConfig(Config):
    method: str = "e2e-qp"
    model: str = "block_ap"  # the stage whose quantized model is trained
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: dict[str, Any] = field(default_factory=dict)  # validated by the method

    def __post_init__(self) -> None:
        e2e_methods().get(self.method, "method")


def run(params: Params) -> dict[str, Any]:
    t0 = time.time()
    cfg = params.section("e2e", E2EStageConfig)
    entry = e2e_methods().get(cfg.method, "e2e.method")
    options = entry.options.from_dict(cfg.options, "e2e.options")
    src = stage_dir(cfg.model) / "model"
    if not src.exists():
        raise ConfigError(f"e2e.model={cfg.model!r}: {src} does not exist; run that stage first")
    scheme = read_scheme(src)
    if scheme is None:
        raise ConfigError(f"e2e.model={cfg.model!r}: {src} is not a quantized model")
    scheme.require_integer_weights("e2e")
    device, dtype = setup_torch(params.base)
    acc = make_accelerator(device)
    from transformers import AutoTokenizer

    seqs, source = training_sequences(AutoTokenizer.from_pretrained(src), cfg.data, "e2e")
    train_ids, val_ids = split_samples(seqs, cfg.data.train_samples, cfg.data.val_samples,
                                       params.base.seed, "e2e.data")
    model, tokenizer = load_model(src, dtype, "cpu")
    ctx = E2EContext(scheme, acc.device, dtype, stage_dir("prepare") / "model", params.base.seed)
    objective = entry.fn(model, options, ctx)
    fp = fingerprint(cfg.to_dict(), scheme.to_dict(), params.base.seed, acc.num_processes,
                     files=(src / "quantization.json", src / "qparams.safetensors"),
                     tensors=(train_ids, val_ids))

    def log_fn(step: int, entry: dict[str, float]) -> None:
        log_step({f"train_{k}": v for k, v in entry.items() if k != "step"}, step)

    trainer = Trainer(model, objective, cfg.train, STATE_DIR, acc, params.base.seed, fp, log_fn)
    val = {"input_ids": val_ids} if len(val_ids) else None
    result = trainer.fit({"input_ids": train_ids}, val)
    metrics = {
        "method": cfg.method, "scheme": scheme.name, "input_model": cfg.model, "data": source,
        "train_samples": len(train_ids), "val_samples": len(val_ids), "seq_len": int(train_ids.shape[1]),
        "processes": acc.num_processes, "steps": result.steps, "resumed_from_step": result.resumed_from,
        "train_loss": result.train_loss, "seconds": round(time.time() - t0, 2),
    }
    if result.val_loss_before is not None:
        metrics.update(val_loss_before=result.val_loss_before, val_loss=result.val_loss_after,
                       val_ppl_before=math.exp(result.val_loss_before), val_ppl=math.exp(result.val_loss_after))
    if acc.is_main_process:
        out = stage_dir("e2e")
        student = acc.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        save_quantized(student, tokenizer, scheme, out / "model", extra={"method": cfg.method})
        write_json("metrics/e2e.json", metrics)
        log_artifact("metrics/e2e.json")
        shutil.rmtree(STATE_DIR, ignore_errors=True)
    acc.wait_for_everyone()
    return metrics


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    if _is_main_process():
        main("e2e", run)
    else:  # other `accelerate launch` processes train without an MLflow run of their own
        run(load_params())
