"""Orchestration against REAL servers on 127.0.0.1: a Prefect server, a Prefect process
worker and an MLflow tracking/registry server, started by scripts/servers.py (the same
script `make servers-up` runs) on free ports with their state in a temporary directory.

- A toy DVC project run by the flow in this process against the real Prefect API: the
  foreach items run concurrently, each pinned to its own GPU id, a flaky stage is retried,
  a stage that rejects its params is not, and the stage processes get the parent run id.
- The deployment of prefect.yaml, deployed from a temporary copy of this repository and
  run with `prefect deployment run` on tiny settings (the embedded model, two evaluation
  windows, few documents) for the chain that ends in `register` (prepare -> calibrate ->
  evaluate -> register, with `evaluate.model=calibrate`): the flow run completes; MLflow
  holds the parent run and one nested run per stage with params, metrics and artifacts; a
  model version is registered and promoted; a second run with a stricter gate reruns only
  `register` and is refused with the failed gates named; `models:/quant-pipeline@champion`
  loads and generates; `dvc push` / `dvc pull` restore the outputs.
- Shards on a work pool: two shard workers (`servers.py shard-worker`, one run at a time
  each) take one shard each of one pipeline run with `shard_deployment` (the repository's
  `shard` deployment, on a toy project), with the pipeline's environment; a shard that
  rejects its params fails the run and is not resubmitted. (slow, opt-in) The worker
  holding a shard is SIGKILLed: the crash watcher finds its process gone and crashes its run, the pipeline
  resubmits it, the other worker runs it, the pipeline completes.
- (slow, opt-in) The same deployment over the whole graph with params.yaml's own
  `evaluate.model` (synthesis shards, merge, block_ap, e2e, evaluate, register): completes,
  shards overlap in time, stages that already ran stay up to date, a version is registered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
BIN = Path(PY).parent
DEPLOYMENT = "quant-pipeline/embedded-default"
MODEL = "quant-pipeline"

# Tiny settings per params section, applied (as deployment parameters, DVC -S syntax) only
# where params.yaml has the key, so stages added later run with their own defaults.
TINY = {
    "synthesize.shards": "[0,1]",
    "synthesize.num_start_ids": "2",
    "synthesize.prefix_lengths": "[3]",
    "synthesize.seq_len": "16",
    "synthesize.batch_size": "2",
    "calibrate.samples": "4",
    "calibrate.seq_len": "64",
    # the few synthetic rows above are too few to train on: block_ap/e2e read calibration text
    "block_ap.data.source": "calib",
    "block_ap.data.train_samples": "4",
    "block_ap.data.val_samples": "2",
    "block_ap.data.seq_len": "32",
    "block_ap.steps": "[{block-ap: {epochs: 1, batch_size: 2}}]",
    "e2e.data.source": "calib",
    "e2e.data.train_samples": "4",
    "e2e.data.val_samples": "2",
    "e2e.data.seq_len": "32",
    "e2e.train.batch_size": "2",
    "e2e.train.max_steps": "2",
    # the non-slow chain: register the calibrated model (prepare -> calibrate -> evaluate ->
    # register); the slow test below runs the whole graph with params.yaml's evaluate.model
    "evaluate.model": "calibrate",
    "evaluate.seq_len": "128",
    "evaluate.max_windows": "2",
    "evaluate.tasks": "[piqa]",
    "evaluate.limit": "4",
    "evaluate.report": "false",
    # four documents make accuracy noise: the tiny run opens that gate (its arithmetic is
    # tested in test_register.py); the PPL-ratio and champion gates stay as in params.yaml
    "register.gates.max_acc_drop": "1.0",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    state = tmp_path_factory.mktemp("servers")
    env = {**os.environ, "QUANT_STATE_DIR": str(state), "QUANT_PREFECT_PORT": str(_free_port()),
           "QUANT_MLFLOW_PORT": str(_free_port()), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "QUANT_PARENT_RUN_ID"):
        env.pop(var, None)
    script = [PY, str(ROOT / "scripts" / "servers.py")]
    up = subprocess.run([*script, "up"], env=env, capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        out = subprocess.run([*script, "env"], env=env, capture_output=True, text=True, check=True).stdout
        client = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
        yield SimpleNamespace(state=state, env=env, client={**env, **client},
                              api=client["PREFECT_API_URL"], mlflow=client["MLFLOW_TRACKING_URI"])
    finally:
        subprocess.run([*script, "down"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def mlflow_client(servers):
    from mlflow.tracking import MlflowClient

    return MlflowClient(servers.mlflow)


def prefect_api(servers):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: servers.api})


def flow_artifacts(servers, flow_run_id: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with prefect_api(servers), get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return {"state": run.state, "artifacts": {a.key: a for a in arts}}


def table(artifact) -> list[dict]:
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


# ---------------------------------------------------------------------------
# The servers


def _listening(port: int) -> set[str]:
    """Local addresses listening on `port` (from /proc/net/tcp{,6})."""
    addrs = set()
    for name in ("tcp", "tcp6"):
        f = Path(f"/proc/net/{name}")
        if not f.exists():
            continue
        for line in f.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                addrs.add(host)
    return addrs


def test_servers_bind_loopback_only_and_run_without_telemetry(servers):
    for port in (int(servers.env["QUANT_PREFECT_PORT"]), int(servers.env["QUANT_MLFLOW_PORT"])):
        assert _listening(port) == {"0100007F"}, f"port {port} must listen on 127.0.0.1 only"
    for pidfile in sorted((servers.state / "pids").glob("*.pid")):
        pid = json.loads(pidfile.read_text())["pid"]
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        assert env["DO_NOT_TRACK"] == "true" and env["MLFLOW_DISABLE_TELEMETRY"] == "true", pidfile.name
        assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and env["DVC_NO_ANALYTICS"] == "1"
        assert env["PREFECT_HOME"].startswith(str(servers.state)), pidfile.name
    status = subprocess.run([PY, str(ROOT / "scripts" / "servers.py"), "status"], env=servers.env,
                            capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.count(": up") == 4, status.stdout
    assert "crash-watch: up" in status.stdout


# ---------------------------------------------------------------------------
# The flow on a toy DVC project: concurrency, GPU pinning, retries


TOY_DVC = """\
    stages:
      prep:
        cmd: python rec.py prep
        outs: [out/prep.json]
      shard:
        foreach: ${shards}
        do:
          cmd: python rec.py shard-${item}
          deps: [out/prep.json]
          outs: ["out/shard-${item}.json"]
      flaky:
        cmd: python flaky.py
        deps: [out/shard-0.json, out/shard-1.json]
        params: [mode]
        outs: [out/flaky.json]
