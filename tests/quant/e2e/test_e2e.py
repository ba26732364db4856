"""The block_ap and e2e stages through their run() functions on a tiny Llama with the
embedded tokenizer: outputs, metrics, E2E-QP leaving the integer grid untouched, and
bad params failing before any model is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from quant.calibrate.rtn import quantize_linears
from quant.checkpoint import save_quantized
from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from tasks.common import BaseParams, ModelParams, Params

SCHEME = QuantScheme.from_name("W3A16KV16", preset="efficientqat", group_size=32)
TEXT = " ".join(f"Sentence {i} tells of rivers, hills and the towns between them." for i in range(400))


def _params(**sections) -> Params:
    base = {
        "block_ap": {"data": {"source": "calib", "train_samples": 8, "val_samples": 2, "seq_len": 32},
                     "steps": [{"block-ap": {"epochs": 4, "batch_size": 2, "weight_lr": 1e-3, "qparam_lr": 1e-3}}]},
        "e2e": {"data": {"source": "calib", "train_samples": 8, "val_samples": 2, "seq_len": 32},
                "train": {"epochs": 1, "batch_size": 4, "log_every": 1, "save_every": 1},
                "steps": [{"e2e-qp": {"lr": 1e-3}}]},
    }
    for k, v in sections.items():
        base[k] = {**base[k], **v}
    return Params(BaseParams(device="cpu"), ModelParams(), SCHEME, base)


@pytest.fixture
def stage_dir(tmp_path, monkeypatch, embedded_tokenizer):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "artifacts" / "prepare" / "data"
    data.mkdir(parents=True)
    (data / "calib.txt").write_text(TEXT)
    model = make_tiny_llama(vocab=len(embedded_tokenizer), layers=2)
    quantize_linears(model, SCHEME)
    save_quantized(model, embedded_tokenizer, SCHEME, tmp_path / "artifacts" / "calibrate" / "model")
    return tmp_path


def _qstate(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "qparams.safetensors"))


def test_block_ap_then_e2e_qp_stages(stage_dir):
    from tasks import block_ap, e2e

    params = _params()
    m1 = block_ap.run(params)
    out1 = stage_dir / "artifacts" / "block_ap" / "model"
    meta = json.loads((out1 / "quantization.json").read_text())
    assert meta["frozen"] == meta["layers"] and not (out1 / "float_weights.safetensors").exists()
    assert m1["blocks"] == 2 and m1["blocks_improved"] == 2 and m1["val_mse_mean"] < m1["val_mse_init_mean"]
    assert (stage_dir / "artifacts" / "block_ap" / "block_loss.png").stat().st_size > 0
    assert not (stage_dir / ".state" / "block_ap").exists()  # cleaned once the output exists

    m2 = e2e.run(params)
    out2 = stage_dir / "artifacts" / "e2e" / "model"
    before, after = _qstate(out1), _qstate(out2)
    for k in before:
        if k.endswith((".qweight", ".zero_point")):
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".scale"))
    assert m2["steps"] == 2 and m2["val_loss"] < m2["val_loss_before"]
    assert json.loads((stage_dir / "metrics" / "e2e.json").read_text())["method"] == "e2e-qp"


@pytest.mark.parametrize(("section", "override", "match"), [
    ("block_ap", {"data": {"source": "calib", "train_samples": 8, "val_samples": 500, "seq_len": 32}},
     r"block_ap\.data.*val_samples"),
    ("block_ap", {"steps": [{"block-ap": {"weight_lr": -1.0}}]}, r"block_ap\.steps\[0\]\.block-ap\.weight_lr"),
    ("block_ap", {"steps": ["awq"]}, r"block_ap\.steps\[0\]: 'awq' is a calibrate step"),
    ("e2e", {"steps": [{"e2e-qp": {"lr": 0.0}}]}, r"e2e\.steps\[0\]\.e2e-qp\.lr"),
    ("e2e", {"train": {"max_grad_norm": -1.0}}, r"e2e\.train.*max_grad_norm"),
    ("e2e", {"data": {"source": "synthetic"}}, r"e2e\.data\.source='synthetic'"),
])
def test_bad_params_fail_before_training(stage_dir, monkeypatch, section, override, match):
    from tasks import block_ap, e2e

    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded before the params were checked")

    monkeypatch.setattr(block_ap, "load_quantized", no_model)
    monkeypatch.setattr(e2e, "load_quantized", no_model)
    if section == "e2e":  # its input model must exist for the checks after the params
        (stage_dir / "artifacts" / "block_ap").mkdir(parents=True)
        (stage_dir / "artifacts" / "calibrate" / "model").rename(stage_dir / "artifacts" / "block_ap" / "model")
    stage = block_ap if section == "block_ap" else e2e
    with pytest.raises(ConfigError, match=match):
        stage.run(_params(**{section: override}))
    assert not (stage_dir / "artifacts" / ("block_ap" if section == "block_ap" else "e2e") / "model").exists()
    assert not (stage_dir / "metrics").exists()


def test_diverging_e2e_fails_its_run_and_writes_nothing(stage_dir, monkeypatch, capsys, embedded_tokenizer):
    """A learning rate of 1e30 used to run on with NaN loss, exit 0 and write a model
    with NaN parameters. Now: one-line error naming stage, step and loss; exit 2; run FAILED.
    (`kd`: it trains the unquantized norms and lm_head too, which no step-size clamp bounds.)"""
    import mlflow

    from tasks import common, e2e

    teacher = stage_dir / "artifacts" / "prepare" / "model"
    make_tiny_llama(vocab=len(embedded_tokenizer), layers=2).save_pretrained(teacher)
    embedded_tokenizer.save_pretrained(teacher)
    params = _params(e2e={"model": "calibrate", "steps": [{"kd": {"lr": 1e30}}],
                          "train": {"epochs": 1, "batch_size": 2, "log_every": 1, "save_every": 2}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{stage_dir / 'mlflow.db'}")
    monkeypatch.setenv("QUANT_EXPERIMENT", "test-diverge")
    monkeypatch.delenv("QUANT_PARENT_RUN_ID", raising=False)
    monkeypatch.setattr(common, "load_params", lambda *a, **k: params)
    with pytest.raises(SystemExit) as exited:
        common.main("e2e", e2e.run)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"error: e2e: training diverged at step 2: loss (nan|inf)", err), err[-2000:]
    assert not (stage_dir / "artifacts" / "e2e").exists()
    assert not (stage_dir / "metrics" / "e2e.json").exists()
    assert not list((stage_dir / ".state" / "e2e").glob("step-*"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{stage_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test-diverge").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_stages_without_steps_pass_their_input_on(stage_dir, monkeypatch):
    """A recipe with no block-wise or e2e step (e.g. awq:W4g64): block_ap and e2e hand their
    input model on unchanged, without loading it, and say so in their metrics."""
    from tasks import block_ap, e2e

    def no_model(*_a, **_k):
        raise AssertionError("a stage without steps loaded the model")

    monkeypatch.setattr(block_ap, "load_quantized", no_model)
    monkeypatch.setattr(e2e, "load_quantized", no_model)
    params = _params(block_ap={"steps": []}, e2e={"steps": []})
    assert block_ap.run(params)["passed_through"] == "calibrate"
    assert e2e.run(params)["passed_through"] == "block_ap"
    src = stage_dir / "artifacts" / "calibrate" / "model"
    for out in ("block_ap", "e2e"):
        dst = stage_dir / "artifacts" / out / "model"
        assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())
        assert all((dst / p.name).read_bytes() == p.read_bytes() for p in src.iterdir() if p.is_file())
    assert (stage_dir / "artifacts" / "block_ap" / "block_loss.png").stat().st_size > 0
