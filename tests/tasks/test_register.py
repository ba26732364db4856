"""Registration gates and promotion (tasks/register.py): gate arithmetic, config errors, and
promote() against a real MLflow registry (a sqlite store in a temporary directory)."""

from __future__ import annotations

import pytest

from quant.config import ConfigError
from tasks.register import Candidate, RegisterConfig, candidate_from_metrics, check_gates, promote

EVAL = {
    "ppl": {"embedded-wiki": 24.0, "lee": 33.0},
    "base_ppl": {"embedded-wiki": 20.0, "lee": 25.0},
    "acc_avg": 0.50,
    "base_acc_avg": 0.51,
    "tokens": {"embedded-wiki": 100, "lee": 100},
}


def cfg(**gates) -> RegisterConfig:
    return RegisterConfig.from_dict({"name": "m", "gates": gates}, "register")


def cand(version="1", value=24.0, ratio=1.2, acc_drop=0.01, fp="f") -> Candidate:
    return Candidate(version, "ppl/embedded-wiki", value, ratio, "lee", acc_drop, fp)


def by_gate(results):
    return {r.gate: r for r in results}


def test_candidate_from_metrics_takes_the_worst_text_and_the_accuracy_drop():
    c = candidate_from_metrics(EVAL, RegisterConfig(), "fp")
    assert c.primary_value == 24.0
    assert c.ppl_ratio == pytest.approx(33.0 / 25.0) and c.ppl_ratio_text == "lee"
    assert c.acc_drop == pytest.approx(0.01)
    no_base = {k: v for k, v in EVAL.items() if not k.startswith("base")}
    c = candidate_from_metrics(no_base, RegisterConfig(), "fp")
    assert c.ppl_ratio is None and c.acc_drop is None
    # round trip through version tags (how promotion reads a version)
    assert Candidate.from_tags("1", cand().tags()) == cand()
    assert Candidate.from_tags("1", cand(acc_drop=None).tags()).acc_drop is None


def test_unknown_primary_metric_names_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"register\.primary_metric='ppl/wikitext2'.*ppl/lee"):
        candidate_from_metrics(EVAL, RegisterConfig(primary_metric="ppl/wikitext2"), "fp")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"register\.gates\.max_ppl_ratio=0\.9"):
        RegisterConfig.from_dict({"gates": {"max_ppl_ratio": 0.9}}, "register")
    with pytest.raises(ConfigError, match=r"register\.gates\.typo"):
        RegisterConfig.from_dict({"gates": {"typo": 1}}, "register")
    with pytest.raises(ConfigError, match=r"register\.primary_goal='lowest'"):
        RegisterConfig.from_dict({"primary_goal": "lowest"}, "register")
    with pytest.raises(ConfigError, match=r"register\.name='a/b'"):
        RegisterConfig.from_dict({"name": "a/b"}, "register")


def test_gates_pass_fail_and_skip_with_numbers():
    r = by_gate(check_gates(cand(ratio=1.2, acc_drop=0.01), None, cfg(max_ppl_ratio=1.5, max_acc_drop=0.02)))
    assert r["ppl_ratio"].passed and "1.2000 (lee) <= 1.5" in r["ppl_ratio"].detail
    assert r["acc_drop"].passed and r["champion"].passed and "no current @champion" in r["champion"].detail

    r = by_gate(check_gates(cand(ratio=3.1, acc_drop=0.04), None, cfg(max_ppl_ratio=1.5, max_acc_drop=0.02)))
    assert r["ppl_ratio"].passed is False and "3.1000 (lee) > 1.5" in r["ppl_ratio"].detail
    assert r["acc_drop"].passed is False and "0.0400 > 0.02" in r["acc_drop"].detail

    # accuracies missing: that gate is skipped (said so); PPL ratio missing: that gate fails
    r = by_gate(check_gates(cand(ratio=None, acc_drop=None), None, cfg()))
    assert r["acc_drop"].passed is None and "no accuracies" in r["acc_drop"].detail
    assert r["ppl_ratio"].passed is False and "include_base" in r["ppl_ratio"].detail

    r = by_gate(check_gates(cand(ratio=9.0), None, cfg(max_ppl_ratio=None, beat_champion=False)))
    assert r["ppl_ratio"].passed is None and r["champion"].passed is None


def test_champion_gate_compares_like_with_like():
    c = cfg()
    champ = cand(version="1", value=24.0)
    assert by_gate(check_gates(cand("2", value=23.5), champ, c))["champion"].passed
    worse = by_gate(check_gates(cand("2", value=24.0), champ, c))["champion"]
    assert worse.passed is False and "not better than @champion v1" in worse.detail
    other = by_gate(check_gates(cand("2", value=10.0, fp="g"), champ, c))["champion"]
    assert other.passed is False and "not comparable" in other.detail
    maxc = RegisterConfig.from_dict({"primary_goal": "max", "primary_metric": "acc_avg"}, "register")
    hi = Candidate("2", "acc_avg", 0.6, 1.0, "lee", 0.0, "f")
    lo = Candidate("1", "acc_avg", 0.5, 1.0, "lee", 0.0, "f")
    assert by_gate(check_gates(hi, lo, maxc))["champion"].passed
    assert by_gate(check_gates(lo, hi, maxc))["champion"].passed is False


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    return client


