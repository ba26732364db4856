"""The DVC side of the pipeline flow (flows/dvc_stages.py) on small DVC projects built here:
graph reading with foreach expansion, wave planning, overrides through DVC's -S machinery,
one `dvc repro --single-item` with its ran / up-to-date / failure outcomes. No Prefect API."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from flows import dvc_stages, scratch
from flows.dvc_stages import OverrideError, StageFailed, StageGraph


def make_project(root: Path, dvc_yaml: str, params: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(textwrap.dedent(dvc_yaml))
    (root / "params.yaml").write_text(textwrap.dedent(params))
    for name, text in (files or {}).items():
        (root / name).write_text(textwrap.dedent(text))
    return root


TOY_DVC = """\
    stages:
      prep:
        cmd: python -c "open('prep.txt', 'w').write('p')"
        outs: [prep.txt]
      shard:
        foreach: ${shards}
        do:
          cmd: python -c "open('shard-${item}.txt', 'w').write('${item}')"
          deps: [prep.txt]
          outs: ["shard-${item}.txt"]
      merge:
        cmd: python -c "open('merged.txt', 'w').write('m')"
        deps: [shard-0.txt, shard-1.txt]
        params: [shards]
        outs: [merged.txt]
      report:
        cmd: python -c "open('report.md', 'w').write('| a |')"
        deps: [merged.txt]
        outs:
          - report.md:
              cache: false
"""
TOY_PARAMS = """\
    # the shards
    shards: [0, 1]   # one process each
    nested:
      lr: 0.1