"""
TOY_FILES = {
    "params.yaml": "shards: [0, 1]\nmode: ok\n",
    # a shard waits (up to 120 s) until every shard has started: run one after the other,
    # the first would time out and fail
    "rec.py": """\
        import json, os, sys, time, yaml
        name, t0 = sys.argv[1], time.time()
        os.makedirs("started", exist_ok=True)
        open(f"started/{name}", "w").close()
        if name.startswith("shard-"):
            peers = [f"started/shard-{k}" for k in yaml.safe_load(open("params.yaml"))["shards"]]
            while not all(os.path.exists(p) for p in peers):
                if time.time() - t0 > 120:
                    sys.exit(f"{name}: the other shards never started")
                time.sleep(0.2)
        os.makedirs("out", exist_ok=True)
        json.dump({"start": t0, "end": time.time(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "parent": os.environ.get("QUANT_PARENT_RUN_ID")}, open(f"out/{name}.json", "w"))
        """,
    # attempts counted outside the checkout: runs with overrides happen in a scratch copy
    "flaky.py": """\
        import os, sys, yaml
        f = os.environ["ATTEMPTS_FILE"]
        n = int(open(f).read()) + 1 if os.path.exists(f) else 1
        open(f, "w").write(str(n))
        if yaml.safe_load(open("params.yaml"))["mode"] == "bad":
            print("error: mode='bad' is not accepted"); sys.exit(2)
        if n == 1:
            sys.exit("transient failure")
        open("out/flaky.json", "w").write("{}")
        """,
}


def test_flow_maps_shards_concurrently_pins_gpus_and_retries(servers, mlflow_client, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline

    proj = tmp_path / "toy"
    proj.mkdir()
    subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=proj, check=True)
    (proj / "dvc.yaml").write_text(textwrap.dedent(TOY_DVC))
    for name, text in TOY_FILES.items():
        (proj / name).write_text(textwrap.dedent(text))
    monkeypatch.chdir(proj)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers.mlflow)
    monkeypatch.setenv("QUANT_EXPERIMENT", "toy")
    monkeypatch.setenv("ATTEMPTS_FILE", str(tmp_path / "attempts.txt"))
    params_before = (proj / "params.yaml").read_bytes()
    with temporary_settings(updates={PREFECT_API_URL: servers.api}):
        state = pipeline(retries=1, retry_delay_seconds=0, promote=False, return_state=True)
        assert state.is_completed(), state.message
        summary = state.result()
        rec = {n: json.loads((proj / "out" / f"{n}.json").read_text()) for n in ("prep", "shard-0", "shard-1")}
        # both shards ran at once (each waited for the other), each on its own GPU; prep saw all GPUs
        assert max(rec["shard-0"]["start"], rec["shard-1"]["start"]) < min(rec["shard-0"]["end"], rec["shard-1"]["end"])
        assert (rec["shard-0"]["cuda"], rec["shard-1"]["cuda"], rec["prep"]["cuda"]) == ("3", "5", "3,5")
        assert {r["parent"] for r in rec.values()} == {summary["mlflow_parent_run_id"]}
        assert (tmp_path / "attempts.txt").read_text() == "2"  # failed once, retried, passed
        assert [(r["stage"], r["status"], r["gpu"]) for r in summary["stages"]] == [
            ("prep", "ran", ""), ("shard@0", "ran", "3"), ("shard@1", "ran", "5"), ("flaky", "ran", "")]
        parent = mlflow_client.get_run(summary["mlflow_parent_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.params["shards"] == "[0, 1]"
        logs = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "logs")}
        assert logs == {"logs/prep.log", "logs/shard-0.log", "logs/shard-1.log", "logs/flaky.log"}
        stage_runs = mlflow_client.search_runs([parent.info.experiment_id],
                                               f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert stage_runs == []  # the toy stages open no MLflow runs of their own

        # overrides run in a scratch checkout: a stage that rejects its params (exit 2)
        # fails the flow at once (no retry), naming the stage and its error line
        state = pipeline(overrides=["mode=bad", "shards=[0,1,2]"], retries=3, retry_delay_seconds=0,
                         promote=False, return_state=True)
        assert state.is_failed()
        assert "stage 'flaky' failed: error: mode='bad' is not accepted" in state.message
        assert (tmp_path / "attempts.txt").read_text() == "3"
        assert (proj / "params.yaml").read_bytes() == params_before
        assert not (proj / "out" / "shard-2.json").exists()  # the third shard ran in the scratch copy
        failed = mlflow_client.search_runs([parent.info.experiment_id], "tags.stage = 'pipeline'",
                                           order_by=["attributes.start_time DESC"], max_results=1)[0]
        assert failed.info.status == "FAILED" and failed.data.tags["status_detail"] == "failed"
        assert failed.data.tags["error"] == "stage 'flaky' failed: error: mode='bad' is not accepted"
        assert failed.data.params["overrides"] == "mode=bad shards=[0,1,2]"
        assert failed.data.params["shards"] == "[0, 1, 2]" and failed.data.params["mode"] == "bad"

        # an unknown key fails before any stage and says so; then a plain run: nothing to redo
        state = pipeline(overrides=["modee=ok"], promote=False, return_state=True)
        assert state.is_failed() and "unknown key 'modee'" in state.message
        state = pipeline(promote=False, return_state=True)
        assert state.is_completed(), state.message
        assert {r["status"] for r in state.result()["stages"]} == {"up to date"}
        assert (proj / "params.yaml").read_bytes() == params_before
        assert not (proj / ".state" / "scratch").exists() or not any((proj / ".state" / "scratch").iterdir())


def test_crashed_flow_run_mlflow_runs_are_failed(servers, mlflow_client, tmp_path, monkeypatch):
    """What the reaper does after a worker kill, driven directly: a flow
    run Prefect holds Crashed while its MLflow parent and stage runs still say RUNNING."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    from flows import reaper
    from flows.pipeline import pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers.mlflow)
    with prefect_api(servers), get_client(sync_client=True) as client:
        flow_id = client.create_flow(pipeline)
        fr = client.create_flow_run(pipeline, state=Running())
        exp = mlflow_client.get_experiment_by_name("toy") or mlflow_client.get_experiment(
            mlflow_client.create_experiment("toy"))
        exp_id = getattr(exp, "experiment_id", exp)
        parent = mlflow_client.create_run(exp_id, tags={"stage": "pipeline", "prefect.flow_run_id": str(fr.id)})
        stage = mlflow_client.create_run(exp_id, tags={"stage": "evaluate",
                                                       "mlflow.parentRunId": parent.info.run_id})
        assert reaper.reap_crashed(tmp_path) == []  # still running in Prefect: left alone
        client.set_flow_run_state(fr.id, Crashed(message="no heartbeat for 90 s"), force=True)
        changed = reaper.reap_crashed(tmp_path)
        assert flow_id and set(changed) == {parent.info.run_id, stage.info.run_id}
    for run_id in changed:
        run = mlflow_client.get_run(run_id)
        assert run.info.status == "FAILED" and "Crashed: no heartbeat for 90 s" in run.data.tags["error"]


