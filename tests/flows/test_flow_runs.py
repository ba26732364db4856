"""The pipeline flow on small DVC projects built here, against a temporary Prefect API
(prefect_test_harness) and a sqlite MLflow store: what a run decides about crashes, what it
reports, where its overrides end up, which registry its version is in.

- Crash detection: a live run whose lease is never refreshed and which sends no heartbeat
  at all completes, with a crash watcher checking it all along; a run whose process is
  gone is set Crashed and its MLflow runs FAILED; a run set Crashed by mistake (its process
  runs) keeps its MLflow runs.
- Reporting: a run with overrides and targets reports only its own stages' metrics, not
  those other stages left in the checkout under other params.
- Experiments: that run is a DVC experiment of the checkout's git repository, listed by
  `dvc exp list` and brought into the workspace by `dvc exp apply`.
- Registry: a `register` stage that DVC finds up to date runs again when its version file
  names another tracking store than the run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def env(tmp_path, monkeypatch):
    """This test's MLflow store and lease directory; no Prefect heartbeats at all."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("QUANT_LEASE_DIR", str(tmp_path / "leases"))
    monkeypatch.setenv("QUANT_EXPERIMENT", "flow-runs")
    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    monkeypatch.delenv("QUANT_PARENT_RUN_ID", raising=False)
    return tmp_path


def _project(root: Path, dvc_yaml: str, params: str, files: dict[str, str], git: bool = False) -> Path:
    root.mkdir(parents=True)
    if git:
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", *([] if git else ["--no-scm"])], cwd=root,
                   check=True)
    (root / "dvc.yaml").write_text(textwrap.dedent(dvc_yaml))
    (root / "params.yaml").write_text(textwrap.dedent(params))
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    if git:
        subprocess.run(["git", "add", "-A"], cwd=root, check=True)
        subprocess.run([*GIT, "commit", "-qm", "project"], cwd=root, check=True)
    return root


# ---------------------------------------------------------------------------
# Crash detection: the process's liveness, not the heartbeats' punctuality


