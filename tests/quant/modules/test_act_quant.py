"""Per-token dynamic activation quantization against an independent reference."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from quant.calibrate.rtn import quantize_linears
from quant.config.scheme import ActivationSpec, QuantScheme, WeightSpec
from quant.modules.activation import DynamicQuantizer
from quant.modules.linear import QuantLinear
from quant.modules.runtime import apply_runtime_quantizers
from quant.numerics.formats import IntFormat


def ref_per_token(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """LLM-QAT-style min-max per row of the last dim, written out by hand (float32)."""
    x = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-8)
        return torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s
    qmax = 2**bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = ((hi - lo) / qmax).clamp(min=1e-8)
    zp = torch.clamp(-torch.round(lo / s), 0, qmax)
    q = torch.clamp(torch.round(x / s) + zp, 0, qmax)
    return (q - zp) * s


def _acts(shape=(2, 7, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 3] *= 30  # an outlier channel, as LLM activations have
    return x


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_token_matches_reference_exactly(bits, symmetric):
    x = _acts()
    q = DynamicQuantizer.for_activation(ActivationSpec(IntFormat(bits), "per_token", symmetric))
    assert torch.equal(q(x), ref_per_token(x, bits, symmetric))


def test_per_token_levels_and_independence():
    x = _acts()
    q = DynamicQuantizer.for_activation(ActivationSpec(IntFormat(4), "per_token", False))
    y = q(x)
    for row in y.reshape(-1, y.shape[-1]):
        assert row.unique().numel() <= 16
    # one token's range does not depend on the other tokens
    x2 = x.clone()
    x2[0, 0] *= 100
    y2 = q(x2)
    assert torch.equal(y2[0, 1:], y[0, 1:]) and torch.equal(y2[1], y[1])


def test_per_tensor_uses_one_range():
    x = _acts()
    q = DynamicQuantizer.for_activation(ActivationSpec(IntFormat(8), "per_tensor", True))
    ref = ref_per_token(x.reshape(1, -1), 8, True).reshape(x.shape)
    assert torch.equal(q(x), ref)


def test_bf16_input_is_quantized_in_float32():
    x = _acts().to(torch.bfloat16)
    q = DynamicQuantizer.for_activation(ActivationSpec(IntFormat(8), "per_token", False))
    y = q(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, ref_per_token(x, 8, False).to(torch.bfloat16))


@pytest.mark.parametrize("symmetric", [False, True])
def test_straight_through_gradient(symmetric):
    x = _acts().requires_grad_(True)
    q = DynamicQuantizer.for_activation(ActivationSpec(IntFormat(4), "per_token", symmetric))
    g = torch.randn_like(x)
    (q(x) * g).sum().backward()
    # The STE passes the gradient everywhere except where the grid clamps: with a
    # min-max range that is at most a row's extreme, pushed out by zero-point rounding.
    blocked = x.grad == 0
    torch.testing.assert_close(x.grad[~blocked], g[~blocked])  # (g * s) / s: equal up to rounding
    extremes = (x == x.amax(-1, keepdim=True)) | (x == x.amin(-1, keepdim=True))
    assert bool((blocked <= extremes).all())
    assert blocked.sum() <= x.shape[0] * x.shape[1]
    if symmetric:
        assert not blocked.any()


@pytest.mark.parametrize("weights", [True, False])
def test_every_decoder_linear_gets_its_input_quantized(tiny_llama, weights):
    wspec = WeightSpec(IntFormat(4), -1, True) if weights else None
    scheme = QuantScheme(weight=wspec, activation=ActivationSpec(IntFormat(6), "per_token", True))
    if weights:
        quantize_linears(tiny_llama, scheme)
    counts = apply_runtime_quantizers(tiny_llama, scheme)
    assert counts["act_quantized_linears"] == 14  # 2 layers x 7 linears
    seen, inputs = {}, {}

    def grab_input(name):  # prepended: sees the input before any quantizer hook
        def hook(mod, args):
            inputs[name] = args[0].detach()
        return hook

    def grab(name):
        def hook(mod, args, out):
            w = mod.dequantized_weight() if isinstance(mod, QuantLinear) else mod.weight
            seen[name] = (inputs[name], w.detach(), out.detach())
        return hook

    linears = [(n, m) for n, m in tiny_llama.named_modules()
               if n.startswith("model.layers") and isinstance(m, torch.nn.Linear | QuantLinear)]
    handles = [m.register_forward_pre_hook(grab_input(n), prepend=True) for n, m in linears]
    handles += [m.register_forward_hook(grab(n)) for n, m in linears]
    tiny_llama(torch.randint(3, 256, (2, 9)))
    for h in handles:
        h.remove()
    assert len(seen) == 14
    for name, (x, w, out) in seen.items():
        torch.testing.assert_close(out, F.linear(ref_per_token(x, 6, True), w), msg=name)
        assert not torch.allclose(out, F.linear(x, w), atol=1e-6), name
    assert getattr(tiny_llama.lm_head, "input_quantizer", None) is None  # lm_head stays unquantized


def test_apply_is_idempotent_and_removable(tiny_llama):
    ids = torch.randint(3, 256, (1, 8))
    ref = tiny_llama(ids).logits
    scheme = QuantScheme(weight=None, activation=ActivationSpec(IntFormat(4)))
    apply_runtime_quantizers(tiny_llama, scheme)
    once = tiny_llama(ids).logits
    apply_runtime_quantizers(tiny_llama, scheme)
    assert torch.equal(tiny_llama(ids).logits, once)
    assert not torch.allclose(once, ref)
    apply_runtime_quantizers(tiny_llama, QuantScheme(weight=None))
    assert torch.equal(tiny_llama(ids).logits, ref)