"""


@pytest.fixture
def toy(tmp_path) -> Path:
    return make_project(tmp_path / "toy", TOY_DVC, TOY_PARAMS)


def test_read_graph_expands_foreach_and_keeps_dvc_yaml_order(toy):
    g = dvc_stages.read_graph(toy)
    assert g.order == ["prep", "shard@0", "shard@1", "merge", "report"]
    assert g.upstream == {"prep": set(), "shard@0": {"prep"}, "shard@1": {"prep"},
                          "merge": {"shard@0", "shard@1"}, "report": {"merge"}}
    assert dvc_stages.waves(g) == [["prep"], ["shard@0", "shard@1"], ["merge"], ["report"]]


def test_graph_follows_params_overrides(toy):
    dvc_stages.apply_overrides(toy, ["shards=[0,1,2]"])
    g = dvc_stages.read_graph(toy)
    assert [s for s in g.order if s.startswith("shard@")] == ["shard@0", "shard@1", "shard@2"]


def test_waves_group_only_foreach_items_and_respect_dependencies():
    g = StageGraph(
        order=["a", "b", "syn@0", "syn@1", "syn@2", "c"],
        upstream={"a": set(), "b": set(), "syn@0": {"a"}, "syn@1": {"a"}, "syn@2": {"a"},
                  "c": {"syn@0", "syn@1", "syn@2", "b"}},
    )
    # independent plain stages run one at a time (they may each want every GPU)
    assert dvc_stages.waves(g) == [["a"], ["b"], ["syn@0", "syn@1", "syn@2"], ["c"]]
    # an item that waits for another item of its family lands in a later wave
    g2 = StageGraph(order=["x@0", "x@1"], upstream={"x@0": set(), "x@1": {"x@0"}})
    assert dvc_stages.waves(g2) == [["x@0"], ["x@1"]]
    # targets: the stage and its upstream, a foreach family by its name
    assert dvc_stages.waves(dvc_stages.restrict(g, ["syn"])) == [["a"], ["syn@0", "syn@1", "syn@2"]]
    assert dvc_stages.restrict(g, ["b"]).order == ["b"]
    with pytest.raises(ValueError, match=r"targets \['d'\] are not stages of dvc.yaml; known: \['a', 'b', 'c', 'syn'\]"):
        dvc_stages.restrict(g, ["d"])
    cyclic = StageGraph(order=["a", "b"], upstream={"a": {"b"}, "b": {"a"}})
    with pytest.raises(ValueError, match="cycle"):
        dvc_stages.waves(cyclic)


def test_overrides_change_values_keep_comments_and_reject_bad_ones(toy):
    before = (toy / "params.yaml").read_text()
    dvc_stages.apply_overrides(toy, ["nested.lr=0.5", "params.yaml:shards=[3]"])
    text = (toy / "params.yaml").read_text()
    assert yaml.safe_load(text) == {"shards": [3], "nested": {"lr": 0.5}}
    assert "# one process each" in text and "# the shards" in text
    (toy / "params.yaml").write_text(before)

    with pytest.raises(OverrideError, match=r"override 'nested\.typo=1'"):
        dvc_stages.apply_overrides(toy, ["nested.lr=0.9", "nested.typo=1"])
    assert (toy / "params.yaml").read_text() == before  # all or nothing
    with pytest.raises(OverrideError, match=r"overrides\[0\]='bits'.*key=value"):
        dvc_stages.apply_overrides(toy, ["bits"])
    with pytest.raises(OverrideError, match="params file 'other.yaml' not found"):
        dvc_stages.apply_overrides(toy, ["other.yaml:a=1"])


def test_repro_reports_ran_then_up_to_date(toy, tmp_path):
    env = dvc_stages.stage_env(dict(__import__("os").environ))
    r = dvc_stages.repro("prep", toy, env, tmp_path / "logs" / "prep.log")
    assert r.ran and (toy / "prep.txt").read_text() == "p"
    r = dvc_stages.repro("prep", toy, env, tmp_path / "logs" / "prep.log")
    assert not r.ran
    assert "didn't change" in (tmp_path / "logs" / "prep.log").read_text()


def test_repro_failure_tells_bad_params_from_other_errors(tmp_path):
    import os

    proj = make_project(tmp_path / "bad", """\
        stages:
          config:
            cmd: python fail.py 2
          crash:
            cmd: python fail.py 1
        """, "a: 1\n", {"fail.py": """\
        import sys
        print("error: calibrate.samples=-1 must be positive")  # what tasks.common.main prints
        sys.exit(int(sys.argv[1]))
        """})
    env = dvc_stages.stage_env(dict(os.environ))
    with pytest.raises(StageFailed, match="bad params") as exc:
        dvc_stages.repro("config", proj, env, tmp_path / "c.log")
    assert exc.value.config_error and "calibrate.samples=-1" in str(exc.value)
    with pytest.raises(StageFailed, match="exit code") as exc:
        dvc_stages.repro("crash", proj, env, tmp_path / "d.log")
    assert not exc.value.config_error


def test_gpu_slots_follow_cuda_visible_devices():
    assert dvc_stages.gpu_slots({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert dvc_stages.gpu_slots({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert dvc_stages.gpu_slots({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_metrics_and_report_files(toy):
    import os

    env = dvc_stages.stage_env(dict(os.environ))
    for stage in ("prep", "shard@0", "shard@1", "merge", "report"):
        dvc_stages.repro(stage, toy, env, toy / "log.txt")
    assert [p.name for p in dvc_stages.report_files(toy)] == ["report.md"]
    assert dvc_stages.metrics(toy) == {}


ROOT = Path(__file__).resolve().parents[2]


def test_overrides_on_the_real_params_apply_together_and_write_nothing():
    before = (ROOT / "params.yaml").read_bytes()
    r = dvc_stages.resolve_overrides(ROOT, ["evaluate.max_windows=2"])
    assert yaml.safe_load(r.texts["params.yaml"])["evaluate"]["max_windows"] == 2
    # the sequence that once wrote invalid YAML, one run after the other and both at once
    for overrides in (["scheme.weight.format=int3"], ["evaluate.tasks=[]"],
                      ["scheme.weight.format=int3", "evaluate.tasks=[]", "evaluate.max_windows=2"]):
        r = dvc_stages.resolve_overrides(ROOT, overrides)
        new = yaml.safe_load(r.texts["params.yaml"])  # parses
        old = yaml.safe_load(before)
        for o in overrides:
            key, value = o.split("=")
            section, *rest = key.split(".")
            node_new, node_old = new[section], old[section]
            for part in rest[:-1]:
                node_new, node_old = node_new[part], node_old[part]
            node_old[rest[-1]] = yaml.safe_load(value)
        assert new == old  # exactly the overridden keys changed
    with pytest.raises(OverrideError, match=r"unknown key 'evaluate\.max_windowz'.*known: \[.*'max_windows'"):
        dvc_stages.resolve_overrides(ROOT, ["evaluate.max_windows=2", "evaluate.max_windowz=2"])
    with pytest.raises(OverrideError, match=r"scheme\.weight\.format='int9'.*2\.\.8 bits"):
        dvc_stages.resolve_overrides(ROOT, ["scheme.weight.format=int9"])
    with pytest.raises(OverrideError, match=r"evaluate\.batch_size=0 must be >= 1"):
        dvc_stages.resolve_overrides(ROOT, ["evaluate.batch_size=0"])
    assert (ROOT / "params.yaml").read_bytes() == before


def test_scratch_checkout_reuses_the_cache_and_leaves_the_checkout_alone(toy, tmp_path):
    import os

    env = dvc_stages.stage_env(dict(os.environ))
    assert dvc_stages.repro("prep", toy, env, tmp_path / "prep.log").ran
    before = (toy / "params.yaml").read_bytes()
    resolved = dvc_stages.resolve_overrides(toy, ["nested.lr=0.5", "shards=[0,1,2]"])
    assert (toy / "params.yaml").read_bytes() == before
    work = scratch.scratch_checkout(toy, tmp_path / "scratch", resolved)
    assert yaml.safe_load((work / "params.yaml").read_text()) == {"shards": [0, 1, 2], "nested": {"lr": 0.5}}
    assert [s for s in dvc_stages.read_graph(work).order if s.startswith("shard@")] == [
        "shard@0", "shard@1", "shard@2"]
    # prep is unaffected by the overrides: checked out of the shared cache, not rerun
    assert not dvc_stages.repro("prep", work, env, tmp_path / "s.log").ran
    assert dvc_stages.repro("shard@2", work, env, tmp_path / "s.log").ran
    assert not (toy / "shard-2.txt").exists() and (work / "shard-2.txt").read_text() == "2"
    kept = scratch.keep_results(work, tmp_path / "kept")
    assert {p.name for p in kept} == {"params.yaml", "dvc.lock"}
    assert "shard@2" in (tmp_path / "kept" / "dvc.lock").read_text()
    assert (toy / "params.yaml").read_bytes() == before and "shard@2" not in (toy / "dvc.lock").read_text()


def test_a_failed_stage_says_in_one_line_what_went_wrong():
    tb = ("Running stage 'evaluate':\n> python -m tasks.evaluate\nTraceback (most recent call last):\n"
          '  File "x.py", line 1\nRuntimeError: CUDA out of memory\n'
          "ERROR: failed to reproduce 'evaluate': failed to run: python -m tasks.evaluate, exited with 1\n")
    assert dvc_stages.one_line_error(tb) == "RuntimeError: CUDA out of memory"
    bad = "Running stage 'calibrate':\nerror: calibrate.samples=-1 must be positive\nERROR: failed to reproduce\n"
    assert dvc_stages.one_line_error(bad) == "error: calibrate.samples=-1 must be positive"
    assert dvc_stages.one_line_error("Killed\nERROR: failed to reproduce 'x': exited with -9\n") == "Killed"
    err = StageFailed("evaluate", 1, tb, False)
    assert err.reason == "RuntimeError: CUDA out of memory" and "stage 'evaluate' failed (exit code 1)" in str(err)


def test_stage_output_reaches_the_log_file_while_the_stage_runs(tmp_path):
    """Line-buffered log; tqdm bars (carriage returns) go to the progress callback."""
    import os
    import threading
    import time

    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent("""\
        import sys, time
        print("started", flush=True)
        for i in range(1, 5):
            sys.stderr.write(f"\\rshard:  {25 * i}%|##  | {i}/4 [00:01<00:01,  1.0it/s]"); sys.stderr.flush()
        sys.stderr.write("\\n")  # tqdm's close()
        time.sleep(3)
        print("done")
        """))
    log, seen, calls = tmp_path / "s.log", [], []
    env = dvc_stages.stage_env(dict(os.environ))
    t = threading.Thread(target=lambda: seen.append(dvc_stages._run(
        [sys.executable, str(script)], tmp_path, env, log, echo=None, progress=lambda p, ln: calls.append(p))))
    t.start()
    deadline = time.time() + 20
    while "started" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.1)
    assert "started" in log.read_text() and t.is_alive()  # written before the process ended
    t.join()
    rc, text = seen[0]
    assert rc == 0 and "done" in text and "4/4" not in text  # bars are not part of the error text
    assert calls[0] == 25.0 and calls[-1] == 100.0


def test_client_says_make_servers_up_when_the_servers_are_down(monkeypatch, capsys):
    import socket

    from flows import client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert client.main(["run", "-S", "a=1"]) == 2
    err = capsys.readouterr().err
    assert f"the Prefect server is not reachable at http://127.0.0.1:{port}/api" in err
    assert "make servers-up" in err and "Traceback" not in err and "ConnectError" not in err


def test_client_prints_the_failing_stage_and_a_refused_promotion(capsys):
    from prefect.states import Completed, Failed

    from flows import client

    msg = ("Flow run encountered an exception: PipelineFailed: stage 'evaluate' failed: "
           "RuntimeError: CUDA out of memory")
    assert client.report("00000000-0000-0000-0000-000000000000", Failed(message=msg)) == 1
    assert "Flow run Failed: stage 'evaluate' failed: RuntimeError: CUDA out of memory" in capsys.readouterr().err
    refused = "quant-pipeline v2 not promoted; @champion stays v1: gate 'ppl_ratio' failed: ..."
    assert client.report("x", Completed(message=refused)) == 0
    assert f"Flow run finished: Completed ({refused})" in capsys.readouterr().out


def test_shard_refuses_a_checkout_it_does_not_share_and_bad_names(toy, tmp_path, monkeypatch):
    """A shard worker that does not see the pipeline's checkout (no shared filesystem) fails
    saying so, before running anything; so do a non-foreach stage and a malformed deployment."""
    from flows.pool import check_shard_deployment as _check_shard_deployment
    from flows.shard import ShardCheckoutError, _check_checkout, run_shard
    from flows.tracking import file_md5

    md5 = file_md5(toy / "params.yaml")
    _check_checkout(toy, toy, ".", md5)  # the same checkout: fine
    other = make_project(tmp_path / "other", TOY_DVC, "shards: [0, 1, 2]\n")
    with pytest.raises(ShardCheckoutError, match=r"params\.yaml .* has md5 .*another checkout"):
        _check_checkout(other, other, ".", md5)
    with pytest.raises(ShardCheckoutError, match=r"no dvc.yaml at workdir='.state/scratch/x'.*shared filesystem"):
        _check_checkout(toy, toy / ".state" / "scratch" / "x", ".state/scratch/x", md5)
    monkeypatch.chdir(toy)
    with pytest.raises(ValueError, match=r"stage='shard' is not an item of a foreach stage"):
        run_shard.fn("shard")
    for bad in ("shard", "quant-shard/", "a/b/c"):
        with pytest.raises(ValueError, match=rf"shard_deployment='{bad}' must be '<flow>/<deployment>'"):
            _check_shard_deployment(bad, None)


# ---------------------------------------------------------------------------
# A stage's result outlives the process watching it; a broken log pipe ends nothing

SLOW_DVC = """\
    stages:
      slow:
        cmd: python slow.py
        deps: [slow.py]
        outs: [slow.txt]