def test_a_slow_run_completes_under_the_watcher_and_a_dead_one_is_crashed(harness, env, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    from flows import liveness, reaper, watch
    from flows.pipeline import pipeline

    proj = _project(env / "slow", """\
        stages:
          slow:
            cmd: python -c "import time; time.sleep(4); open('slow.txt', 'w').write('done')"
            outs: [slow.txt]
        """, "a: 1\n", {})
    monkeypatch.chdir(proj)
    # the lease is written once and then not for an hour (later than any heartbeat), and a
    # lease elsewhere would count as dead after half a second: only the process decides
    monkeypatch.setattr(liveness, "LEASE_SECONDS", 3600.0)
    monkeypatch.setattr(liveness, "BASE_WINDOW", 0.5)
    leases = env / "leases"
    seen, stop = [], threading.Event()

    def watcher():
        with get_client(sync_client=True) as client:
            while not stop.is_set():
                seen.extend(watch.check_runs(client, leases, root=proj))
                stop.wait(0.3)

    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    try:
        state = pipeline(promote=False, retries=0, return_state=True)
    finally:
        stop.set()
        t.join(timeout=30)
    assert state.is_completed(), state.message
    run_id = str(state.state_details.flow_run_id)
    mine = [d for d in seen if d.flow_run_id == run_id]
    assert mine, "the watcher never saw the run Running"
    assert all(d.verdict.alive and not d.crashed for d in mine), mine
    assert not any(d.crashed for d in seen)
    summary = state.result()
    assert MlflowClient().get_run(summary["mlflow_parent_run_id"]).info.status == "FINISHED"
    assert liveness.read_lease(run_id, leases).ended

    # a run whose process is gone: Crashed, with its MLflow runs FAILED
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    start = liveness.process_start(gone.pid)
    gone.wait()
    mlflow = MlflowClient()
    exp = mlflow.get_experiment_by_name("flow-runs").experiment_id
    with get_client(sync_client=True) as client:
        dead = client.create_flow_run(pipeline, state=Running())
        live = client.create_flow_run(pipeline, state=Running())
        runs = {}
        for fr, pid, pid_start in ((dead, gone.pid, start), (live, os.getpid(), liveness.process_start(os.getpid()))):
            rec = liveness.LeaseRecord(str(fr.id), liveness.socket.gethostname(), pid, pid_start, 0.0, 0.0, 10.0)
            leases.mkdir(exist_ok=True)
            (leases / f"{fr.id}.json").write_text(json.dumps(rec.__dict__))
            parent = mlflow.create_run(exp, tags={"stage": "pipeline", "prefect.flow_run_id": str(fr.id)})
            stage = mlflow.create_run(exp, tags={"stage": "calibrate", "mlflow.parentRunId": parent.info.run_id})
            runs[fr.id] = [parent.info.run_id, stage.info.run_id]
        decisions = {d.flow_run_id: d for d in watch.check_runs(client, leases, root=proj)}
        assert decisions[str(dead.id)].crashed and not decisions[str(live.id)].crashed
        crashed = client.read_flow_run(dead.id).state
        assert crashed.is_crashed() and f"process {gone.pid}" in crashed.message and "is gone" in crashed.message
        assert client.read_flow_run(live.id).state.is_running()
        # someone else sets the live run Crashed: its MLflow runs are left to it
        client.set_flow_run_state(live.id, Crashed(message="no heartbeat for 90 s"), force=True)
        assert reaper.reap_crashed(proj) == []
    assert [mlflow.get_run(r).info.status for r in runs[dead.id]] == ["FAILED", "FAILED"]
    assert [mlflow.get_run(r).info.status for r in runs[live.id]] == ["RUNNING", "RUNNING"]
    assert "is gone" in mlflow.get_run(runs[dead.id][1]).data.tags["error"]


def test_the_verdict_on_another_host_waits_longer_for_a_lease_that_was_late_before():
    from flows import liveness

    rec = liveness.LeaseRecord("x", "other-host", 1, "", touched=1000.0, max_gap=0.0, interval=10.0)
    assert liveness.judge(rec, now=1000.0 + liveness.BASE_WINDOW - 1).alive
    assert liveness.judge(rec, now=1000.0 + liveness.BASE_WINDOW + 1).alive is False
    late = liveness.LeaseRecord("x", "other-host", 1, "", touched=1000.0, max_gap=200.0, interval=10.0)
    assert liveness.judge(late, now=1000.0 + 700).alive  # 4 x its worst gap: 800 s
    assert liveness.judge(late, now=1000.0 + 900).alive is False
    assert liveness.judge(None).alive is None


# ---------------------------------------------------------------------------
# What a run reports, where its overrides go, which registry its version is in

STAGES_DVC = """\
    stages:
      a:
        cmd: python stage.py a
        deps: [stage.py]
        params: [a]
        outs: [out/a.txt]
        metrics: [metrics/a.json]
      b:
        cmd: python stage.py b
        deps: [stage.py, out/a.txt]
        params: [b]
        outs: [out/b.txt]
        metrics: [metrics/b.json]
      register:
        cmd: python stage.py register
        deps: [stage.py, out/b.txt]
        metrics: [metrics/register.json]
"""
STAGE_PY = """\
    import json, os, sys, yaml
    name = sys.argv[1]
    params = yaml.safe_load(open("params.yaml"))
    os.makedirs("out", exist_ok=True)
    os.makedirs("metrics", exist_ok=True)
    if name == "register":  # what tasks/register.py records: the version and the store it is in
        json.dump({"version": 1, "store": os.environ["MLFLOW_TRACKING_URI"]}, open("metrics/register.json", "w"))
    else:
        value = params[name]["v"]
        open(f"out/{name}.txt", "w").write(str(value))
        json.dump({"value": value}, open(f"metrics/{name}.json", "w"))
    """


def test_an_override_run_reports_its_own_stages_and_is_a_dvc_experiment(harness, env, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    proj = _project(env / "exp", STAGES_DVC, "a: {v: 1}\nb: {v: 2}\n", {"stage.py": STAGE_PY}, git=True)
    monkeypatch.chdir(proj)
    state = pipeline(promote=False, retries=0, return_state=True)
    assert state.is_completed(), state.message
    assert [r["status"] for r in state.result()["stages"]] == ["ran", "ran", "ran"]
    subprocess.run(["git", "add", "-A"], cwd=proj, check=True)  # the user commits the run
    subprocess.run([*GIT, "commit", "-qm", "run"], cwd=proj, check=True)

    # the registry changed (servers up after a local run): register runs again, into it
    first_store = os.environ["MLFLOW_TRACKING_URI"]
    state = pipeline(targets=["register"], promote=False, retries=0, return_state=True)
    assert [r["status"] for r in state.result()["stages"]] == ["up to date"] * 3
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env / 'server.db'}")
    state = pipeline(targets=["register"], promote=False, retries=0, return_state=True)
    assert [r["status"] for r in state.result()["stages"]] == ["up to date", "up to date", "ran"]
    assert json.loads((proj / "metrics" / "register.json").read_text())["store"] != first_store
    subprocess.run(["git", "add", "-A"], cwd=proj, check=True)
    subprocess.run([*GIT, "commit", "-qm", "register"], cwd=proj, check=True)

    # only stage a, with another value: a's metrics are the run's, b's and register's are not
    before = (proj / "params.yaml").read_bytes()
    state = pipeline(overrides=["a.v=5"], targets=["a"], promote=False, retries=0, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["metrics"] == {"a/value": 5.0}
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    results = next(a for a in arts if a.key == "quant-results").data
    results = json.loads(results) if isinstance(results, str) else results
    assert [r["metric"] for r in results] == ["a/value"]
    kept = proj / ".state" / "flow-runs" / str(state.state_details.flow_run_id)
    assert sorted(p.name for p in (kept / "metrics").iterdir()) == ["a.json"]
    assert (proj / "params.yaml").read_bytes() == before  # the workspace is untouched

    # ... and a DVC experiment of the checkout: listed, and applied into the workspace
    name = summary["experiment"]
    assert name and name.startswith("flow-")
    listed = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=proj,
                            capture_output=True, text=True, check=True).stdout.split()
    assert name in listed
    subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", name], cwd=proj, capture_output=True, check=True)
    assert yaml.safe_load((proj / "params.yaml").read_text()) == {"a": {"v": 5}, "b": {"v": 2}}
    assert (proj / "out" / "a.txt").read_text() == "5"
    assert json.loads((proj / "metrics" / "a.json").read_text()) == {"value": 5}
