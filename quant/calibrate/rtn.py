"""Round-to-nearest: min-max qparams per group, no data needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quant.calibrate import CALIBRATE
from quant.config import Config, ConfigError
from quant.config.scheme import QuantScheme
from quant.models.arch import set_module
from quant.models.checkpoint import quantizable_linears
from quant.modules.linear import QuantLinear


@dataclass(frozen=True)
class RTNOptions(Config):
    clip_ratio: float = 1.0  # shrink the min-max range (1.0 = plain min-max)

    def __post_init__(self) -> None:
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ConfigError(f"clip_ratio={self.clip_ratio} must be in (0, 1]")


def quantize_linears(model: nn.Module, scheme: QuantScheme, clip_ratio: float = 1.0) -> int:
    """Replace every quantizable linear by a min-max-initialised QuantLinear; returns the count."""
    if scheme.weight is None:
        return 0
    targets = quantizable_linears(model, scheme)  # validates every layer before any change
    for name, lin in targets:
        set_module(model, name, QuantLinear.from_linear(lin, scheme.weight, name, clip_ratio))
    return len(targets)


@CALIBRATE.register("rtn", RTNOptions)
@torch.no_grad()
def rtn(model: nn.Module, scheme: QuantScheme, calib_ids, options: RTNOptions) -> dict[str, float]:
    n = quantize_linears(model, scheme, options.clip_ratio)
    return {"quantized_linears": float(n)}
