"""Recipes and the method registry: the text form round-trips, the params form round-trips,
every bad combination fails with one error naming the step and what is accepted."""

from __future__ import annotations

import pytest

from quant import methods
from quant.calibrate.gptq import GPTQOptions
from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.recipe import Recipe, Step, check_steps, parse_steps


@pytest.mark.parametrize("text", [
    "rtn:W4g64", "awq:W4g64", "gptq:W3g64", "awq+tesseraq+e2e-qp:W3g64", "rtn+block-ap+e2e-qp:W2g64",
    "quarot+rtn:W4A8KV4", "quarot+gptq+tesseraq+e2e-qp:W4A4KV4g64", "rtn+kd:W4A8KV4", "rtn:W8",
])
def test_text_round_trip(text):
    r = Recipe.parse(text)
    assert r.text == text
    assert Recipe.parse(r.text, r.options()) == r
    assert Recipe.from_params(_as_params(r.params())) == r


def test_options_round_trip_and_params_form():
    r = Recipe.parse("quarot+gptq+tesseraq+e2e-qp:W4g64",
                     options={"gptq": {"act_order": False}, "tesseraq": {"iterations": 50}})
    assert r.options() == {"gptq": {"act_order": False}, "tesseraq": {"iterations": 50}}
    assert r.params()["calibrate.steps"] == ["quarot", {"gptq": {"act_order": False}}]
    assert r.params()["block_ap.steps"] == [{"tesseraq": {"iterations": 50}}]
    assert Recipe.parse(r.text, r.options()) == r
    assert Recipe.from_params(_as_params(r.params())) == r
    assert [s.kind for s in r.steps] == ["calibrate", "calibrate", "blockwise", "e2e"]


def test_an_options_object_selects_its_method():
    step = Step.parse(GPTQOptions(act_order=False))
    assert step == Step("gptq", {"act_order": False})
    r = Recipe(QuantScheme.parse("W4g64"), calibrate=[GPTQOptions(act_order=False)])
    assert r.text == "gptq:W4g64" and r.options() == {"gptq": {"act_order": False}}


@pytest.mark.parametrize("text,options,error", [
    ("omniquant:W4g64", None, r"step 1: 'omniquant' is not a known method; known: \[.*'rtn'"),
    ("tesseraq:W3g64", None, r"calibrate\.steps: the calibrate stage needs a weight quantizer; "
                             r"accepted: \['awq', 'fp-search', 'gptq', 'rtn'\]"),
    ("rtn+e2e-qp+tesseraq:W4g64", None, r"'tesseraq' is a blockwise step and must come before the e2e steps"),
    ("gptq+fp-search:W4", None, r"calibrate\.steps\[1\]: 'fp-search' after the weight quantizer 'gptq'"),
    ("quarot+awq:W4g64", None, r"calibrate\.steps\[1\]: 'awq' cannot follow 'quarot'"),
    ("rtn+rtn:W4g64", None, r"calibrate\.steps\[1\]: 'rtn' is already step 0; a recipe runs each method once"),
    ("rtn+block-ap+tesseraq:W4g64", None, r"block_ap\.steps: \['block-ap', 'tesseraq'\]: the blockwise "
                                          r"stage runs at most one step"),
    ("quarot:W4A8KV4", None, r"'quarot' is a transform and the last step"),
    ("rtn:W4g64", {"gptq": {"act_order": False}}, r"options given for \['gptq'\], which is not a step"),
    ("rtn:W4x", None, r"'W4x' is not a scheme text; accepted: W<w>\[g<group>\]"),
    ("rtn+block-ap", None, r"has no scheme"),
    ("rtn:W4g64", {"rtn": {"clip": 0.9}}, r"recipe 'rtn:W4g64': unknown key\(s\) \['options\.rtn\.clip'\]; accepted keys under options\.rtn"),
    ("fp-search:W4", None, r"scheme\.weight\.format='int4': calibrate\.steps\[0\]\.fp-search searches FP"),
    ("rtn+tesseraq:W4A8KV4", None, None),  # fine: integer weights
])
def test_bad_recipes_fail_with_one_clear_error(text, options, error):
    if error is None:
        Recipe.parse(text, options)
        return
    with pytest.raises(ConfigError, match=error):
        Recipe.parse(text, options)


def test_a_step_in_the_wrong_stage_names_where_it_belongs():
    with pytest.raises(ConfigError, match=r"calibrate\.steps\[0\]: 'tesseraq' is a blockwise step \(it "
                                          r"belongs in block_ap\.steps\); calibrate\.steps accepts: "):
        check_steps("calibrate", parse_steps(["tesseraq"], "calibrate.steps"), "calibrate.steps")
    with pytest.raises(ConfigError, match=r"e2e\.steps\[0\]: 'awq' is a calibrate step"):
        check_steps("e2e", parse_steps(["awq"], "e2e.steps"), "e2e.steps")
    with pytest.raises(ConfigError, match=r"calibrate\.steps\[1\]=\['gptq'\] is not a step"):
        parse_steps(["rtn", ["gptq"]], "calibrate.steps")
    with pytest.raises(ConfigError, match=r"block_ap\.steps\[0\]\.block-ap\.epochs must be an integer"):
        parse_steps([{"block-ap": {"epochs": "two"}}], "block_ap.steps")


def test_one_registry_one_accessor():
    assert methods.names("calibrate") == ["awq", "fp-search", "gptq", "quarot", "rtn"]
    assert methods.names("blockwise") == ["block-ap", "tesseraq"]
    assert methods.names("e2e") == ["e2e-qp", "kd"]
    assert {"compressed-tensors", "gptq", "half"} <= set(methods.names("export"))
    assert methods.method("gptq").kind == "calibrate"  # a step name: the recipe kinds
    assert methods.method("gptq", "export").kind == "export"  # the format of the same name
    rows = methods.catalogue()
    assert {r["name"] for r in rows} >= {"rtn", "tesseraq", "kd", "half"}
    assert all(r["summary"] for r in rows), [r["name"] for r in rows if not r["summary"]]
    with pytest.raises(ConfigError, match=r"convert\.formats: 'gguff' is not a known format"):
        methods.method("gguff", "export")


def test_discovery_refuses_a_missing_module(monkeypatch):
    monkeypatch.setitem(methods.METHOD_MODULES, "e2e", ("quant.e2e.no_such_method",))
    monkeypatch.setattr(methods, "_discovered", set())
    with pytest.raises(RuntimeError, match=r"METHOD_MODULES\['e2e'\] lists 'quant.e2e.no_such_method'"):
        methods.names("e2e")


def test_scheme_text():
    assert QuantScheme.parse("W4g64") == QuantScheme()  # the default scheme
    s = QuantScheme.parse("W4A8KV4")
    assert s.weight.symmetric and s.weight.group_size == -1 and s.activation.format.bits == 8
    assert QuantScheme.parse("W3").weight.group_size == -1
    fp = QuantScheme.from_dict({"weight": {"format": "fp4-e2m1", "group_size": -1}}, "scheme")
    assert fp.text is None
    with pytest.raises(ConfigError, match="has no text form"):
        _ = Recipe(fp, calibrate=["rtn"]).text


def _as_params(flat: dict) -> dict:
    """{"calibrate.steps": [...], "scheme": {...}} -> nested params."""
    out: dict = {}
    for key, value in flat.items():
        *path, last = key.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return out
