"""Calibration: initialise the quantized model, in memory, with the calibrate steps of a recipe.

A calibrate method (registered in `quant.methods` with kind `calibrate`) is called as
`fn(model, options, ctx: CalibrationContext) -> metrics`. A *transform* (QuaRot)
changes the weights without quantizing them; the *quantizer* that ends the steps (rtn,
awq, gptq, fp-search) replaces every quantizable linear by a `QuantLinear`, keeping an
online input rotation a transform installed on it. Metrics may hold `files`:
{file name: writer(path)}, search results the stage stores inside the quantized model
directory (AWQ's scales, GPTQ's integer weights) so a later run can reuse them.

`calibrate` runs the steps on the scheme they resolve to (a step may say how it honours the
scheme: GPTQ and AWQ store static qparams, so a preset's `dynamic_minmax` is off in the model
they produce; `Calibrated.scheme`): every step's `check_inputs` first (on the loaded model and
data), so nothing is changed when any step would refuse; then each step in order; then the
scheme's activation / KV-cache quantizers are attached (`quant.modules.runtime`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from quant.config.scheme import QuantScheme


@dataclass
class CalibrationContext:
    """What a calibrate step sees beyond the model and its options."""

    scheme: QuantScheme
    calib_ids: Any = None  # LongTensor [samples, seq_len] of calibration text, or None
    seed: int = 0
    where: str = "calibrate.steps[0]"  # the step's field, for errors
    history: tuple = ()  # the recipe Steps that ran before this one (e.g. QuaRot before GPTQ)


def static_qparams(scheme: QuantScheme, options=None) -> QuantScheme:
    """`resolve` hook of the quantizers that compute and store static step sizes and zero points
    (GPTQ, AWQ): a preset that recomputes them from the weight at every forward (LLM-QAT's
    `dynamic_minmax`) would throw them away, so the model such a step produces has
    `dynamic_minmax: false`; the intent of the recipe is clear (its weights on the preset's grid)."""
    if scheme.weight is None or not scheme.weight.dynamic_minmax:
        return scheme
    return dataclasses.replace(scheme, weight=dataclasses.replace(scheme.weight, dynamic_minmax=False))


def check_calibration_ids(ctx: CalibrationContext, saved_results: str | None, method: str) -> None:
    """A step that searches on data (AWQ, GPTQ) has integer windows [samples, seq_len >= 2], or
    the path of its saved results to reuse instead."""
    from quant.config import ConfigError

    ids = ctx.calib_ids
    if saved_results is not None:
        return
    if ids is None:
        raise ConfigError(f"{ctx.where} needs calibration data (calibrate.samples x calibrate.seq_len "
                          f"windows of the calibration text), or the option results naming saved "
                          f"{method} results")
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.dtype.is_floating_point:
        raise ConfigError(f"{method} calibration ids must be integer [samples, seq_len >= 2], got "
                          f"{ids.dtype} {tuple(ids.shape)}")


def check_integer_scheme(scheme: QuantScheme, method: str, where: str) -> None:
    """A quantizer of integer grids (AWQ, GPTQ) needs quantized int2..int8 weights."""
    from quant.config import ConfigError
    from quant.numerics.formats import IntFormat

    if scheme.weight is None:
        raise ConfigError(f"{where} quantizes weights but scheme.weight is null; set scheme.weight")
    if not isinstance(scheme.weight.format, IntFormat):
        raise ConfigError(f"scheme.weight.format={scheme.weight.format.spec()}: {method} supports integer "
                          f"formats int2..int8 ({where})")


@dataclass
class Calibrated:
    scheme: QuantScheme  # the scheme of the calibrated model (quant.recipe.resolve_scheme)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Callable[[Any], None]] = field(default_factory=dict)  # name -> writer(path)


def calibrate(model, scheme: QuantScheme, steps: Sequence, calib_ids=None, seed: int = 0,
              path: str = "calibrate.steps") -> Calibrated:
    """Run the calibrate `steps` (recipe `Step`s) on `model`, in place."""
    from quant import methods
    from quant.models.arch import untie_lm_head
    from quant.models.moe import prepare_model
    from quant.modules.kv_cache import check_kv_cache
    from quant.modules.runtime import apply_runtime_quantizers
    from quant.recipe import check_steps, resolve_scheme

    steps = tuple(steps)
    check_steps("calibrate", steps, path, scheme)
    prepare_model(model)  # per-expert linears in MoE blocks; an unsupported family fails here
    check_kv_cache(model, scheme.kv_cache)  # before any step changes the model
    if scheme.quantize_lm_head:
        untie_lm_head(model)  # the quantized lm_head is saved as its own tensor
    scheme = resolve_scheme(steps, scheme)
    plan = []
    for i, step in enumerate(steps):
        m = methods.method(step.method, "calibrate")
        ctx = CalibrationContext(scheme, calib_ids, seed, f"{path}[{i}].{step.method}", steps[:i])
        plan.append((m, step.options, ctx))
    for m, options, ctx in plan:
        if m.check_inputs is not None:
            m.check_inputs(model, options, ctx)
    out = Calibrated(scheme)
    for m, options, ctx in plan:
        metrics = dict(m.fn(model, options, ctx) or {})
        out.files.update(metrics.pop("files", {}))
        out.metrics.update(metrics)
    out.metrics.update(apply_runtime_quantizers(model, scheme))  # activation / KV quantizers
    out.metrics["steps"] = "+".join(s.method for s in steps)
    return out