def test_the_crash_watcher_runs_instead_of_a_heartbeat_automation(servers):
    """`servers.py up` started the crash watcher (it completed a pass against the server) and
    left no automation that would crash a flow run for late heartbeats."""
    from prefect.client.orchestration import get_client

    st = json.loads((servers.state / "crash-watch.json").read_text())
    assert st["error"] is None and st["checked"] > 0
    with prefect_api(servers), get_client(sync_client=True) as client:
        autos = client.read_automations()
    assert not [a.name for a in autos if any(getattr(x, "type", "") == "change-flow-run-state" for x in a.actions)]


# ---------------------------------------------------------------------------
# The deployment on tiny settings, through the real worker


def _copy_repo(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def _has_key(params: dict, dotted: str) -> bool:
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _tiny_overrides(repo: Path, model_dir: Path) -> list[str]:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    out = [f"model.name_or_path={model_dir}"]
    return out + [f"{k}={v}" for k, v in TINY.items() if _has_key(params, k)]


@pytest.fixture(scope="module")
def deployed(servers, tmp_path_factory, embedded_model_dir):
    repo = _copy_repo(tmp_path_factory.mktemp("repo"))
    r = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=repo, env=servers.client,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and DEPLOYMENT in r.stdout, r.stdout + r.stderr
    return SimpleNamespace(repo=repo, overrides=_tiny_overrides(repo, embedded_model_dir))


@pytest.fixture(scope="module")
def first_run(servers, deployed):
    """`prefect deployment run` with the tiny overrides, watched to the end."""
    params = {"overrides": deployed.overrides, "targets": ["register"]}
    r = subprocess.run([str(BIN / "prefect"), "deployment", "run", DEPLOYMENT, "--watch", "--watch-timeout", "1500",
                        "--params", json.dumps(params)],
                       cwd=deployed.repo, env=servers.client, capture_output=True, text=True, timeout=1600)
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", r.stdout)
    assert m, r.stdout + r.stderr
    return SimpleNamespace(id=m.group(1), cli=r, **flow_artifacts(servers, m.group(1)))


@pytest.fixture(scope="module")
def second_run(servers, deployed, first_run):
    """A stricter PPL-ratio gate through run_deployment: DVC reruns only `register` (the
    rest is checked out of the shared cache into the run's scratch checkout)."""
    from prefect.deployments import run_deployment

    with prefect_api(servers):
        fr = run_deployment(DEPLOYMENT, timeout=1500, parameters={
            "overrides": [*deployed.overrides, "register.gates.max_ppl_ratio=1.01"], "targets": ["register"]})
    return SimpleNamespace(id=str(fr.id), **flow_artifacts(servers, str(fr.id)))


def _parent(mlflow_client, flow_run_id: str):
    exp = mlflow_client.get_experiment_by_name("quant-pipeline")
    runs = mlflow_client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1
    return runs[0]


def test_deployment_run_completes_with_parent_and_nested_runs(first_run, deployed, mlflow_client):
    from flows import dvc_stages

    assert first_run.state.is_completed(), first_run.cli.stdout[-3000:]
    stages = table(first_run.artifacts["quant-stages"])
    assert stages and all(r["status"] == "ran" for r in stages), stages
    names = [r["stage"] for r in stages]
    # the chain of the run's own params (evaluate.model=calibrate), not the checkout's
    assert not any(dvc_stages.family(n) in ("synthesize", "merge", "block_ap", "e2e") for n in names), names
    assert names[0] == "prepare" and names[-1] == "register" and {"calibrate", "evaluate"} <= set(names)
    results = {r["metric"]: r["value"] for r in table(first_run.artifacts["quant-results"])}
    assert results["eval/ppl/embedded-wiki"] > 1 and "promoted" in results["promotion"]
    assert "| full precision |" in first_run.artifacts["quant-report"].data

    parent = _parent(mlflow_client, first_run.id)
    p = parent.data.params
    assert parent.info.status == "FINISHED"
    assert re.fullmatch(r"[0-9a-f]{40}", p["git_commit"]) and re.fullmatch(r"[0-9a-f]{32}", p["dvc_lock_md5"])
    assert p["scheme.weight.format"] == "int4" and p["calibrate.samples"] == "4"
    assert "calibrate.samples=4" in p["overrides"]
    assert parent.data.metrics["eval/ppl/embedded-wiki"] == pytest.approx(results["eval/ppl/embedded-wiki"], rel=1e-3)
    arts = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
    assert {"logs", "metrics", "pipeline"} <= arts
    logs = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "logs")}
    assert {f"logs/{n.replace('@', '-')}.log" for n in names} == logs

    nested = mlflow_client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(nested) == len(names)  # one MLflow run per stage process
    for run in nested:
        assert run.info.status == "FINISHED", run.info.run_name
        assert run.data.params and "wall_seconds" in run.data.metrics, run.info.run_name
        assert run.data.metrics["peak_host_gib"] > 0.05, run.info.run_name  # resident memory of a stage
    by_name = {r.info.run_name: r for r in nested}
    assert {a.path for a in mlflow_client.list_artifacts(by_name["evaluate"].info.run_id)} >= {"eval.json"}


