"""quant: the quantization library (PyTorch + transformers only).

Knows nothing of Prefect, DVC, MLflow or params.yaml: typed configs in, tensors /
modules / files out. The public API (see `quant.api` and docs/api.md):

    import quant
    model, tok = quant.load_model("embedded:smollm2-135m")
    model, report = quant.quantize(model, "awq+tesseraq+e2e-qp:W3g64", tokenizer=tok,
                                   calib_text=text, train_text=text)
    quant.export_model(model, tok, report.recipe.scheme, "compressed-tensors", "out/")

Names are imported on first use (PEP 562), so `import quant.config` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model": "quant.load", "quantize": "quant.api", "perplexity": "quant.api",
    "export_model": "quant.api", "save": "quant.api", "calibration_windows": "quant.api",
    "Report": "quant.api",
    "Recipe": "quant.recipe", "Step": "quant.recipe",
    "QuantScheme": "quant.config.scheme", "WeightSpec": "quant.config.scheme",
    "ActivationSpec": "quant.config.scheme", "KVCacheSpec": "quant.config.scheme",
    "ConfigError": "quant.config", "InputError": "quant.config",
    "method": "quant.methods", "method_names": "quant.methods", "catalogue": "quant.methods",
    "TrainConfig": "quant.e2e.trainer",
}
# names that differ from the defining module's (a package attribute may not shadow a
# sub-package: quant.export, quant.calibrate and quant.methods are modules)
_ALIASES = {"method_names": "names"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