"""
SLOW_PY = """\
    import time
    open("started", "w").close()
    print("started", flush=True)
    time.sleep(2)
    for i in range(200):  # a stage prints to the end (its MLflow run, its summary)
        print(f"line {i}", flush=True)
    open("slow.txt", "w").write("done")
    """
DRIVER = """\
import os, sys
from pathlib import Path
from flows import dvc_stages
root = Path(sys.argv[1])
dvc_stages.repro("slow", root, dvc_stages.stage_env(dict(os.environ)), root / "slow.log", echo=print)
"""


def test_a_finished_stage_reaches_dvc_lock_and_the_run_cache_after_its_watcher_died(tmp_path):
    """The flow process running `dvc repro` is killed while the stage runs (what a killed
    worker does to it, a minute later, at its next log line): the stage still finishes,
    and DVC records it in dvc.lock and its run cache, so no rerun recomputes it."""
    import os
    import signal
    import time

    proj = make_project(tmp_path / "p", SLOW_DVC, "a: 1\n", {"slow.py": SLOW_PY})
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(proj)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while not (proj / "started").exists():
        assert time.time() < deadline and driver.poll() is None, "the stage never started"
        time.sleep(0.1)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    driver.stdout.close()  # nobody reads what the driver's children write to it any more
    while "slow" not in ((proj / "dvc.lock").read_text() if (proj / "dvc.lock").exists() else ""):
        assert time.time() < deadline, "the finished stage never reached dvc.lock:\n" + (
            (proj / "slow.log").read_text() if (proj / "slow.log").exists() else "")
        time.sleep(0.2)
    assert (proj / "slow.txt").read_text() == "done"
    assert any((proj / ".dvc" / "cache" / "runs").rglob("*")), "no run-cache entry"
    assert "line 199" in (proj / "slow.log").read_text()
    env = dvc_stages.stage_env(dict(os.environ))
    assert dvc_stages.repro("slow", proj, env, tmp_path / "again.log").outcome == dvc_stages.UP_TO_DATE


GUARDED = """\
import logging, os, sys, time
if sys.argv[1] == "guard":
    from flows.liveness import guard_streams
    assert guard_streams()
