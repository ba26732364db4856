"""FP number formats: grids against independent constructions, block formats against the
OCP MX / NVIDIA definitions, parsing and dispatch through schemes and modules."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

from quant.config import ConfigError
from quant.config.scheme import ActivationSpec, KVCacheSpec, QuantScheme, WeightSpec
from quant.modules.activation import DynamicQuantizer
from quant.modules.linear import QuantLinear
from quant.numerics import fp as FP
from quant.numerics.formats import FPFormat, IntFormat, MXFP4Format, NVFP4Format, parse_format

ALL_FP = [FPFormat(e, m) for e, m in FPFormat.ACCEPTED]
E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX v1.0, table of FP4 E2M1


def bit_construction(e_bits: int, m_bits: int, bias: float) -> list[float]:
    """Every non-negative value of sign/E/M codes with subnormals and no inf/NaN."""
    vals = set()
    for e, m in itertools.product(range(2**e_bits), range(2**m_bits)):
        if e == 0:
            vals.add(m / 2**m_bits * 2.0 ** (1 - bias))
        else:
            vals.add((1 + m / 2**m_bits) * 2.0 ** (e - bias))
    return sorted(vals)


def sweep(top: float, n: int = 200001) -> torch.Tensor:
    return torch.linspace(-1.2 * top, 1.2 * top, n, dtype=torch.float64)


@pytest.mark.parametrize("fmt", ALL_FP, ids=lambda f: f.spec())
def test_grid_equals_bit_construction(fmt):
    b = fmt.standard_bias
    ref = torch.tensor(bit_construction(fmt.exponent, fmt.mantissa, b), dtype=torch.float64)
    # every code value is a fixed point, and the largest is maxval
    assert torch.equal(FP.fake_quantize_fp(ref, fmt, b), ref)
    assert FP.maxval(fmt, b) == ref.max().item()
    # rounding a dense sweep (plus the codes themselves) lands exactly on the code set
    x = torch.cat([sweep(ref.max().item()), ref, -ref])
    got = FP.fake_quantize_fp(x, fmt, b).abs().unique()
    assert torch.equal(got, ref)


def test_e2m1_values_and_fp8_maxima():
    assert bit_construction(2, 1, 1) == E2M1_VALUES
    assert FP.maxval(FPFormat(2, 1), 1) == 6.0
    assert FP.maxval(FPFormat(5, 2), 15) == 1.75 * 2**16  # no inf codes: the top binade is used
    assert FP.maxval(FPFormat(4, 3), 7) == 480.0  # LLM-FP4 E4M3 (no NaN code), vs OCP's 448


@pytest.mark.parametrize("fmt", ALL_FP, ids=lambda f: f.spec())
def test_real_bias_is_a_rescaled_grid_and_idempotent(fmt):
    torch.manual_seed(0)
    x = torch.randn(4096, dtype=torch.float64) * 3
    for b in (-0.7, 0.4, fmt.standard_bias + 0.37):
        q = FP.fake_quantize_fp(x, fmt, b)
        assert torch.allclose(q, 2.0**-b * FP.fake_quantize_fp(x * 2.0**b, fmt, 0.0), rtol=1e-12, atol=0)
        # idempotent: exactly for an integer bias, to the last bits for a real one (the step
        # 2^(p - M - b) is rounded when b is not an integer)
        assert torch.allclose(FP.fake_quantize_fp(q, fmt, b), q, rtol=1e-13, atol=0)
        qi = FP.fake_quantize_fp(x, fmt, round(b))
        assert torch.equal(FP.fake_quantize_fp(qi, fmt, round(b)), qi)
        assert q.abs().max() <= FP.maxval(fmt, b) * (1 + 1e-12)
        ref = torch.tensor(bit_construction(fmt.exponent, fmt.mantissa, b), dtype=torch.float64)
        dist = (q.abs().unique()[:, None] - ref[None]).abs().min(dim=1).values
        assert dist.max() <= 1e-12 * ref.max()


def test_subnormals():
    e2m1 = FPFormat(2, 1)
    x = torch.tensor([0.2, 0.25, 0.3, 0.74, 0.76, 1.25], dtype=torch.float64)
    # below 1 (= 2^(1-b)) the step is 0.5; ties to even: 0.25 -> 0, 1.25 -> 1
    assert FP.fake_quantize_fp(x, e2m1, 1).tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    e4m3 = FPFormat(4, 3)
    sub = [m / 8 * 2.0**-6 for m in range(1, 8)]
    assert FP.fake_quantize_fp(torch.tensor(sub, dtype=torch.float64), e4m3, 7).tolist() == sub
    assert FP.fake_quantize_fp(torch.tensor([2.0**-10]), e4m3, 7).item() == 0.0  # tie -> 0
    assert FP.fake_quantize_fp(torch.tensor([0.0]), e4m3, 7).item() == 0.0


def test_initial_bias_maps_absmax_to_top():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    for fmt in ALL_FP:
        b = FP.choose_bias(w, fmt, -1)
        assert torch.allclose(FP.maxval(fmt, b), w.abs().amax(1, keepdim=True), rtol=1e-5)
        q = FP.fake_quantize_grouped(w, fmt, b, -1)
        assert torch.allclose(q.abs().amax(1), w.abs().amax(1), rtol=1e-5)


def test_e4m3_scale_matches_ocp_fp8():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    ref = codes[~codes.isnan()].abs().unique()
    assert ref.max().item() == 448.0
    x = torch.cat([ref, torch.linspace(0, 600, 100001)])
    assert torch.equal(FP.e4m3_round(x).unique(), ref)
    y = torch.rand(10000) * 400
    assert torch.equal(FP.e4m3_round(y), y.to(torch.float8_e4m3fn).float())


def _nearest_e2m1(v: torch.Tensor) -> torch.Tensor:
    grid = torch.tensor(E2M1_VALUES, dtype=v.dtype)
    idx = (v.abs()[..., None] - grid).abs().argmin(dim=-1)
    return torch.sign(v) * grid[idx]


def test_mxfp4_against_ocp_definition():
    torch.manual_seed(2)
    x = torch.randn(8, 128) * torch.logspace(-3, 2, 8)[:, None]
    q = FP.fake_quantize_block(x, MXFP4Format())
    blocks = x.reshape(8, 4, 32)
    # X = 2^(floor(log2 amax) - emax_elem), emax_elem = 2 for E2M1; elements saturate at 6
    scale = torch.exp2(torch.floor(torch.log2(blocks.abs().amax(-1, keepdim=True))) - 2)
    ref = _nearest_e2m1((blocks / scale).clamp(-6, 6)) * scale
    assert torch.equal(q, ref.reshape(8, 128))
    s = FP.block_scales(x, MXFP4Format())
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # E8M0: powers of two


def test_nvfp4_against_nvidia_definition():
    torch.manual_seed(3)
    x = torch.randn(4, 64) * torch.logspace(-2, 1, 4)[:, None]
    q = FP.fake_quantize_block(x, NVFP4Format())
    blocks = x.reshape(4, 4, 16).double()
    g = x.abs().max().double() / (6 * 448)  # per-tensor fp32 scale
    s = (blocks.abs().amax(-1, keepdim=True) / 6 / g).float().to(torch.float8_e4m3fn).double() * g
    ref = _nearest_e2m1((blocks / s).clamp(-6, 6)) * s
    assert torch.allclose(q.double(), ref.reshape(4, 64), rtol=1e-6, atol=0)
    assert FP.fake_quantize_block(torch.zeros(2, 16), NVFP4Format()).abs().sum() == 0


def test_parse_and_scheme_round_trip():
    assert parse_format("fp4-e2m1") == FPFormat(2, 1)
    assert parse_format(" FP8-E4M3 ") == FPFormat(4, 3)
    assert parse_format("mxfp4") == MXFP4Format() and parse_format("nvfp4") == NVFP4Format()
    data = {"weight": {"format": "int4", "group_size": 32},
            "activation": {"format": "fp8-e4m3", "granularity": "per_tensor"},
            "kv_cache": {"format": "fp8-e5m2"}}
    scheme = QuantScheme.from_dict(data, "scheme")
    assert scheme.activation.format == FPFormat(4, 3) and scheme.weight.format == IntFormat(4)
    assert QuantScheme.from_dict(scheme.to_dict(), "scheme") == scheme
    assert scheme.name == "W4A8KV8g32"
    mx = QuantScheme.from_dict({"weight": {"format": "mxfp4", "group_size": 32}}, "scheme")
    assert QuantScheme.from_dict(mx.to_dict(), "scheme") == mx


@pytest.mark.parametrize("value, match", [
    ("fp4-e2m2", r"format='fp4-e2m2': sign \+ exponent \+ mantissa = 1 \+ 2 \+ 2 = 5 bits, not 4; "
                 r"accepted: \['int2..int8', 'fp4-e2m1'"),
    ("fp7-e3m3", r"e3m3 is not a supported floating-point format; accepted: .*'mxfp4', 'nvfp4'\]"),
    ("bf4", r"format='bf4' is not a known number format; accepted: .*'fp8-e4m3'"),
])
def test_bad_format_strings(value, match):
    with pytest.raises(ConfigError, match=match):
        QuantScheme.from_dict({"weight": {"format": value}}, "scheme")


@pytest.mark.parametrize("fmt, group", [("mxfp4", 16), ("mxfp4", 64), ("nvfp4", 32)])
def test_block_format_needs_its_block_size(fmt, group):
    with pytest.raises(ConfigError, match=rf"scheme.weight.group_size={group} does not match "
                                          rf"format='{fmt}'.*accepted: mxfp4 with group_size 32"):
        QuantScheme.from_dict({"weight": {"format": fmt, "group_size": group}}, "scheme")


def test_quant_linear_fp_forward_and_gradient():
    torch.manual_seed(4)
    lin = torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(3, 64)
    for spec in (WeightSpec(FPFormat(2, 1), -1), WeightSpec(FPFormat(3, 0), 32),
                 WeightSpec(MXFP4Format(), 32), WeightSpec(NVFP4Format(), 16)):
        ql = QuantLinear.from_linear(lin, spec)
        if isinstance(spec.format, FPFormat):
            ref_w = FP.fake_quantize_grouped(lin.weight, spec.format, FP.choose_bias(lin.weight, spec.format,
                                             spec.group_size), spec.group_size)
        else:
            ref_w = FP.fake_quantize_block(lin.weight, spec.format)
        assert torch.equal(ql(x), F.linear(x, ref_w))
        ql(x).sum().backward()
        assert ql.weight.grad is not None and ql.weight.grad.abs().sum() > 0
        with pytest.raises(RuntimeError, match="have no integer codes"):
            ql.freeze()


def test_dynamic_fp_activation_and_kv_quantizers():
    torch.manual_seed(5)
    x = torch.randn(2, 5, 64)
    per_token = DynamicQuantizer.for_activation(ActivationSpec(FPFormat(2, 1), "per_token"))
    b = FP.choose_bias(x, FPFormat(2, 1), -1)
    assert torch.equal(per_token(x), FP.fake_quantize_grouped(x, FPFormat(2, 1), b, -1))
    assert per_token(x).abs().amax(-1).allclose(x.abs().amax(-1))
    kv = DynamicQuantizer.for_kv(KVCacheSpec(NVFP4Format(), "per_token"), 32)
    assert torch.equal(kv(x), FP.fake_quantize_block(x, NVFP4Format()))
    per_head = DynamicQuantizer.for_kv(KVCacheSpec(FPFormat(4, 3), "per_head"), 32)
    q = per_head(x)
    assert q.reshape(2, 5, 2, 32).abs().amax(-1).allclose(x.reshape(2, 5, 2, 32).abs().amax(-1))


def test_integer_only_stages_refuse_fp_weights():
    scheme = QuantScheme.from_dict({"weight": {"format": "nvfp4", "group_size": 16}}, "scheme")
    with pytest.raises(ConfigError, match=r"scheme.weight.format='nvfp4': block_ap trains and stores integer "
                                          r"grids; accepted: int2..int8"):
        scheme.require_integer_weights("block_ap")
    QuantScheme.from_dict({"weight": {"format": "int4"}}, "scheme").require_integer_weights("e2e")
