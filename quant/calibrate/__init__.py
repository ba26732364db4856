"""Calibration (initialisation) methods: one module per method, found by name.

Importing this package registers every built-in method in `CALIBRATE`.
A method has the signature
`fn(model, scheme, calib_ids: Tensor | None, options) -> dict[str, float]`:
it replaces the model's quantizable linears by `QuantLinear`s in place and
returns metrics worth logging.
"""

from quant.config.registry import Registry

CALIBRATE = Registry("calibrate")

from quant.calibrate import rtn  # noqa: E402,F401  (registration side effect)