from prefect.logging.handlers import PrefectConsoleHandler
log = logging.getLogger("broken-pipe-test")
log.addHandler(PrefectConsoleHandler())
log.setLevel(logging.INFO)
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
for i in range(200):
    log.warning("line %d of a flow run whose worker is gone", i)
    print("print", i)
open(sys.argv[3], "w").write("done")
"""


@pytest.mark.parametrize("mode", ["unguarded", "guard"])
def test_a_flow_process_outlives_the_pipe_of_its_dead_worker(tmp_path, mode):
    """The worker holds the read end of the flow process's stdout/stderr. Once it is gone,
    Prefect's console log handler (rich) turns the next line's EPIPE into SystemExit(1);
    behind `guard_streams` the process logs on and finishes."""
    import os

    go, done = tmp_path / "go", tmp_path / "done"
    p = subprocess.Popen([sys.executable, "-c", GUARDED, mode, str(go), str(done)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == b"ready"
    p.stdout.close()
    p.stderr.close()
    go.touch()
    rc = p.wait(timeout=120)
    if mode == "guard":
        assert rc == 0 and done.read_text() == "done"
    else:  # what happened to flow runs whose worker was killed
        assert rc == 1 and not done.exists()


# ---------------------------------------------------------------------------
# Ran, restored from the run cache, or up to date


def test_repro_tells_a_run_cache_restore_from_a_run_and_from_up_to_date(tmp_path):
    import os

    proj = make_project(tmp_path / "rc", """\
        stages:
          s:
            cmd: python -c "import yaml; open('o.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['p']))"
            params: [p]
            outs: [o.txt]
        """, "p: 1\n")
    env = dvc_stages.stage_env(dict(os.environ))
    outcomes = []
    for p in (1, 2, 1, 1):
        (proj / "params.yaml").write_text(f"p: {p}\n")
        outcomes.append(dvc_stages.repro("s", proj, env, tmp_path / "s.log").outcome)
    assert outcomes == ["ran", "ran", "restored", "up to date"]
    assert (proj / "o.txt").read_text() == "1"


def test_make_flow_run_prints_stage_progress_not_every_line(capsys):
    """`make flow-run` follows the run's stage-level log lines and state changes."""
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    from prefect.states import Completed, Running

    from flows import client

    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    lines = ["stages: prepare -> calibrate -> block_ap", "stage prepare: started",
             "stage prepare: restored from the run cache in 3.1s", "stage calibrate: started",
             "Running stage 'calibrate':", "> python -m tasks.calibrate", "rtn: 30 linears quantized",
             "stage calibrate: ran in 40.2s", "stage block_ap: started", "stage block_ap: 40% block 12/30 [01:10<01:45]",
             "stage block_ap: ran in 300.0s"]
    logs = [SimpleNamespace(id=i, timestamp=t0 + timedelta(seconds=i), message=m) for i, m in enumerate(lines)]
    polls = iter([(Running(), 4), (Running(), 9), (Completed(), 11)])
    shown = {"n": 0}

    class Fake:
        def read_flow_run(self, _id):
            state, shown["n"] = next(polls)
            return SimpleNamespace(state=state)

        def read_logs(self, log_filter, sort, offset, limit):
            return logs[: shown["n"]][offset: offset + limit]

    state = client.follow(Fake(), "00000000-0000-0000-0000-000000000001", timeout=60, sleep=lambda s: None)
    assert state.is_completed()
    out = capsys.readouterr().out
    for line in lines:
        assert (line in out) == line.startswith(("stage", "stages")), line
    assert out.count("stage prepare: started") == 1 and "Completed" in out


