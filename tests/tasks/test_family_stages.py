"""The stages, in process, on families other than Llama: prepare's model directory ->
calibrate -> block_ap -> e2e -> convert -> evaluate, for an MoE family (Qwen3-MoE: per-expert
linears through save/load, AWQ with the router, KD) and Gemma 2 (1 + w norms, post norms,
sliding window; AWQ, TesseraQ, GGUF). Training starts from AWQ's model: its float weights
are the full-precision targets (a GPTQ model's float weights are already on the grid)."""

from __future__ import annotations

import json

import pytest
import torch
from families import make_tiny

from quant.config.scheme import QuantScheme
from tasks.common import BaseParams, ModelParams, Params

TEXT = " ".join(f"Sentence {i} tells of the quick brown fox and the lazy dog in the hills." for i in range(300))
DATA = {"source": "calib", "train_samples": 4, "val_samples": 2, "seq_len": 32}
FLOWS = {
    "qwen3_moe": ({"awq": {"n_grid": 4, "clip_grid": 4, "batch_size": 4, "expert_min_tokens": 16}},
                  {"block-ap": {"epochs": 1, "batch_size": 2}}, {"kd": {}}, ["compressed-tensors", "gptq"]),
    "gemma2": ({"awq": {"n_grid": 4, "clip_grid": 4, "batch_size": 4}}, {"tesseraq": {"thresholds": [0.5], "iterations": 2, "batch_size": 2}},
               {"e2e-qp": {"lr": 1e-3}}, ["compressed-tensors", "gguf"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.mark.parametrize("family", list(FLOWS))
def test_the_stages_on_a_family(family, tmp_path, monkeypatch):
    from quant.load import load_model
    from tasks import block_ap, calibrate, convert, e2e, evaluate
    from tests.quant.export.test_export_gguf import bpe_tokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path / "cache"))
    prepared = tmp_path / "artifacts" / "prepare"
    (prepared / "data" / "eval").mkdir(parents=True)
    (prepared / "data" / "calib.txt").write_text(TEXT)
    (prepared / "data" / "eval" / "lee.txt").write_text(TEXT[:3000])
    make_tiny(family).save_pretrained(prepared / "model")
    bpe_tokenizer().save_pretrained(prepared / "model")
    cal, bw, e2e_step, formats = FLOWS[family]
    sections = {
        "calibrate": {"steps": [cal], "samples": 4, "seq_len": 32},
        "block_ap": {"data": DATA, "steps": [bw]},
        "e2e": {"data": DATA, "train": {"epochs": 1, "batch_size": 2, "max_steps": 2, "save_every": 0},
                "steps": [e2e_step]},
        "convert": {"model": "e2e", "formats": formats},
        "evaluate": {"model": "e2e", "include_base": True, "seq_len": 32, "max_windows": 2, "tasks": [],
                     "report": False, "reuse_scores": False},
    }
    params = Params(BaseParams(device="cpu"), ModelParams(), QuantScheme.parse("W4g32"), sections)
    metrics = calibrate.run(params)
    assert metrics["quantized_linears"] == (2 * (4 + 3 * 4) if family == "qwen3_moe" else 14)
    trained = block_ap.run(params)
    assert trained["blocks"] == 2 and trained["val_mse_init_mean"] > 0
    assert e2e.run(params)["steps"] == 2
    converted = convert.run(params)
    assert all(converted["formats"][f]["max_logit_diff"] == 0 for f in formats if f != "gguf"), converted
    if "gguf" in formats and converted["formats"]["gguf"].get("max_logit_diff") is not None:
        assert converted["formats"]["gguf"]["max_logit_diff"] < 1.0
    scores = evaluate.run(params)
    assert set(scores["ppl"]) == {"lee"} and scores["ppl"]["lee"] > 1
    model, _ = load_model(tmp_path / "artifacts" / "convert" / "model", torch.float16)
    assert json.loads((tmp_path / "artifacts" / "convert" / "model" / "config.json").read_text())[
        "model_type"] == model.config.model_type
