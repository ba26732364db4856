"""`python -m tasks.register promote` (what `make promote` runs): exit codes and messages a
script can act on, against a sqlite registry in a temporary directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from tasks.register import Candidate

ROOT = Path(__file__).resolve().parents[2]


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


def test_promote_says_its_registry_and_refuses_a_version_of_another(tmp_path):
    """metrics/register.json names the store its version was registered in: v1 of the local
    sqlite store is not v1 of the server, so promotion refuses to act on a version number
    from another registry, and always says which registry it acts on."""
    import json

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["register"]["name"] = "m"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("m")
    client.create_model_version("m", "file:///nonexistent/model",
                                tags=Candidate("", "ppl/embedded-wiki", 20.0, 1.1, "lee", 0.0, "f").tags())
    (tmp_path / "metrics").mkdir()
    version_file = tmp_path / "metrics" / "register.json"

    version_file.write_text(json.dumps({"name": "m", "version": 1, "store": "http://127.0.0.1:5000"}))
    r = _promote(tmp_path, uri)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"registry: {uri}" in r.stdout
    assert (f"metrics/register.json holds v1 of the registry at http://127.0.0.1:5000, but this promotion acts "
            f"on {uri}") in r.stderr and "make servers-up" in r.stderr
    assert client.get_registered_model("m").aliases == {}  # nothing promoted anywhere

    version_file.write_text(json.dumps({"name": "m", "version": 1}))  # written before stores were recorded
    r = _promote(tmp_path, uri)
    assert r.returncode == 2 and "does not say which registry" in r.stderr, r.stderr

    version_file.write_text(json.dumps({"name": "m", "version": 1, "store": uri}))
    r = _promote(tmp_path, uri, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    decision = json.loads(r.stdout.strip().splitlines()[-1])
    assert decision["store"] == uri and decision["promoted"] and f"registry: {uri}" in r.stderr
