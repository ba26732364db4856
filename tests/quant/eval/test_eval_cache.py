"""evaluate reuses a model's scores only when nothing they depend on changed."""

from __future__ import annotations

import dataclasses

import pytest

from tasks import evaluate
from tasks.evaluate import EvaluateConfig


@pytest.fixture
def scoring(tmp_path, monkeypatch):
    """A model directory, the cache in tmp_path, and a fake scorer that counts its calls."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights-v1")
    (model / "config.json").write_text("{}")
    monkeypatch.setenv(evaluate.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def fake(model_dir, texts, cfg, device, dtype, work_dir):
        calls.append(cfg)
        return {"ppl": {t: {"ppl": 10.0 + len(calls), "tokens": 5} for t in texts}, "ppl_seconds": 1.0,
                "tasks": {}, "footprint": {"size_gb": 0.1, "bits_per_weight": 16.0}}

    monkeypatch.setattr(evaluate, "evaluate_model", fake)
    return model, calls


def test_scores_reused_for_identical_inputs_and_recomputed_when_any_changes(scoring, tmp_path):
    model, calls = scoring
    texts = {"wiki": "some text"}
    cfg = EvaluateConfig(tasks=(), compare=())

    def score(cfg=cfg, texts=texts, device="cpu"):
        return evaluate.scored_model(model, texts, cfg, device, "torch.float32", tmp_path / "w")

    first = score()
    assert len(calls) == 1 and "reused" not in first
    again = score()
    assert len(calls) == 1 and again["reused"] and again["ppl"] == first["ppl"]
    # settings that do not change a number (which models, the report) keep the scores
    score(dataclasses.replace(cfg, report=False, model="e2e", compare=("calibrate",)))
    assert len(calls) == 1
    # anything that changes a number recomputes: a setting, the texts, the device, the weights
    score(dataclasses.replace(cfg, max_windows=2))
    score(texts={"wiki": "other text"})
    score(device="cuda:0")
    assert len(calls) == 4
    (model / "model.safetensors").write_bytes(b"weights-v2")
    assert "reused" not in score() and len(calls) == 5
    # off: always computed
    score(dataclasses.replace(cfg, reuse_scores=False))
    assert len(calls) == 6
