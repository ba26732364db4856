"""Calibration (initialisation) methods: one module per method, found by name.

`CALIBRATE` imports its method modules on first lookup (`Registry.discover`).
A method has the signature
`fn(model, scheme, calib_ids: Tensor | None, options) -> dict[str, float]`:
it replaces the model's quantizable linears by `QuantLinear`s in place and
returns metrics worth logging.
"""

from quant.config.registry import Registry

CALIBRATE = Registry("calibrate", modules=("quant.calibrate.rtn", "quant.calibrate.quarot"))
