"""The one place where a scheme's runtime quantizers are put on a model.

Weights are quantized by replacing linears with `QuantLinear`s (calibrate,
restore); activations and the KV cache are quantized dynamically at run time,
by stateless modules on the linears' inputs (`quant.modules.activation`) and on the key
/ value projections' outputs (`quant.modules.kv_cache`). `apply_runtime_quantizers`
installs exactly what the scheme asks for and removes what it does not, so it
is idempotent and every path that builds a quantized model (calibrate, a
loaded checkpoint, training stages, evaluation, generation) ends with the same
quantizers. Call it after the weight quantizers are in place: it attaches to
the modules present at that moment.

`dequantize_once` is for scoring many batches with one model (evaluation): each
quantized linear dequantizes its weight once instead of on every forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from quant.config.scheme import QuantScheme
from quant.models.arch import get_module, mapping_for, target_linears
from quant.modules.activation import apply_activation_quantizers
from quant.modules.kv_cache import apply_kv_quantizers


def apply_runtime_quantizers(model: nn.Module, scheme: QuantScheme) -> dict[str, int]:
    """Install the scheme's activation and KV-cache quantizers (removing any others)."""
    linears = target_linears(model, scheme.quantize_lm_head)
    if not scheme.quantize_lm_head:  # drop a quantizer a previous scheme may have put there
        mapping = mapping_for(model)
        apply_activation_quantizers([(mapping.lm_head, get_module(model, mapping.lm_head))], None)
    n_act = apply_activation_quantizers(linears, scheme.activation)
    n_kv = apply_kv_quantizers(model, scheme.kv_cache)
    return {
        "act_quantized_linears": n_act if scheme.activation is not None else 0,
        "kv_quantized_projections": n_kv if scheme.kv_cache is not None else 0,
    }


@contextmanager
def dequantize_once(model: nn.Module) -> Iterator[int]:
    """Inside the block, every QuantLinear and every PackedLinear on the `torch` backend
    computes its dequantized weight once, on entry, and reuses it in every forward run
    without gradients (with gradients enabled they dequantize as usual). The weight is
    the same tensor the forward pass would compute, so outputs are bit for bit those
    of the plain forward; the cost is one float copy of the quantized weights in memory
    (what the full-precision model takes). Dynamic activation and KV-cache quantizers
    are unaffected. Yields the number of layers cached; the copies are dropped on exit."""
    from quant.modules.linear import QuantLinear
    from quant.modules.packed import PackedLinear

    layers = [m for m in model.modules()
              if isinstance(m, QuantLinear) or (isinstance(m, PackedLinear) and m.backend == "torch")]
    try:
        with torch.no_grad():
            for m in layers:
                m.cached_weight = m.dequantized_weight()
        yield len(layers)
    finally:
        for m in layers:
            m.cached_weight = None
