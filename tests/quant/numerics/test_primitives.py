"""quant.numerics.grid against an independent numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quant.numerics import grid as P
from quant.numerics.formats import IntFormat


def ref_minmax(x: np.ndarray, bits: int, g: int, symmetric: bool):
    """Independent numpy reference of per-group min-max RTN (documented conventions: the
    range contains 0, step sizes in [1e-6, 1e4], the zero point rounded and clamped into
    the unsigned grid). Step sizes and codes are computed in float32 as the library does,
    so codes, step sizes and zero points must match exactly; dequantization in float64."""
    rows, k = x.shape
    g = k if g == -1 else g
    xg = x.reshape(rows, k // g, g).astype(np.float32)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = np.clip(np.abs(xg).max(-1) / np.float32(qmax), 1e-6, 1e4).astype(np.float32)
        zp = np.zeros_like(scale)
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = np.minimum(xg.min(-1), 0), np.maximum(xg.max(-1), 0)
        scale = np.clip((hi - lo) / np.float32(qmax), 1e-6, 1e4).astype(np.float32)
        zp = np.clip(np.float32(0) - np.round(lo / scale), 0, qmax).astype(np.float32)
    q = np.clip(np.round(xg / scale[..., None]) + zp[..., None], qmin, qmax)
    deq = (q.astype(np.float64) - zp[..., None]) * scale[..., None].astype(np.float64)
    return q.reshape(rows, k).astype(np.int32), scale, zp, deq.reshape(rows, k)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [-1, 16, 32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_rtn_matches_reference_exactly(bits, group, symmetric):
    torch.manual_seed(bits * 100 + group)
    x = torch.randn(8, 64)
    fmt = IntFormat(bits)
    scale, zp = P.choose_qparams(x, fmt, group, symmetric=symmetric)
    q = P.quantize(x, scale, zp, fmt, group)
    deq = P.dequantize(q, scale, zp, fmt, group, torch.float64)
    q_ref, s_ref, zp_ref, deq_ref = ref_minmax(x.numpy(), bits, group, symmetric)
    np.testing.assert_array_equal(scale.numpy(), s_ref)
    if symmetric:
        assert zp is None
    else:
        np.testing.assert_array_equal(zp.numpy(), zp_ref)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(deq.numpy(), deq_ref)
    # the fake-quant forward is the same function, exactly
    assert torch.equal(P.fake_quantize(x, scale, zp, fmt, group), deq.float())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_signed_groups_are_not_clipped(sign):
    """A group whose values are all positive (or all negative): the range is widened to 0,
    so every value lies inside the grid (error <= half a step). Before the fix the zero
    point left the grid and the top (bottom) of the group was clipped."""
    fmt = IntFormat(3)
    x = sign * torch.tensor([[0.5, 1.0, 2.0, 3.0, 2.5, 1.5, 0.75, 2.25]])
    scale, zp = P.choose_qparams(x, fmt, -1, symmetric=False)
    assert 0 <= zp.item() <= 7 and float(zp.item()).is_integer()
    deq = P.dequantize(P.quantize(x, scale, zp, fmt, -1), scale, zp, fmt, -1)
    assert ((deq - x).abs() <= scale / 2 + 1e-7).all()
    assert torch.equal(deq.abs().amax(), x.abs().amax())  # the extreme value survives


def test_fractional_zero_points_agree_across_primitives():
    """quantize rounds the zero point; dequantize and fake_quantize must use the same
    integer zero point (before the fix dequantize subtracted the raw fractional one)."""
    fmt = IntFormat(4)
    torch.manual_seed(3)
    x = torch.randn(4, 32)
    scale = torch.rand(4, 2) * 0.2 + 0.05
    zp = torch.rand(4, 2) * 15  # fractional, as a learned zero point is
    q = P.quantize(x, scale, zp, fmt, 16)
    deq = P.dequantize(q, scale, zp, fmt, 16)
    fq = P.fake_quantize(x, scale, zp, fmt, 16)
    assert torch.equal(deq, fq)
    # independent reference: the rounded zero point
    zi = zp.round().repeat_interleave(16, dim=1)
    s = scale.repeat_interleave(16, dim=1)
    ref = ((torch.round(x / s) + zi).clamp(0, 15) - zi) * s
    assert torch.equal(deq, ref)


def test_learned_step_sizes_stay_positive():
    """A step size that trained to 0 or below is clamped to SCALE_MIN (finite output, the
    grid keeps its orientation); the gradient still reaches it (straight-through)."""
    fmt = IntFormat(4)
    x = torch.tensor([[0.1, -0.2, 0.3, 0.05]])
    for bad in (0.0, -0.5):
        scale = torch.tensor([[bad]], requires_grad=True)
        zp = torch.tensor([[8.0]])
        y = P.fake_quantize(x, scale, zp, fmt, -1)
        assert torch.isfinite(y).all()
        ref = P.fake_quantize(x, torch.tensor([[P.SCALE_MIN]]), zp, fmt, -1)
        assert torch.equal(y.detach(), ref)
        y.sum().backward()
        assert torch.isfinite(scale.grad).all() and scale.grad.abs().sum() > 0
    huge = torch.tensor([[1e9]])
    assert torch.equal(P.quantize(x, huge, None, fmt, -1), P.quantize(x, torch.tensor([[P.SCALE_MAX]]), None, fmt, -1))


def test_grid_values_survive_roundtrip_exactly():
    fmt = IntFormat(4)
    torch.manual_seed(0)
    scale = torch.rand(4, 2) + 0.1
    zp = torch.randint(0, 16, (4, 2)).float()
    q = torch.randint(0, 16, (4, 64), dtype=torch.int32)
    x = P.dequantize(q, scale, zp, fmt, 32)
    q2 = P.quantize(x, scale, zp, fmt, 32)
    assert torch.equal(q2, q)
    assert torch.equal(P.dequantize(q2, scale, zp, fmt, 32), x)


def test_symmetric_grid_and_roundtrip():
    fmt = IntFormat(4)
    lo, hi = fmt.qrange(symmetric=True)
    assert (lo, hi) == (-8, 7)
    x = torch.randn(3, 32)
    scale, zp = P.choose_qparams(x, fmt, -1, symmetric=True)
    assert zp is None
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 7)
    q = P.quantize(x, scale, None, fmt, -1)
    assert q.min() >= -8 and q.max() <= 7
    xq = P.dequantize(q, scale, None, fmt, -1)
    assert torch.equal(P.quantize(xq, scale, None, fmt, -1), q)


def test_clamping_and_zero_point_range():
    fmt = IntFormat(3)
    x = torch.tensor([[0.5, 1.0, 2.0, 3.0]])
    scale, zp = P.choose_qparams(x, fmt, -1, symmetric=False)
    q = P.quantize(x * 10, scale, zp, fmt, -1)  # far outside the range
    assert q.min() >= 0 and q.max() == 7
    q = P.quantize(-x * 10, scale, zp, fmt, -1)
    assert q.max() <= 7 and q.min() == 0
    # a zero point given outside the grid is clamped into it
    q = P.quantize(torch.zeros(1, 4), torch.ones(1, 1), torch.tensor([[20.0]]), fmt, -1)
    assert torch.equal(q, torch.full((1, 4), 7, dtype=torch.int32))


def test_group_reshaping():
    x = torch.arange(2 * 12, dtype=torch.float32).view(2, 12)
    g = P.group_view(x, 4)
    assert g.shape == (2, 3, 4)
    assert torch.equal(g[1, 2], torch.tensor([20.0, 21, 22, 23]))
    assert P.group_view(x, -1).shape == (2, 1, 12)
    assert P.group_view(x, 0).shape == (1, 24)
    with pytest.raises(ValueError, match="group_size=5 does not divide"):
        P.group_view(x, 5)
    scale, zp = P.choose_qparams(x, IntFormat(8), 4, symmetric=False)
    assert scale.shape == (2, 3) and zp.shape == (2, 3)
    scale, zp = P.choose_qparams(x, IntFormat(8), 0, symmetric=False)
    assert scale.shape == (1,)


def test_per_tensor_and_per_token_shapes():
    x = torch.randn(2, 5, 16)  # [B, S, D] activations
    s, z = P.choose_qparams(x, IntFormat(8), -1, symmetric=False)
    assert s.shape == (2, 5, 1)
    y = P.fake_quantize(x, s, z, IntFormat(8), -1)
    assert y.shape == x.shape
    s, z = P.choose_qparams(x, IntFormat(8), 0, symmetric=True)
    assert s.shape == (1,)
    assert P.fake_quantize(x, s, z, IntFormat(8), 0).shape == x.shape


@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_equals_dequantize_of_quantize(symmetric):
    torch.manual_seed(1)
    fmt = IntFormat(3)
    w = torch.randn(16, 64)
    scale, zp = P.choose_qparams(w, fmt, 16, symmetric, clip_ratio=0.8)  # clipping active
    fq = P.fake_quantize(w, scale, zp, fmt, 16)
    dq = P.dequantize(P.quantize(w, scale, zp, fmt, 16), scale, zp, fmt, 16)
    assert torch.equal(fq, dq)


def test_round_and_clamp_ste_gradients():
    x = torch.tensor([0.2, 0.7, 1.5, -2.4], requires_grad=True)
    P.round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(4))
    x.grad = None
    y = P.clamp_ste(x, -1.0, 1.0)
    assert torch.equal(y.detach(), x.detach().clamp(-1, 1))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


def test_fake_quant_gradients_reach_x_scale_and_zero_point():
    fmt = IntFormat(2)
    x = torch.tensor([[-1.0, -0.2, 0.3, 5.0]], requires_grad=True)  # 5.0 is clipped
    scale = torch.tensor([[0.5]], requires_grad=True)
    zp = torch.tensor([[2.0]], requires_grad=True)
    P.fake_quantize(x, scale, zp, fmt, -1).sum().backward()
    # identity gradient inside the grid, zero where clipped (LSQ)
    assert torch.equal(x.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # LSQ scale gradient: sum over in-range (round(x/s) - x/s) + clipped (qmax - zp)
    v = torch.tensor([-1.0, -0.2, 0.3]) / 0.5
    expected = (torch.round(v) - v).sum() + (3 - 2)
    torch.testing.assert_close(scale.grad, expected.view(1, 1))
    # zero point: only the clipped element contributes (-scale)
    torch.testing.assert_close(zp.grad, torch.tensor([[-0.5]]))
