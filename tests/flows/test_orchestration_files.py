"""The orchestration files agree with the code: prefect.yaml with the flow, requirements.lock
with pyproject.toml, the DVC default remote, the servers script's input checks."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_deployments_match_the_flows():
    from flows.pipeline import FLOW_NAME, SHARD_DEPLOYMENT, pipeline
    from flows.shard import run_shard
    from flows.sweep import FLOW_NAME as SWEEP_NAME
    from flows.sweep import sweep

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"embedded-default", "sweep", "shard"}
    assert f"{run_shard.name}/shard" == SHARD_DEPLOYMENT
    for dep, fl, flow_name, pool in ((deps["embedded-default"], pipeline, FLOW_NAME, "quant-process"),
                                     (deps["sweep"], sweep, SWEEP_NAME, "quant-process"),
                                     (deps["shard"], run_shard, run_shard.name, "quant-shards")):
        path, name = dep["entrypoint"].split(":")
        assert (ROOT / path).is_file() and name == fl.fn.__name__ and fl.name == flow_name
        assert set(dep.get("parameters", {})) <= set(inspect.signature(fl.fn).parameters)
        assert dep["work_pool"]["name"] == pool
        assert "pull" not in dep  # the deployment runs where `prefect deploy` ran
    assert "pull" not in spec
    # the shard pool is the one scripts/servers.py creates and starts shard workers on
    servers = (ROOT / "scripts" / "servers.py").read_text()
    assert 'DEFAULT_SHARD_POOL = "quant-shards"' in servers
    assert "concurrency_limit" not in deps["shard"]  # the workers' slots decide
    # heartbeats show in the UI (crashes are the crash watcher's); the optional schedule is off
    for d in spec["deployments"]:
        assert d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", d["name"]
    assert [s["active"] for s in deps["embedded-default"].get("schedules", [])] == [False]


def test_crashes_are_decided_by_the_watcher_not_by_a_heartbeat_timeout(tmp_path, monkeypatch):
    """`servers.py up` starts the crash watcher and installs no automation that sets a run
    Crashed when heartbeats are late (it deletes the one that did); every flow run started
    with the servers' environment, in-process or by a worker, keeps its lease where the
    watcher reads it."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("servers", ROOT / "scripts" / "servers.py")
    servers = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "servers", servers)  # dataclasses look their module up
    spec.loader.exec_module(servers)
    monkeypatch.setenv("QUANT_STATE_DIR", str(tmp_path))
    s = servers.Settings.from_env()
    watch = {svc.name: svc for svc in servers.services(s)}["crash-watch"]
    assert watch.argv[1:3] == ["-m", "flows.watch"] and str(tmp_path / "crash-watch.json") in watch.argv
    assert not watch.healthy(0.0)  # no pass yet
    (tmp_path / "crash-watch.json").write_text(json.dumps({"checked": 100.0, "error": None}))
    assert watch.healthy(50.0) and not watch.healthy(150.0)
    env = s.client_env()
    assert env["QUANT_LEASE_DIR"] == str(tmp_path / "leases") and env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert "quant-pipeline: crash zombie flow runs" in servers.RETIRED_AUTOMATIONS
    assert not hasattr(servers, "AUTOMATIONS") and not list((ROOT / "flows" / "automations").glob("*.json"))


def test_make_prints_the_command_s_exit_code_and_its_meaning(tmp_path):
    """GNU make exits 2 for any failed recipe; the Makefile's targets print the command's own
    code (a gate refusal: 3) so that it can still be told apart."""
    text = (ROOT / "Makefile").read_text()
    exit_code = re.search(r"^EXIT_CODE = (.*)$", text, re.M).group(1)
    for target in ("promote", "flow-run"):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
        assert recipe.rstrip().endswith("|| $(EXIT_CODE)"), target
    (tmp_path / "Makefile").write_text(f"SHELL := /bin/bash\nEXIT_CODE = {exit_code}\n"
                                       "t:\n\t@bash -c 'exit $(RC)' || $(EXIT_CODE)\n")
    for rc, meaning in ((3, "exit 3: refused by a gate"), (2, "exit 2: bad params"), (1, "exit 1: failed")):
        r = subprocess.run(["make", "-s", "t", f"RC={rc}"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 2 and meaning in r.stderr, r.stderr


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock line {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_lock_pins_every_dependency_within_its_specifier():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assets = re.search(r"^ASSETS := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    pins = _lock()
    for text in [*project["dependencies"], *assets]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is missing from requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside {req.specifier}: run `make lock`")


def test_dvc_default_remote_is_local_and_git_ignored():
    out = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    name, url, *rest = out.split()
    assert name == "local" and "(default)" in rest and Path(url) == ROOT / ".state" / "dvc-remote"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".state/dvc-remote"], cwd=ROOT)
    assert ignored.returncode == 0


def test_servers_script_rejects_a_bad_port_naming_the_variable(tmp_path):
    env = {**os.environ, "QUANT_STATE_DIR": str(tmp_path), "QUANT_MLFLOW_PORT": "50x0"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "servers.py"), "up"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "$QUANT_MLFLOW_PORT='50x0' must be a TCP port" in r.stderr
    assert not (tmp_path / "pids").exists()  # nothing was started


def test_servers_script_rejects_a_bad_shard_worker_naming_the_flag(tmp_path):
    env = {**os.environ, "QUANT_STATE_DIR": str(tmp_path)}
    for args, message in ((["--name", "a b"], "--name 'a b' must be letters, digits"),
                          (["--gpus", "0,x"], "--gpus '0,x' must be GPU indices"),
                          (["--limit", "0"], "--limit 0 must be >= 1")):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "servers.py"), "shard-worker", *args], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 1 and message in r.stderr, r.stderr
    # a good one without servers: says to start them first
    env["QUANT_PREFECT_PORT"] = "1"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "servers.py"), "shard-worker", "--gpus", "1"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "the Prefect server is not up at http://127.0.0.1:1/api" in r.stderr, r.stderr
    assert "make servers-up" in r.stderr and not (tmp_path / "pids").exists()
