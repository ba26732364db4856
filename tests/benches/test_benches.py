"""The benches stay a working part of the project: every bench module imports (library API drift
breaks here, not on a GPU machine hours later), each is runnable as `python -m benches.<group>.<name>`
with a `main(argv)`, and the cheapest smoke runs go end to end and write their result JSON."""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest
import torch

import benches

HELPERS = {"benches.common"}
BENCHES = sorted(m.name for m in pkgutil.walk_packages(benches.__path__, "benches.")
                 if not m.ispkg and m.name not in HELPERS)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_the_benches_are_grouped_and_found():
    groups = {name.split(".")[1] for name in BENCHES}
    assert groups == {"quality", "speed", "scale"}
    assert "benches.quality.recipes" in BENCHES and len(BENCHES) >= 15


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_imports_and_has_a_main(name):
    module = importlib.import_module(name)
    assert callable(getattr(module, "main", None)), f"{name} has no main(argv)"
    assert module.__doc__ and "python -m " + name in module.__doc__, f"{name}'s docstring shows no command"


def test_shapes_are_transformers_configs():
    from benches import common

    cfg = common.model_config("llama-2-7b")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (4096, 11008, 32, 32000)
    with pytest.raises(SystemExit, match="not known"):
        common.model_config("llama-9b")


def test_gpu_only_bench_says_how_to_run_on_cpu(monkeypatch):
    from benches.speed import block_ap

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU; --small"):
        block_ap.main([])


def _result(path):
    data = json.loads(path.read_text())
    assert {"command", "device", "git_commit", "date", "torch"} <= set(data["run"])
    assert data["settings"]["small"] is True
    return data


def test_block_mse_smoke_run(tmp_path, one_thread):
    from benches.quality import block_mse

    out = tmp_path / "block_mse.json"
    block_mse.main(["--small", "--out", str(out)])
    mse = _result(out)["held_out_block_mse"]
    assert set(mse) == {"rtn", "tesseraq", "block-ap"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in mse.values())


def test_quarot_weight_error_smoke_run(tmp_path, one_thread):
    from benches.quality import quarot_weight_error

    out = tmp_path / "quarot_weight_error.json"
    quarot_weight_error.main(["--small", "--scheme", "W4A8KV4", "--ablation", "--out", str(out)])
    data = _result(out)
    assert set(data["ppl_heldout_calib"]) == {"fp", "rtn", "quarot_rtn_fuse", "quarot_rtn_online",
                                              "rtn_of_fused_weights", "quarot_rtn_fuse_massive_error_removed"}
    q = data["mean_by_kind"]["q_proj"]
    assert set(q) == {"original", "fused", "quarot_fuse", "quarot_online"}
    assert all(0 < v["rel_out_err"] < 1 and 0 <= v["share_through_massive"] <= 1 for v in q.values())


def test_quarot_timing_smoke_run(tmp_path, one_thread):
    from benches.speed import quarot

    out = tmp_path / "quarot.json"
    quarot.main(["--small", "--out", str(out)])
    data = _result(out)
    assert set(data["runs"]) == {"1", "2"} and data["runs"]["2"]["quarot_s"] > 0
    assert len(data["online"]) == 2


def test_architectures_smoke_run(tmp_path, one_thread):
    from benches.speed import architectures

    out = tmp_path / "architectures.json"
    architectures.main(["--small", "--out", str(out)])
    blocks = _result(out)["blocks"]
    assert set(blocks) == {"qwen3-small", "qwen3-moe-small"}
    for methods in blocks.values():
        assert set(methods) == {"block-ap", "tesseraq"}
        assert all(r["engine_seconds"] > 0 and r["paper_scale_seconds"] > 0 for r in methods.values())
    assert "experts_without_tokens" in blocks["qwen3-moe-small"]["block-ap"]
    # q 128x128, k/v 128x64, o 128x128, gate/up 128x256, down 256x128: the block's quantized weights
    assert blocks["qwen3-small"]["block-ap"]["linear_weights"] == 147456