def test_model_version_registered_with_tags_and_promoted(first_run, mlflow_client):
    parent = _parent(mlflow_client, first_run.id)
    versions = mlflow_client.search_model_versions(f"name = '{MODEL}'")
    v1 = next(v for v in versions if str(v.version) == "1")
    assert v1.tags["scheme"] == "W4A16KV16g64" and "calibrate=rtn" in v1.tags["methods"]
    assert float(v1.tags["primary_value"]) > 1 and 1.0 < float(v1.tags["ppl_ratio"]) < 1.5
    assert v1.tags["promotion"] == "promoted"
    assert str(mlflow_client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert "promoted to @champion" in parent.data.tags["promotion"]


def test_stricter_gate_reruns_only_register_and_is_refused(second_run, mlflow_client, deployed):
    assert second_run.state.is_completed()
    status = {r["stage"]: r["status"] for r in table(second_run.artifacts["quant-stages"])}
    assert status.pop("register") == "ran", status
    # the scratch checkout starts from the workspace's dvc.lock, which the first run (an
    # override run too) left alone: prepare and calibrate came from DVC's run cache, and
    # say so; evaluate (an uncached output: no run cache), if DVC reran it, reused both
    # models' scores from the first run
    assert status.pop("prepare") == status.pop("calibrate") == "restored", status
    if status.pop("evaluate") != "up to date":
        kept_eval = json.loads((deployed.repo / ".state" / "flow-runs" / second_run.id / "metrics" / "eval.json")
                               .read_text())
        assert len(kept_eval["reused"]) == 2, kept_eval.get("reused")
    assert set(status.values()) <= {"up to date"}, status
    parent = _parent(mlflow_client, second_run.id)
    msg = parent.data.tags["promotion"]
    assert "v2 not promoted; @champion stays v1" in msg
    assert "gate 'ppl_ratio' failed" in msg and "> 1.01" in msg and "gate 'champion' failed" in msg
    assert mlflow_client.get_model_version(MODEL, "2").tags["promotion"] == "refused: ppl_ratio; champion"
    assert str(mlflow_client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert "v2 not promoted" in second_run.state.message  # the flow run says so too
    # the overrides ran in a scratch checkout: params.yaml is git's, byte for byte, and the
    # run's own params.yaml / dvc.lock are kept under .state/flow-runs/<flow run id>/
    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=deployed.repo, capture_output=True,
                               check=True).stdout
    assert (deployed.repo / "params.yaml").read_bytes() == committed
    kept = deployed.repo / ".state" / "flow-runs" / second_run.id
    assert yaml.safe_load((kept / "params.yaml").read_text())["register"]["gates"]["max_ppl_ratio"] == 1.01
    assert "register" in yaml.safe_load((kept / "dvc.lock").read_text())["stages"]


def test_champion_loads_and_generates(second_run, servers):
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(servers.mlflow)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        prompt = "The capital of France is"
        out = model.predict([prompt])
    finally:
        mlflow.set_tracking_uri(previous)
    text = out[0] if isinstance(out, list) else str(out)
    assert text.startswith(prompt) and len(text) > len(prompt) + 5, text


def test_dvc_push_then_pull_restores_outputs(second_run, deployed):
    """Every cached output of the chain that ran goes to the default (local) remote and
    comes back from it into an empty workspace and cache."""
    from dvc.repo import Repo

    repo = deployed.repo

    def dvc(*args):
        return subprocess.run([PY, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, check=True).stdout

    # bring the last run into the workspace: its params.yaml, dvc.lock and metrics as kept,
    # the cached outputs from the shared cache
    shutil.copytree(repo / ".state" / "flow-runs" / second_run.id, repo, dirs_exist_ok=True)
    dvc("checkout", "--with-deps", "register")  # the lock also lists stages this chain never ran

    with Repo(str(repo)) as r:
        outs = sorted(Path(o.fs_path) for o in r.index.outs if o.use_cache)
    ran = [p for p in outs if p.exists()]  # the stages `register` depends on
    assert {repo / "artifacts" / "prepare" / "model", repo / "artifacts" / "calibrate" / "model"} <= set(ran)
    dvc("push", "--with-deps", "register")
    assert any((repo / ".state" / "dvc-remote").rglob("*"))
    digest = {p: _tree_digest(p) for p in ran}
    for p in ran:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc("pull", "--with-deps", "register")
    assert {p: _tree_digest(p) for p in ran} == digest
    assert "up to date" in dvc("status", "--with-deps", "register")


def _tree_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted([path] if path.is_file() else path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path.parent)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_full_graph_deployment_run(servers, deployed, second_run, request):
    """Every stage of dvc.yaml through the worker, on the tiny settings of the first run.
    Minutes on 2 cores (every training stage on the 135M model), so it runs only when asked
    for (`pytest -m slow tests/flows/test_orchestration.py`); the chain above covers the path."""
    if "slow" not in (request.config.getoption("markexpr") or "").replace("not slow", ""):
        pytest.skip("full-graph deployment run: select it with -m slow")
    from prefect.deployments import run_deployment

    from flows import dvc_stages

    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=deployed.repo, capture_output=True,
                               text=True, check=True).stdout
    source = yaml.safe_load(committed)["evaluate"]["model"]
    with prefect_api(servers):
        fr = run_deployment(DEPLOYMENT, timeout=3000, parameters={"overrides": [f"evaluate.model={source}"]})
    res = flow_artifacts(servers, str(fr.id))
    assert res["state"].is_completed(), res["state"].message
    rows = table(res["artifacts"]["quant-stages"])
    plan = dvc_stages.waves(dvc_stages.read_graph(deployed.repo))
    assert [r["stage"] for r in rows] == [s for wave in plan for s in wave]
    assert {r["stage"]: r["status"] for r in rows}["prepare"] == "up to date"
    assert {r["status"] for r in rows} <= {"ran", "up to date"}
    assert source == "calibrate" or {r["stage"]: r["status"] for r in rows}["register"] == "ran"
    shards = [r for r in rows if r["stage"].startswith("synthesize@") and r["status"] == "ran"]
    if len(shards) >= 2:  # mapped concurrently: every shard started before the first one ended
        from datetime import datetime, timedelta

        start = [datetime.fromisoformat(r["started"]) for r in shards]
        ends = [t + timedelta(seconds=r["seconds"]) for t, r in zip(start, shards, strict=True)]
        assert max(start) < min(ends), shards


# ---------------------------------------------------------------------------
# A real crash: worker and flow process killed while a stage runs


CRASH_PREFECT_YAML = """\
name: crash-test
prefect-version: 3.8.8
build: null
push: null
deployments:
  - name: crash-test
    entrypoint: flows/pipeline.py:pipeline
    parameters: {promote: false, retries: 0}
    concurrency_limit: 1
    work_pool:
      name: quant-process
      work_queue_name: default
      job_variables:
        env: {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: "30", QUANT_EXPERIMENT: crash-test}
"""


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        try:
            ppid = int(Path(d, "stat").read_text().rsplit(") ", 1)[1].split()[1]) if d.name.isdigit() else None
        except (OSError, IndexError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def test_killed_worker_run_becomes_crashed_mlflow_failed_and_a_rerun_starts_at_once(servers, mlflow_client,
                                                                                     tmp_path, monkeypatch):
    import signal
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows import reaper

    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers.mlflow)
    proj = tmp_path / "crash"
    shutil.copytree(ROOT / "flows", proj / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=proj, check=True)
    (proj / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          slow:
            cmd: python -c "import time, yaml; open('started', 'w').close(); time.sleep(yaml.safe_load(open('params.yaml'))['sleep'])"
            params: [sleep]
        """))
    (proj / "params.yaml").write_text("sleep: 900\n")
    (proj / "prefect.yaml").write_text(CRASH_PREFECT_YAML)
    r = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=proj, env=servers.client,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with prefect_api(servers):
        fr = run_deployment("quant-pipeline/crash-test", timeout=0)
        deadline = time.time() + 600
        while not (proj / "started").exists():
            assert time.time() < deadline, "the stage never started"
            time.sleep(1)
        worker = json.loads((servers.state / "pids" / "prefect-worker.pid").read_text())["pid"]
        for pid in reversed(_tree(worker)):  # the worker, the flow run process, dvc, the stage
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.time()
        with get_client(sync_client=True) as client:
            while (state := client.read_flow_run(fr.id).state).is_running():
                assert time.time() - killed < 420, "still Running 7 min after the kill"
                time.sleep(5)
        crashed_after = time.time() - killed
        print(f"flow run {state.name} {crashed_after:.0f} s after the kill: {state.message}")
        assert state.is_crashed(), (state.name, state.message)
        parents = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("crash-test").experiment_id],
                                            f"tags.`prefect.flow_run_id` = '{fr.id}'")
        assert "crash watcher" in state.message and "is gone" in state.message
        assert crashed_after < 120, "the crash watcher checks every 15 s"
        (parent,) = parents
        deadline = time.time() + 60  # the watcher fails the MLflow runs right after it set Crashed
        while (parent := mlflow_client.get_run(parent.info.run_id)).info.status == "RUNNING":
            assert time.time() < deadline, "the crash watcher did not fail the MLflow runs"
            time.sleep(1)
        assert parent.info.status == "FAILED" and "is gone" in parent.data.tags["error"]
        assert reaper.reap_crashed(tmp_path) == []  # nothing left for the next run to clean up

        # a new worker; the next run starts at once (the crash freed the concurrency slot)
        up = subprocess.run([PY, str(ROOT / "scripts" / "servers.py"), "up"], env=servers.env,
                            capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        t0 = time.time()
        again = run_deployment("quant-pipeline/crash-test", timeout=600, parameters={"overrides": ["sleep=0"]})
        assert again.state.is_completed(), again.state.message
    print(f"crashed {crashed_after:.0f} s after the kill; re-run done in {time.time() - t0:.0f} s")
    assert time.time() - t0 < 300


# ---------------------------------------------------------------------------
# Shards on a work pool: two shard workers, one pipeline run; a killed worker's shard


SHARD_DVC = """\
    stages:
      prep:
        cmd: python rec.py prep
        outs: [out/prep.json]
      shard:
        foreach: ${shards}
        do:
          cmd: python rec.py shard-${item}
          deps: [out/prep.json]
          params: [hold, fail]
          outs: ["out/shard-${item}.json"]
      merge:
        cmd: python rec.py merge
        deps: [out/shard-0.json, out/shard-1.json]
        outs: [out/merge.json]
"""
# Each attempt of a stage leaves $SHARD_TEST_MARKS/<name>.<attempt> (outside the checkout)
# with its process ancestry, which names the worker that ran it. A shard waits until every
# shard has started (so they ran at once); the first attempt of a shard listed in `hold`
# sleeps until its worker is killed; a shard listed in `fail` rejects its params (exit 2).
SHARD_FILES = {
    "params.yaml": "shards: [0, 1]\nhold: []\nfail: []\n",
    "rec.py": """\
        import json, os, sys, time, yaml
        name, t0 = sys.argv[1], time.time()
        marks = os.environ["SHARD_TEST_MARKS"]
        os.makedirs(marks, exist_ok=True)
        attempt = 1 + sum(f.startswith(name + ".") for f in os.listdir(marks))
        chain, pid = [], os.getpid()
        while pid > 1:
            chain.append(pid)
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()[1])
        json.dump({"chain": chain}, open(f"{marks}/{name}.{attempt}.tmp", "w"))
        os.replace(f"{marks}/{name}.{attempt}.tmp", f"{marks}/{name}.{attempt}")
        params = yaml.safe_load(open("params.yaml"))
        if name.startswith("shard-"):
            if int(name.split("-")[1]) in params["fail"]:
                print(f"error: fail={params['fail']} is not accepted")
                sys.exit(2)
            if int(name.split("-")[1]) in params["hold"] and attempt == 1:
                time.sleep(900)
            while not all(os.path.exists(f"{marks}/shard-{k}.1") for k in params["shards"]):
                if time.time() - t0 > 120:
                    sys.exit(f"{name}: the other shards never started")
                time.sleep(0.2)
        os.makedirs("out", exist_ok=True)
        env = {k: os.environ.get(k) for k in ("QUANT_PARENT_RUN_ID", "QUANT_CACHE_DIR", "QUANT_STAGE_RUN_NAME")}
        json.dump({"start": t0, "end": time.time(), "attempt": attempt, **env}, open(f"out/{name}.json", "w"))
        """,
}
SHARD_TEST_DEPLOYMENT = "quant-shard/shard-test"


def _shard_project(servers, proj: Path, marks: Path) -> Path:
    """The toy project with flows/ and a prefect.yaml holding the repository's own `shard`
    deployment (renamed) and a pipeline deployment, both with $SHARD_TEST_MARKS."""
    shutil.copytree(ROOT / "flows", proj / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=proj, check=True)
    (proj / "dvc.yaml").write_text(textwrap.dedent(SHARD_DVC))
    for name, text in SHARD_FILES.items():
        (proj / name).write_text(textwrap.dedent(text))
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    shard = next(d for d in spec["deployments"] if d["name"] == "shard")
    shard["name"] = SHARD_TEST_DEPLOYMENT.split("/")[1]
    pipe = yaml.safe_load(textwrap.dedent(CRASH_PREFECT_YAML))["deployments"][0]
    pipe["name"] = "shard-pool-test"
    for d in (shard, pipe):
        d["work_pool"]["job_variables"]["env"].update(SHARD_TEST_MARKS=str(marks), QUANT_EXPERIMENT="shard-pool")
    spec["deployments"] = [pipe, shard]
    (proj / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=proj, env=servers.client,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and SHARD_TEST_DEPLOYMENT in r.stdout, r.stdout + r.stderr
    return proj


@pytest.fixture(scope="module")
def shard_workers(servers):
    """Two shard workers (`servers.py shard-worker`, one flow run at a time each): {pid: name}."""
    script = [PY, str(ROOT / "scripts" / "servers.py"), "shard-worker"]
    pids = {}
    for name in ("a", "b"):
        r = subprocess.run([*script, "--name", name], env=servers.env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        pids[json.loads((servers.state / "pids" / f"shard-worker-{name}.pid").read_text())["pid"]] = name
    return pids


def _worker_of(marks: Path, mark: str, workers: dict[int, str]) -> str:
    """The shard worker among whose descendants that attempt of a stage ran."""
    chain = json.loads((marks / mark).read_text())["chain"]
    (name,) = [workers[p] for p in chain if p in workers]
    return name


def _shard_runs(servers) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_api(servers), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(SHARD_TEST_DEPLOYMENT)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                     sort=FlowRunSort.START_TIME_ASC)


def test_two_workers_of_the_pool_take_the_shards_of_one_pipeline_run(servers, shard_workers, mlflow_client,
                                                                      tmp_path, monkeypatch):
    from flows.pipeline import pipeline

    marks = tmp_path / "marks"
    proj = _shard_project(servers, tmp_path / "proj", marks)
    monkeypatch.chdir(proj)
    monkeypatch.setenv("SHARD_TEST_MARKS", str(marks))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers.mlflow)
    monkeypatch.setenv("QUANT_EXPERIMENT", "shard-pool")
    with prefect_api(servers):
        state = pipeline(shard_deployment=SHARD_TEST_DEPLOYMENT, promote=False, retries=0, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    rows = {r["stage"]: r for r in summary["stages"]}
    assert [(s, r["status"]) for s, r in rows.items()] == [
        ("prep", "ran"), ("shard@0", "ran"), ("shard@1", "ran"), ("merge", "ran")]
    # one shard on each worker, at the same time; prep and merge in the flow's own process
    assert {_worker_of(marks, f"shard-{k}.1", shard_workers) for k in (0, 1)} == {"a", "b"}
    assert _worker_of(marks, "prep.1", {os.getpid(): "here"}) == "here"
    rec = {k: json.loads((proj / "out" / f"shard-{k}.json").read_text()) for k in (0, 1)}
    assert max(r["start"] for r in rec.values()) < min(r["end"] for r in rec.values())
    # the stages got the pipeline's environment, and their logs are on the parent run
    for k, r in rec.items():
        assert r["QUANT_PARENT_RUN_ID"] == summary["mlflow_parent_run_id"]
        assert r["QUANT_CACHE_DIR"] == str(proj / "artifacts" / ".cache")
        assert r["QUANT_STAGE_RUN_NAME"] == f"shard@{k}"
    logs = {a.path for a in mlflow_client.list_artifacts(summary["mlflow_parent_run_id"], "logs")}
    assert logs == {"logs/prep.log", "logs/shard-0.log", "logs/shard-1.log", "logs/merge.log"}
    # the shard runs: flow runs of the shard deployment, linked to this run, in two processes
    runs = _shard_runs(servers)
    assert sorted(fr.name.rsplit("/", 1)[1] for fr in runs) == ["shard@0", "shard@1"]
    assert all(fr.state.is_completed() and fr.parent_task_run_id for fr in runs)
    assert len({fr.infrastructure_pid for fr in runs}) == 2
    assert {rows[s]["flow_run"] for s in ("shard@0", "shard@1")} == {fr.name for fr in runs}
    assert {str(rows[s]["pid"]) for s in ("shard@0", "shard@1")} == {fr.infrastructure_pid for fr in runs}

    # overrides: the shards run in the run's scratch checkout; a shard that rejects its
    # params fails the pipeline with its error line, and is not submitted again
    with prefect_api(servers):
        state = pipeline(overrides=["fail=[1]"], shard_deployment=SHARD_TEST_DEPLOYMENT, promote=False, retries=1,
                         retry_delay_seconds=0, return_state=True)
    assert state.is_failed()
    assert "stage 'shard@1' failed: error: fail=[1] is not accepted" in state.message
    assert sorted(p.name for p in marks.iterdir() if p.name.startswith("shard-")) == [
        "shard-0.1", "shard-0.2", "shard-1.1", "shard-1.2"]
    assert (proj / "params.yaml").read_text() == SHARD_FILES["params.yaml"]
    failed = [fr for fr in _shard_runs(servers) if fr.name.endswith("/shard@1") and fr.state.is_failed()]
    assert len(failed) == 1 and "bad params" in failed[0].state.message


@pytest.mark.slow
def test_a_killed_shard_worker_s_shard_is_retried_on_the_other(servers, shard_workers, tmp_path, request):
    """The pipeline deployment (on the main worker) hands its two shards to the pool; the
    worker holding shard@0 is SIGKILLed with its processes; the crash watcher sets that
    shard run Crashed (its process is gone), the pipeline submits it again and the other
    worker runs it; the run completes. About 3 minutes, so only when asked for (-m slow)."""
    if "slow" not in (request.config.getoption("markexpr") or "").replace("not slow", ""):
        pytest.skip("killed shard worker (waits for the crash watcher): select it with -m slow")
    import signal
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    marks = tmp_path / "marks"
    _shard_project(servers, tmp_path / "proj", marks)
    alive = {pid: name for pid, name in shard_workers.items() if _alive_pid(pid)}
    assert len(alive) == 2, "both shard workers must run"
    with prefect_api(servers):
        fr = run_deployment("quant-pipeline/shard-pool-test", timeout=0, parameters={
            "overrides": ["hold=[0]"], "shard_deployment": SHARD_TEST_DEPLOYMENT, "retries": 1,
            "retry_delay_seconds": 0})
        deadline = time.time() + 300
        while not (marks / "shard-0.1").exists() or not (marks / "shard-1.1").exists():
            assert time.time() < deadline, "the shards never started"
            time.sleep(1)
        victim = _worker_of(marks, "shard-0.1", alive)
        victim_pid = next(p for p, n in alive.items() if n == victim)
        for pid in reversed(_tree(victim_pid)):  # the worker, the shard's flow run process, dvc, the stage
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.time()
        with get_client(sync_client=True) as client:
            while not (state := client.read_flow_run(fr.id).state).is_final():
                assert time.time() - killed < 480, f"pipeline still {state.name} 8 min after the kill"
                time.sleep(5)
    print(f"pipeline {state.name} {time.time() - killed:.0f} s after the kill")
    assert state.is_completed(), state.message
    survivor = next(n for n in alive.values() if n != victim)
    assert _worker_of(marks, "shard-0.2", alive) == survivor  # the retry ran on the other worker
    assert sorted(p.name for p in marks.iterdir() if p.name.startswith("shard-")) == [
        "shard-0.1", "shard-0.2", "shard-1.1"]
    runs = [r for r in _shard_runs(servers) if r.parent_task_run_id and r.name.startswith(f"{fr.name}/")]
    states = {}
    for r in runs:
        states.setdefault(r.name.rsplit("/", 1)[1], []).append(r.state)
    assert [s.name for s in states["shard@0"]] == ["Crashed", "Completed"], states
    assert "is gone" in states["shard@0"][0].message
    assert [s.name for s in states["shard@1"]] == ["Completed"]
    stages = table(flow_artifacts(servers, str(fr.id))["artifacts"]["quant-stages"])
    assert [(r["stage"], r["status"]) for r in stages] == [
        ("prep", "ran"), ("shard@0", "ran"), ("shard@1", "ran"), ("merge", "ran")]


def _alive_pid(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
