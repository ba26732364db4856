"""MLflow wiring of stages: nesting under a parent run, FAILED on error, safe metric names."""

from __future__ import annotations

import pytest

from tasks import common


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(common.EXPERIMENT_ENV, "test-tracking")
    monkeypatch.delenv(common.PARENT_RUN_ENV, raising=False)
    yield mlflow.MlflowClient(tracking_uri=uri)
    while mlflow.active_run():
        mlflow.end_run()


def test_stage_nests_under_parent_and_logs(tracking, monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(common.tracking_uri())
    exp = mlflow.set_experiment("test-tracking")
    parent = tracking.create_run(exp.experiment_id, run_name="pipeline")
    monkeypatch.setenv(common.PARENT_RUN_ENV, parent.info.run_id)
    with common.stage_run("calibrate", {"scheme.weight.format": "int4", "x": None}) as ml:
        common.log_metrics(ml, {"ppl": {"lee": 30.5}, "method": "rtn", "n": 3})
        run_id = ml.active_run().info.run_id
    run = tracking.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params == {"scheme.weight.format": "int4", "x": "None"}
    assert run.data.metrics == {"ppl/lee": 30.5, "n": 3.0}
    assert run.info.status == "FINISHED"


def test_failed_stage_is_marked_failed(tracking):
    with pytest.raises(RuntimeError, match="boom"), common.stage_run("evaluate", {}) as ml:
        run_id = ml.active_run().info.run_id
        raise RuntimeError("boom")
    assert tracking.get_run(run_id).info.status == "FAILED"


def test_atomic_file_leaves_old_content_on_failure(tmp_path):
    target = tmp_path / "m.json"
    common.write_json(target, {"a": 1})
    with pytest.raises(ValueError), common.atomic_file(target) as f:
        f.write("partial")
        raise ValueError("killed")
    assert common.read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_params_reject_unknown_section_keys(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("base: {seed: 0, devise: cpu}\n")
    with pytest.raises(common.ConfigError, match=r"unknown key\(s\) \['base\.devise'\]"):
        common.load_params(p)


def test_parallel_stage_processes_share_a_fresh_store(tmp_path):
    """Shards start together on a store that does not exist yet: every run must finish."""
    import os
    import subprocess
    import sys

    import mlflow

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, common.EXPERIMENT_ENV: "race"}
    env.pop(common.PARENT_RUN_ENV, None)
    code = "from tasks import common\nwith common.stage_run('synthesize', {'k': 1}): pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=common.ROOT) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3


def test_a_stage_that_outlives_its_flow_ends_finished_without_the_stale_error(tracking):
    """The flow process died while the stage ran (DVC's child, it runs on and commits); the
    reaper marked its run FAILED meanwhile. When the stage finishes, its run says so."""
    with common.stage_run("calibrate", {}) as ml:
        run_id = ml.active_run().info.run_id
        tracking.set_tag(run_id, "error", "flow run crashed: process 1 is gone")
        tracking.set_tag(run_id, "status_detail", "failed")
    run = tracking.get_run(run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.tags["status_detail"] == "ok"
    assert "finished after being marked failed from outside" in run.data.tags["mlflow.note.content"]