def add_version(client, c: Candidate) -> str:
    return client.create_model_version("m", "file:///nonexistent/model", tags=c.tags()).version


def test_promote_sets_the_alias_only_when_gates_pass(registry):
    config = cfg(max_ppl_ratio=1.5)
    v1 = add_version(registry, cand(value=24.0, ratio=1.2))
    d = promote(config, v1, registry)
    assert d["promoted"] and registry.get_model_version_by_alias("m", "champion").version == v1
    assert registry.get_model_version("m", v1).tags["promotion"] == "promoted"

    v2 = add_version(registry, cand(value=30.0, ratio=1.6))  # worse and over the ratio gate
    d = promote(config, v2, registry)
    assert not d["promoted"] and d["failed_gates"] == ["ppl_ratio", "champion"]
    assert "@champion stays v1" in d["message"] and "1.6000 (lee) > 1.5" in d["message"]
    assert registry.get_model_version_by_alias("m", "champion").version == v1
    assert registry.get_model_version("m", v2).tags["promotion"].startswith("refused: ppl_ratio")

    v3 = add_version(registry, cand(value=23.0, ratio=1.1))
    assert promote(config, v3, registry)["promoted"]
    assert registry.get_model_version_by_alias("m", "champion").version == v3
    again = promote(config, v3, registry)
    assert not again["promoted"] and "already @champion" in again["message"]


def test_register_refuses_non_finite_metrics_or_weights(tmp_path):
    """Whatever produced them, NaN/inf metrics or weights never reach the registry."""
    import math

    import torch
    from safetensors.torch import save_file

    from quant.config import ConfigError
    from tasks.register import check_finite

    good = {"ppl": {"lee": 30.0}, "base_ppl": {"lee": 26.0}}
    save_file({"w": torch.ones(3), "q": torch.zeros(2, dtype=torch.int32)}, str(tmp_path / "model.safetensors"))
    check_finite(good, tmp_path)  # passes
    with pytest.raises(ConfigError, match=r"non-finite values \['ppl/lee'\]"):
        check_finite({"ppl": {"lee": math.nan}}, tmp_path)
    save_file({"scale": torch.tensor([1.0, float("inf")])}, str(tmp_path / "qparams.safetensors"))
    with pytest.raises(ConfigError, match=r"qparams.safetensors tensor 'scale' holds NaN/inf"):
        check_finite(good, tmp_path)


def test_register_logs_every_converted_format_with_its_model_card(tmp_path, monkeypatch):
    """The version says which formats it has (tag `formats`), the run carries each other format
    (`formats/<fmt>/`) and each format's card rendered with evaluate's numbers."""
    import mlflow

    from tasks import convert
    from tasks.packed_model import footprint_tags, log_formats
    from tests.quant.export.test_export import _stage_params

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    convert.run(_stage_params(tmp_path, monkeypatch, {"model": "e2e", "formats": ["compressed-tensors", "gptq"]}))
    model_dir = tmp_path / "artifacts/convert/model"
    tags = footprint_tags(model_dir)
    assert tags["format"] == "compressed-tensors" and tags["formats"] == "compressed-tensors,gptq"
    assert 0 < float(tags["size_vs_fp16"]) < 1
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", (tmp_path / "art").as_uri()))
    with mlflow.start_run() as run:
        formats = log_formats(model_dir, EVAL)
    assert formats == ["compressed-tensors", "gptq"]
    root = tmp_path / "art" / run.info.run_id / "artifacts"
    assert (root / "formats/gptq/model.safetensors").is_file() and (root / "formats/manifest.json").is_file()
    assert not (root / "formats/compressed-tensors").exists()  # the registered model itself is the pyfunc
    for fmt in formats:
        card = (root / f"model_card/{fmt}/README.md").read_text()
        assert "| perplexity, lee | 33.0000 |" in card and "| full-precision perplexity, lee | 25.0000 |" in card
        assert "| average zero-shot accuracy | 0.5000 |" in card and "not measured" not in card
    assert "on the compressed-tensors export of the same integer weights" in (root / "model_card/gptq/README.md").read_text()
    assert log_formats(tmp_path / "elsewhere", EVAL) == []  # not the convert stage's model: nothing to add


def test_methods_tag_names_each_stage_s_steps_up_to_the_registered_stage():
    """The version's `methods` tag comes from the stages' `steps` (it was empty once the
    sections had no `method` key)."""
    from tasks.common import BaseParams, ModelParams, Params
    from tasks.register import methods

    params = Params(BaseParams(), ModelParams(), None, {
        "prepare": {}, "calibrate": {"steps": ["quarot", {"gptq": {"act_order": False}}]},
        "block_ap": {"steps": [{"tesseraq": {"iterations": 50}}]}, "e2e": {"steps": []},
        "convert": {"formats": ["compressed-tensors"]}})
    assert methods(params, "block_ap") == "calibrate=quarot+gptq,block_ap=tesseraq"
    assert methods(params, "convert") == "calibrate=quarot+gptq,block_ap=tesseraq"
    assert methods(params, "calibrate") == "calibrate=quarot+gptq"
