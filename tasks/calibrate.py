"""calibrate: initialise the quantized model with a registered method (rtn, ...).

Reads artifacts/prepare/{model,data}; writes artifacts/calibrate/model (a
quantized checkpoint, see quant.checkpoint.save_quantized) and metrics/calibrate.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from quant import methods
from quant.calibrate import calibrate
from quant.checkpoint import (
    check_scheme_fits,
    load_quantized,
    read_config,
    save_quantized,
    source_dtype,
    steps_record,
)
from quant.config import Config, ConfigError
from quant.data import check_windows, model_context, read_text, sample_windows, tokenize_text
from quant.models.arch import quantizable_linears
from quant.recipe import Step, check_steps
from tasks.common import Params, log_artifact, main, setup_torch, stage_dir, write_json


@dataclass(frozen=True)
class CalibrateConfig(Config):
    # transforms, then one weight quantizer (quant.recipe); options checked by each method
    steps: tuple[Step, ...] = field(default_factory=lambda: (Step("rtn"),))
    samples: int = 128  # calibration windows (methods that need data)
    seq_len: int = 512

    def __post_init__(self) -> None:
        check_steps("calibrate", self.steps, "steps")
        if self.samples < 1:
            raise ConfigError(f"samples={self.samples} must be >= 1")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} must be >= 2 (one input and one target token)")


def calibration_ids(tokenizer, params: Params, samples: int, seq_len: int) -> torch.Tensor:
    text = read_text(stage_dir("prepare") / "data" / "calib.txt")
    return sample_windows(tokenize_text(tokenizer, text), samples, seq_len, params.base.seed)


def uses_data(steps) -> bool:
    """Whether a calibrate step searches on calibration windows (RTN and QuaRot do not)."""
    return any(methods.method(s.method, "calibrate").data for s in steps)


def run(params: Params) -> dict[str, Any]:
    cfg = params.section("calibrate", CalibrateConfig)
    check_steps("calibrate", cfg.steps, "calibrate.steps", params.scheme)  # the scheme fits the steps
    device, _ = setup_torch(params.base)
    # the float weights keep the source precision (not base.dtype): Block-AP trains them and
    # takes its full-precision targets from them
    src = stage_dir("prepare") / "model"
    check_scheme_fits(src, params.scheme)  # config.json only: before the weights
    data = uses_data(cfg.steps)
    if data:  # the windows fit the model's context and the host's memory, before anything loads
        check_windows(cfg.samples, cfg.seq_len, model_context(read_config(src)), "calibrate.samples",
                      "calibrate.seq_len")
    model, tokenizer = load_quantized(src, source_dtype(src), device)
    quantizable_linears(model, params.scheme)  # validate group sizes before any work
    calib = calibration_ids(tokenizer, params, cfg.samples, cfg.seq_len) if data else None
    result = calibrate(model, params.scheme, cfg.steps, calib, params.base.seed)
    save_quantized(model, tokenizer, result.scheme, stage_dir("calibrate") / "model",
                   extra=steps_record([], cfg.steps), files=result.files)
    metrics = {"method": result.metrics.pop("steps"), "scheme": result.scheme.name, **result.metrics}
    write_json("metrics/calibrate.json", metrics)
    log_artifact(stage_dir("calibrate") / "model" / "quantization.json")
    return metrics


if __name__ == "__main__":
    main("calibrate", run)
