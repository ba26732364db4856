"""Typed configuration: the `Config` machinery, the quantization scheme, registries.

`quant.config.base` (Config, ConfigError, InputError, flatten) is re-exported here; the
scheme lives in `quant.config.scheme` and the method registries in
`quant.config.registry` (imported from there: the scheme needs the number
formats of `quant.numerics`, which themselves are `Config`s).
"""

from quant.config.base import (
    ALLOW_NONFINITE,
    Config,
    ConfigError,
    InputError,
    MissingDependencyError,
    TrainingDivergedError,
    flatten,
)

__all__ = ["ALLOW_NONFINITE", "Config", "ConfigError", "InputError", "MissingDependencyError", "TrainingDivergedError", "flatten"]
