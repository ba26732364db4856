"""Calibration (initialisation) methods: one module per method, found by name.

`CALIBRATE` imports its method modules on first lookup (`Registry.discover`).
A method has the signature
`fn(model, scheme, calib_ids: Tensor | None, options) -> dict[str, float]`:
it replaces the model's quantizable linears by `QuantLinear`s in place and
returns metrics worth logging. The returned dict may also hold `files`:
{file name: writer(path)} for search results the stage stores inside the
quantized model directory (written atomically with it), e.g. AWQ's scales.
"""

from quant.config.registry import Registry

CALIBRATE = Registry("calibrate", modules=("quant.calibrate.rtn", "quant.calibrate.awq",
                                            "quant.calibrate.quarot", "quant.calibrate.fp_search",
                                            "quant.calibrate.gptq"))