# ---------------------------------------------------------------------------
# The override check reads the whole effective params


def test_the_override_check_covers_every_section_and_list_items(tmp_path):
    """A bad method option anywhere in the effective params fails before any stage, not
    only in the sections the overrides touch; list items are keys too."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["block_ap"]["steps"] = [{"block-ap": {"epochs": 0}}]  # left in the file, not overridden
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(OverrideError, match=r"block_ap\.steps\[0\]\.block-ap\.epochs=0 must be >= 1"):
        dvc_stages.resolve_overrides(tmp_path, ["evaluate.max_windows=2"])
    with pytest.raises(OverrideError, match=r"params\.yaml rejected: block_ap\.steps\[0\]\.block-ap\.epochs=0"):
        dvc_stages.resolve_overrides(tmp_path, [])
    r = dvc_stages.resolve_overrides(tmp_path, ["block_ap.steps.0.block-ap.epochs=2"])
    assert yaml.safe_load(r.texts["params.yaml"])["block_ap"]["steps"][0]["block-ap"]["epochs"] == 2
    with pytest.raises(OverrideError, match=r"epochz"):
        dvc_stages.resolve_overrides(tmp_path, ["block_ap.steps=[{block-ap: {epochz: 1}}]"])
    with pytest.raises(OverrideError, match=r"unknown key 'block_ap\.steps\.1\.block-ap\.epochs'.*known: \[0\]"):
        dvc_stages.resolve_overrides(tmp_path, ["block_ap.steps.1.block-ap.epochs=2"])


def test_stage_progress_lines_follow_long_bars_and_counts_not_instant_ones(monkeypatch):
    """What `make flow-run` shows of a stage's progress: a line per 10% of a bar or count
    that lasts (block-wise training's `block 12/30`, synthesis' decode steps), once each;
    a bar that comes and goes at once (loading weights) only updates the artifact."""
    from flows import stages

    lines, now = [], [0.0]
    logger = type("L", (), {"info": lambda self, *a: lines.append(a[0] % a[1:]), "debug": lambda self, *a: None})()
    progress = stages.StageProgress("block_ap", logger, clock=lambda: now[0])
    progress.id = "artifact"  # no Prefect API here
    monkeypatch.setattr(stages, "update_progress_artifact", lambda *a, **k: None)
    progress(0.0, "Loading weights:   0%|          | 0/272 [00:00<?, ?it/s]")
    progress(100.0, "Loading weights: 100%|##########| 272/272 [00:00<00:00, 15302.34it/s]")
    for i in range(1, 31):
        now[0] += 4
        progress(100 * i / 30, f"2026-12-05 10:00:53,550 quant.blockwise INFO block-ap: block {i}/30 val mse 0.04")
    progress(100.0, "2026-12-05 10:03:19,800 quant.blockwise INFO block-ap: block 30/30 val mse 0.04")
    assert lines == [f"stage block_ap: {p}% block {p * 30 // 100}/30" for p in range(10, 101, 10)]
    assert dvc_stages.progress_of("e2e:  40%|####      | 4/10 [00:10<00:14,  2.0s/it]") == (
        4, 10, "e2e 4/10 [00:10<00:14]")
    assert dvc_stages.progress_of("kept block 31/30") is None and dvc_stages.progress_of("no count") is None
