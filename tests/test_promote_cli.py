"""`python -m tasks.register promote` (what `make promote` runs): exit codes and messages a
script can act on, against a sqlite registry in a temporary directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from tasks.register import Candidate

ROOT = Path(__file__).resolve().parent.parent


def _promote(cwd: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT),
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    return subprocess.run([sys.executable, "-m", "tasks.register", "promote", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_promote_exit_codes_missing_version_refusal_and_success(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["register"]["name"] = "m"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    r = _promote(tmp_path, uri, "--version", "1")
    assert r.returncode == 2 and "no registered model 'm'" in r.stderr, r.stderr

    client = MlflowClient(uri)
    client.create_registered_model("m")
    good = Candidate("", "ppl/embedded-wiki", 20.0, 1.1, "lee", 0.0, "f")
    bad = Candidate("", "ppl/embedded-wiki", 30.0, 1.9, "lee", 0.0, "f")
    for c in (good, bad):
        client.create_model_version("m", "file:///nonexistent/model", tags=c.tags())

    r = _promote(tmp_path, uri, "--version", "99")
    assert r.returncode == 2 and "m has no version 99 (versions: 1, 2)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _promote(tmp_path, uri, "--version", "1")
    assert r.returncode == 0 and "m v1 promoted to @champion" in r.stdout, r.stdout + r.stderr
    r = _promote(tmp_path, uri, "--version", "2")
    assert r.returncode == 3 and "m v2 not promoted; @champion stays v1" in r.stdout, r.stdout + r.stderr
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
