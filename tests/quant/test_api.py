"""The Python API runs the stages' code: `quant.quantize` in memory and `dvc repro e2e` on the
same tiny model, recipe, texts and seeds give the same integer weights, step sizes and zero
points, bit for bit (CPU). Also: the API's own inputs are checked before any work."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quant
from conftest import make_tiny_llama
from quant.config import ConfigError
from tests.tasks.test_stages import BIN, _copy_repo, _env, _set_params

RECIPE = "gptq+block-ap+e2e-qp:W3g32"
OPTIONS = {"gptq": {"batch_size": 2}, "block-ap": {"epochs": 1, "batch_size": 2},
           "e2e-qp": {"lr": 1e-3}}
TRAIN = {"source": "calib", "train_samples": 4, "val_samples": 2, "seq_len": 32}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer):
    out = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_llama(vocab=len(embedded_tokenizer), layers=2, hidden=64, intermediate=128).save_pretrained(out)
    embedded_tokenizer.save_pretrained(out)
    return out


def test_api_equals_dvc_repro(tmp_path, tiny_model_dir):
    recipe = quant.Recipe.parse(RECIPE, OPTIONS)
    repo = _copy_repo(tmp_path / "repo")
    _set_params(repo, {
        "model.name_or_path": str(tiny_model_dir), "base.threads": 2,
        "synthesize.num_start_ids": 2, "synthesize.prefix_lengths": [3], "synthesize.seq_len": 8,
        "calibrate.samples": 4, "calibrate.seq_len": 32,
        "block_ap.data": TRAIN, "e2e.data": TRAIN,
        "e2e.train.batch_size": 2, "e2e.train.max_steps": 2,
        **{k: v for k, v in recipe.params().items()},
    })
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    r = subprocess.run([str(BIN / "dvc"), "repro", "e2e"], cwd=repo, env=_env(repo),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    staged = load_file(str(repo / "artifacts" / "e2e" / "model" / "qparams.safetensors"))

    prepared = repo / "artifacts" / "prepare"
    model, tok = quant.load_model(prepared / "model")
    text = (prepared / "data" / "calib.txt").read_text()
    model, report = quant.quantize(
        model, recipe, tokenizer=tok, calib_text=text, calib_samples=4, calib_seq_len=32,
        train_text=text, train_samples=4, val_samples=2, seq_len=32,
        train=quant.TrainConfig(batch_size=2, max_steps=2), seed=0)
    assert report.calibrate["quantized_linears"] == 14 and report.e2e.steps == 2
    quant.save(model, tok, recipe.model_scheme, tmp_path / "api")
    api = load_file(str(tmp_path / "api" / "qparams.safetensors"))
    assert api.keys() == staged.keys()
    diff = [k for k in api if not torch.equal(api[k], staged[k])]
    assert not diff, f"API and stages differ in {diff[:5]}"


def test_api_checks_its_inputs_before_any_work(tiny_model_dir):
    model, tok = quant.load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"needs calibration data: calib_ids= or calib_text="):
        quant.quantize(model, "awq:W4g64")
    with pytest.raises(ConfigError, match=r"trains: give train_ids= .* or train_text="):
        quant.quantize(model, "rtn+block-ap:W4g64")
    with pytest.raises(ConfigError, match=r"'tesseraq' is a blockwise step and must come before"):
        quant.quantize(model, "rtn+e2e-qp+tesseraq:W4g64")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_api_round_trip_through_an_export(tiny_model_dir, tmp_path):
    """quantize -> export_model -> load_model: the packed model computes what the fake-quant
    model computes (the public calls only)."""
    model, tok = quant.load_model(tiny_model_dir)
    model, report = quant.quantize(model, "rtn:W4g32")
    ids = torch.arange(12).reshape(1, -1)
    quant.export_model(model, tok, report.recipe.model_scheme, "compressed-tensors", tmp_path / "ct")
    with torch.no_grad():
        want = model(ids).logits.float()  # after export_model's half conversion
    packed, _ = quant.load_model(tmp_path / "ct", torch.float16)
    with torch.no_grad():
        got = packed(ids).logits.float()
    assert (got - want).abs().max() < 1e-2
    assert Path(tmp_path / "ct" / "config.json").is_file()
