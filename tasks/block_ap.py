"""block_ap: block-wise reconstruction of the calibrated model (the recipe's block-wise step:
`block-ap` or `tesseraq`; with `steps: []` the calibrated model passes through unchanged).

Reads artifacts/calibrate/model (QuantLinears with float weights and initial
qparams; after GPTQ, whose float weights lie on the grid, also the reference
weights the full-precision targets come from) and the training data
(tasks.training_data: merged synthetic sequences when present, else windows of
the calibration text). Writes
artifacts/block_ap/model (frozen on the integer grid),
artifacts/block_ap/block_loss.png and metrics/block_ap.json; per-block
validation MSE goes to MLflow as step metrics. A killed run resumes at the next
unfinished block (and, for methods with sub-steps, the next step) from
.state/block_ap.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quant.blockwise.engine import BlockwiseContext, reconstruct
from quant.checkpoint import (
    FLOAT_WEIGHTS_FILE,
    load_quantized,
    read_scheme,
    read_steps,
    save_quantized,
    steps_record,
)
from quant.config import Config, ConfigError
from quant.data import split_samples
from quant.io import fingerprint
from quant.recipe import Step, check_steps
from tasks.common import (
    Params,
    log_artifact,
    main,
    pass_through,
    setup_torch,
    stage_dir,
    write_json,
)
from tasks.reporting import plot_block_losses
from tasks.tracking import log_step
from tasks.training_data import DataConfig, training_sequences

STATE_DIR = Path(".state") / "block_ap"


@dataclass(frozen=True)
class BlockAPStageConfig(Config):
    steps: tuple[Step, ...] = field(default_factory=lambda: (Step("block-ap"),))  # none or one
    data: DataConfig = field(default_factory=DataConfig)
    # a block whose trained validation MSE exceeds this many times its incoming one fails the
    # run (exit 2, nothing written); below it the better state is kept. null = off
    max_val_mse_ratio: float | None = 2.0

    def __post_init__(self) -> None:
        check_steps("blockwise", self.steps, "steps")
        if self.max_val_mse_ratio is not None and not self.max_val_mse_ratio > 1.0:
            raise ConfigError(f"max_val_mse_ratio={self.max_val_mse_ratio} must be > 1 (2.0: a block's "
                              "validation MSE may at most double) or null (off)")


def _metrics(result, method: str, scheme: str, source: str, train_ids, val_ids) -> dict[str, Any]:
    per = result.per_block
    init = [b["val_loss_init"] for b in per]
    final = [b["val_loss_final"] for b in per]
    return {
        "method": method, "scheme": scheme, "data": source,
        "train_samples": len(train_ids), "val_samples": len(val_ids), "seq_len": int(train_ids.shape[1]),
        "blocks": result.blocks, "resumed_at_block": result.resumed_at,
        "val_mse_init_mean": sum(init) / len(init), "val_mse_mean": sum(final) / len(final),
        "val_mse_last_block": final[-1], "blocks_improved": sum(f < i for f, i in zip(final, init, strict=True)),
        "blocks_kept_init": sum(b["kept"] == "init" for b in per),
        "block_seconds_total": round(sum(b["seconds"] for b in per), 2),
        "caches": result.caches,  # where each activation cache went and why (the cache planner)
    }


def run(params: Params) -> dict[str, Any]:
    cfg = params.section("block_ap", BlockAPStageConfig)
    src = stage_dir("calibrate") / "model"
    out = stage_dir("block_ap")
    scheme = read_scheme(src)
    if scheme is None:
        raise ConfigError(f"block_ap needs a quantized model in {src}; run calibrate first")
    check_steps("blockwise", cfg.steps, "block_ap.steps", scheme)
    if not cfg.steps:  # the recipe has no block-wise step
        pass_through(src, out / "model")
        plot_block_losses([], out / "block_loss.png", "no block-wise step: the calibrated model passed through")
        metrics = {"method": "none", "scheme": scheme.name, "passed_through": "calibrate"}
        write_json("metrics/block_ap.json", metrics)
        return metrics
    method = cfg.steps[0].method
    if not (src / FLOAT_WEIGHTS_FILE).exists():
        raise ConfigError(f"{src} holds no {FLOAT_WEIGHTS_FILE} (the float weights block-wise training "
                          "reconstructs); re-run calibrate with this version")
    device, _ = setup_torch(params.base)
    seqs, source = training_sequences(src, cfg.data, "block_ap")
    train_ids, val_ids = split_samples(seqs, cfg.data.train_samples, cfg.data.val_samples,
                                       params.base.seed, "block_ap.data")
    # fp32 master weights on the host, with the reference weights the targets come from
    model, tokenizer = load_quantized(src, torch.float32, "cpu", reference_weights=True)
    fp = fingerprint(cfg.to_dict(), scheme.to_dict(), params.base.seed,
                     files=(src / "quantization.json", src / "qparams.safetensors"),
                     tensors=(train_ids, val_ids))

    def on_block(i: int, info: dict[str, Any]) -> None:
        m = {"block_val_mse": info["val_loss_final"], "block_val_mse_init": info["val_loss_init"],
             "block_val_mse_trained": info["val_loss_trained"], "block_seconds": info["seconds"],
             "block_kept_init": float(info["kept"] == "init")}
        if info.get("train_loss"):
            m["block_train_mse"] = info["train_loss"][-1]
        log_step(m, i)

    ctx = BlockwiseContext(torch.device(device), STATE_DIR, params.base.seed, fp, on_block,
                           train_ids=train_ids, val_ids=val_ids, scheme=scheme,
                           max_val_mse_ratio=cfg.max_val_mse_ratio)
    result = reconstruct(model, cfg.steps, ctx)
    save_quantized(model, tokenizer, scheme, out / "model", extra=steps_record(read_steps(src), cfg.steps))
    png = plot_block_losses(result.per_block, out / "block_loss.png", f"{method} {scheme.name}")
    metrics = _metrics(result, method, scheme.name, source, train_ids, val_ids)
    write_json("metrics/block_ap.json", metrics)
    log_artifact(png)
    log_artifact("metrics/block_ap.json")
    shutil.rmtree(STATE_DIR, ignore_errors=True)  # the output exists: nothing left to resume
    return metrics


if __name__ == "__main__":
    main("block_ap", run)
