"""Round-to-nearest: min-max qparams per group, no data needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quant.calibrate import CalibrationContext
from quant.config import Config, ConfigError
from quant.config.scheme import QuantScheme
from quant.methods import register
from quant.models.arch import quantizable_linears, set_module
from quant.modules.linear import QuantLinear
from quant.modules.rotation import move_input_rotation


@dataclass(frozen=True)
class RTNOptions(Config):
    clip_ratio: float = 1.0  # shrink the min-max range (1.0 = plain min-max; not with dynamic_minmax)

    def __post_init__(self) -> None:
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ConfigError(f"clip_ratio={self.clip_ratio} must be in (0, 1]")


def check_rtn(scheme: QuantScheme, options: RTNOptions, where: str) -> None:
    """A clipped range is set once at initialisation; a `dynamic_minmax` weight (the llm-qat
    preset) re-derives the plain min-max range at every forward and would silently drop it."""
    if scheme.weight is not None and scheme.weight.dynamic_minmax and options.clip_ratio != 1.0:
        raise ConfigError(f"{where}: clip_ratio={options.clip_ratio} clips the min-max range once, but "
                          "scheme.weight.dynamic_minmax=true recomputes the unclipped range at every "
                          "forward; use clip_ratio 1.0 or dynamic_minmax false")


def quantize_linears(model: nn.Module, scheme: QuantScheme, clip_ratio: float = 1.0) -> int:
    """Replace every quantizable linear by a min-max-initialised QuantLinear (keeping an online
    input rotation a transform installed); returns the count."""
    if scheme.weight is None:
        return 0
    targets = quantizable_linears(model, scheme)  # validates every layer before any change
    for name, lin in targets:
        ql = QuantLinear.from_linear(lin, scheme.weight, name, clip_ratio)
        move_input_rotation(lin, ql)
        set_module(model, name, ql)
    return len(targets)


@register("rtn", kind="calibrate", options=RTNOptions, role="quantizer", after=("quarot",), check=check_rtn)
@torch.no_grad()
def rtn(model: nn.Module, options: RTNOptions, ctx: CalibrationContext) -> dict[str, float]:
    """Round to nearest with min-max (optionally clipped) step sizes; no data."""
    n = quantize_linears(model, ctx.scheme, options.clip_ratio)
    return {"quantized_linears": float(n)}
