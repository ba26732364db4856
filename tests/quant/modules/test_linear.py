"""QuantLinear: construction, exactness against the integer representation, round trips."""

from __future__ import annotations

import torch
from torch import nn

from quant.config.scheme import WeightSpec
from quant.modules.linear import QuantLinear
from quant.numerics.formats import IntFormat
from tests.quant.numerics.test_primitives import ref_minmax


def _linear(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(64, 24, bias=bias)


def test_from_linear_is_rtn_and_params_are_learnable():
    lin = _linear()
    spec = WeightSpec(IntFormat(4), 32, False)
    ql = QuantLinear.from_linear(lin, spec)
    assert isinstance(ql.scale, nn.Parameter) and isinstance(ql.zero_point, nn.Parameter)
    assert ql.scale.shape == (24, 2)
    # independent numpy reference of min-max RTN, exact
    _, s_ref, z_ref, deq_ref = ref_minmax(lin.weight.detach().numpy(), 4, 32, symmetric=False)
    assert torch.equal(ql.scale.detach(), torch.from_numpy(s_ref))
    assert torch.equal(ql.zero_point.detach(), torch.from_numpy(z_ref))
    ref = torch.from_numpy(deq_ref).float()
    assert torch.equal(ql.dequantized_weight(), ref)
    x = torch.randn(3, 5, 64)
    assert torch.equal(ql(x), nn.functional.linear(x, ref, lin.bias))


def test_to_linear_round_trip_and_grid():
    ql = QuantLinear.from_linear(_linear(), WeightSpec(IntFormat(3), -1, True))
    lin = ql.to_linear()
    x = torch.randn(4, 64)
    assert torch.equal(lin(x), ql(x))
    # weights of the converted linear are on the grid: requantizing changes nothing
    ql2 = QuantLinear.from_linear(lin, ql.spec)
    with torch.no_grad():
        ql2.scale.copy_(ql.scale)
    assert torch.equal(ql2.dequantized_weight(), lin.weight)


def test_freeze_keeps_function_and_trains_only_scale():
    ql = QuantLinear.from_linear(_linear(1), WeightSpec(IntFormat(2), 16, False))
    with torch.no_grad():  # move off the min-max init, as training would
        ql.scale.mul_(1.1)
        ql.zero_point.add_(0.3)
    x = torch.randn(6, 64)
    before = ql(x)
    q, s, z = ql.integer_weight()
    ql.freeze()
    assert ql.frozen and torch.equal(ql(x), before)
    names = {n for n, p in ql.named_parameters()}
    assert names == {"scale", "bias"}
    q2, s2, z2 = ql.integer_weight()
    assert torch.equal(q, q2) and torch.equal(z, z2)
    # fake-quant function == integer representation exactly (reference: (q - z) * s)
    ref = (q2.double() - z2.double().repeat_interleave(16, 1)) * s2.double().repeat_interleave(16, 1)
    assert torch.equal(ql.dequantized_weight(), ref.float())


def test_gradients_reach_weight_scale_and_zero_point():
    ql = QuantLinear.from_linear(_linear(2), WeightSpec(IntFormat(3), 32, False), clip_ratio=0.9)
    ql(torch.randn(8, 64)).pow(2).sum().backward()
    for p in (ql.weight, ql.scale, ql.zero_point):
        assert p.grad is not None and p.grad.abs().sum() > 0
