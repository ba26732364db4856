"""calibrate: initialise the quantized model with a registered method (rtn, ...).

Reads artifacts/prepare/{model,data}; writes artifacts/calibrate/model (a
quantized checkpoint, see quant.models.checkpoint.save_quantized) and metrics/calibrate.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from quant.calibrate import CALIBRATE
from quant.config import Config, ConfigError
from quant.e2e.data import sample_windows, tokenize_text
from quant.models.checkpoint import load_model, quantizable_linears, save_quantized, source_dtype
from quant.modules.runtime import apply_runtime_quantizers
from tasks.common import Params, log_artifact, main, setup_torch, stage_dir, write_json


@dataclass(frozen=True)
class CalibrateConfig(Config):
    method: str = "rtn"
    options: dict[str, Any] = field(default_factory=dict)  # validated by the method
    samples: int = 128  # calibration windows (methods that need data)
    seq_len: int = 512

    def __post_init__(self) -> None:
        CALIBRATE.get(self.method, "method")
        if self.samples <= 0 or self.seq_len <= 1:
            raise ConfigError(f"samples={self.samples} and seq_len={self.seq_len} must be positive")


def calibration_ids(tokenizer, params: Params, samples: int, seq_len: int) -> torch.Tensor:
    text = (stage_dir("prepare") / "data" / "calib.txt").read_text()
    return sample_windows(tokenize_text(tokenizer, text), samples, seq_len, params.base.seed)


def run(params: Params) -> dict[str, Any]:
    cfg = params.section("calibrate", CalibrateConfig)
    entry = CALIBRATE.get(cfg.method, "calibrate.method")
    options = entry.options.from_dict(cfg.options, "calibrate.options")
    device, _ = setup_torch(params.base)
    # the float weights keep the source precision (not base.dtype): Block-AP trains them and
    # takes its full-precision targets from them
    src = stage_dir("prepare") / "model"
    model, tokenizer = load_model(src, source_dtype(src), device)
    quantizable_linears(model, params.scheme)  # validate group sizes before any work
    calib = calibration_ids(tokenizer, params, cfg.samples, cfg.seq_len)
    metrics = entry.fn(model, params.scheme, calib, options) or {}
    metrics.update(apply_runtime_quantizers(model, params.scheme))  # activation / KV quantizers
    save_quantized(model, tokenizer, params.scheme, stage_dir("calibrate") / "model",
                   extra={"method": cfg.method})
    metrics = {"method": cfg.method, "scheme": params.scheme.name, **metrics}
    write_json("metrics/calibrate.json", metrics)
    log_artifact(stage_dir("calibrate") / "model" / "quantization.json")
    return metrics


if __name__ == "__main__":
    main("calibrate", run)
