"""Config validation: every bad value gets an error that names the field."""

from __future__ import annotations

import pytest

from quant.config import ConfigError
from quant.config.scheme import ActivationSpec, KVCacheSpec, QuantScheme, WeightSpec
from quant.numerics.formats import IntFormat, parse_format
from tasks.calibrate import CalibrateConfig


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(ConfigError, match=rf"scheme\.weight\.format='int{bits}'.*accept 2\.\.8 bits"):
        QuantScheme.from_dict({"weight": {"format": f"int{bits}"}}, "scheme")
    with pytest.raises(ConfigError, match=f"bits={bits} is not supported"):
        IntFormat(bits)


def test_unknown_format_and_keys():
    with pytest.raises(ConfigError, match=r"scheme\.weight\.format='fp5'.*not a known number format"):
        QuantScheme.from_dict({"weight": {"format": "fp5"}}, "scheme")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['scheme\.weight\.group'\]"):
        QuantScheme.from_dict({"weight": {"group": 64}}, "scheme")
    with pytest.raises(ConfigError, match=r"scheme\.weight\.symmetric must be true or false"):
        QuantScheme.from_dict({"weight": {"symmetric": "yes"}}, "scheme")


def test_group_size_validation():
    with pytest.raises(ConfigError, match=r"scheme\.weight\.group_size=0 is not accepted"):
        QuantScheme.from_dict({"weight": {"group_size": 0}}, "scheme")
    spec = WeightSpec(IntFormat(4), 128)
    with pytest.raises(
        ConfigError, match=r"scheme\.weight\.group_size=128 does not divide in_features=576 of layers\.0\.q"
    ):
        spec.check_layer("layers.0.q", 576)
    spec.check_layer("ok", 1536)  # 1536 = 12 x 128


def test_unknown_method():
    with pytest.raises(ConfigError, match=r"calibrate\.steps\[0\]: 'gptqq' is not a known method; known: \[.*'rtn'"):
        CalibrateConfig.from_dict({"steps": ["gptqq"]}, "calibrate")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['calibrate\.method'\]"):
        CalibrateConfig.from_dict({"method": "rtn"}, "calibrate")


def test_activation_and_kv_specs():
    s = QuantScheme.from_dict(
        {
            "weight": {"format": "int4", "group_size": -1, "symmetric": True},
            "activation": {"format": "int8", "granularity": "per_token"},
            "kv_cache": {"format": "int4", "granularity": "per_head", "symmetric": False},
        },
        "scheme",
    )
    assert s.activation == ActivationSpec(IntFormat(8), "per_token", False)
    assert s.kv_cache == KVCacheSpec(IntFormat(4), "per_head", False)
    assert s.name == "W4A8KV4"
    with pytest.raises(ConfigError, match=r"scheme\.activation\.granularity='per_row' is not accepted"):
        QuantScheme.from_dict({"activation": {"granularity": "per_row"}}, "scheme")


def test_scheme_names_and_dict_round_trip():
    s = QuantScheme.from_name("W4A8KV16", preset="efficientqat", group_size=64)
    assert s.kv_cache is None and s.activation.format == IntFormat(8)
    assert s.name == "W4A8KV16g64"
    assert QuantScheme.from_dict(s.to_dict(), "scheme") == s
    assert QuantScheme.from_name("W16A16KV16").weight is None
    with pytest.raises(ConfigError, match="W<w>A<a>KV<kv>"):
        QuantScheme.from_name("W4-A8")
    assert parse_format(3) == IntFormat(3)


def test_llm_qat_preset_is_the_published_scheme():
    """W4A8KV4 by name is LLM-QAT's scheme: symmetric min-max, weights per output channel
    with step sizes recomputed every step, activations and KV cache per token."""
    s = QuantScheme.from_name("W4A8KV4")
    assert s.weight == WeightSpec(IntFormat(4), -1, symmetric=True, dynamic_minmax=True)
    assert s.activation == ActivationSpec(IntFormat(8), "per_token", symmetric=True)
    assert s.kv_cache == KVCacheSpec(IntFormat(4), "per_token", symmetric=True)
    assert QuantScheme.from_dict({"preset": "llm-qat", "name": "W4A8KV4"}, "scheme") == s
    assert QuantScheme.from_dict(s.to_dict(), "scheme") == s
    e = QuantScheme.from_dict({"preset": "efficientqat", "name": "W2A16KV16"}, "scheme")
    assert e.weight == WeightSpec(IntFormat(2), 64, symmetric=False) and e.activation is None
    with pytest.raises(ConfigError, match=r"scheme\.preset='gptq' is not known; accepted: \['llm-qat'"):
        QuantScheme.from_dict({"preset": "gptq", "name": "W4A8KV4"}, "scheme")
    with pytest.raises(ConfigError, match=r"needs both scheme\.preset .* and scheme\.name"):
        QuantScheme.from_dict({"preset": "llm-qat"}, "scheme")
    with pytest.raises(ConfigError, match=r"cannot be combined with \['weight'\]"):
        QuantScheme.from_dict({"preset": "llm-qat", "name": "W4A8KV4", "weight": {}}, "scheme")
    with pytest.raises(ConfigError, match=r"scheme\.name='W9A8KV4'.*bits=9"):
        QuantScheme.from_dict({"preset": "llm-qat", "name": "W9A8KV4"}, "scheme")


def test_flatten_is_the_one_copy_used_by_flows():
    from quant.config import flatten

    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}
    assert flatten({"x": {"y": 2.0}}, "m", sep="/") == {"m/x/y": 2.0}
    assert flatten(3.5, "loss") == {"loss": 3.5}  # a metrics file holding one number
    import flows.tracking

    assert flows.tracking.flatten is flatten
