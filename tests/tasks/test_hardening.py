"""Hardening catalogue: bad inputs, kills and repeated runs, grouped by kind.

Every case either gets a clear one-line error naming the file or field, or is handled
(run marked FAILED, temporaries removed, outputs restorable). The e2e non-finite check
and Block-AP's better-state choice are tested with their code (tests/quant/e2e/test_e2e.py,
tests/quant/blockwise/test_block_ap.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quant.config import ConfigError, InputError
from quant.synth.merge import MergeConfig, merge
from quant.synth.store import RECORDS, ShardWriter
from tasks import common, tracking

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store for this test; yields a client."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, "hardening")
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    yield mlflow.MlflowClient(tracking_uri=uri)
    while mlflow.active_run():
        mlflow.end_run()


def runs_of(client, stage: str | None = None):
    exp = client.get_experiment_by_name("hardening")
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if stage is None or r.data.tags.get("stage") == stage]


def stage_env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           tracking.EXPERIMENT_ENV: "hardening", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    env.pop(tracking.PARENT_RUN_ENV, None)
    return env


def workdir_with_params(tmp: Path, text: str | None = None) -> Path:
    """A working directory holding params.yaml (the repository's, or `text`)."""
    work = tmp / "work"
    work.mkdir()
    (work / "params.yaml").write_text((ROOT / "params.yaml").read_text() if text is None else text)
    return work


def set_params(work: Path, updates: dict) -> None:
    p = work / "params.yaml"
    params = yaml.safe_load(p.read_text())
    for dotted, value in updates.items():
        *path, last = dotted.split(".")
        d = params
        for k in path:
            d = d.setdefault(k, {})
        d[last] = value
    p.write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(module: str, work: Path, tmp: Path, *args: str, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=work, env=stage_env(tmp),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r, *needles: str, code: int = 2) -> None:
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]


# ---------------------------------------------------------------------------
# Silent wrong results: shards


def publish_shard(d: Path, records: list[dict]) -> Path:
    run = {"params": {"seq_len": 4}, "vocab_size": 16, "eos_ids": [2], "shard": 0}
    w = ShardWriter(d / "work", run)
    w.append(records)
    return w.publish(d / "shard-0", {"shard": 0, "num_shards": 1, "sequences": len(records)})


def toy_records(n: int = 6) -> list[dict]:
    return [{"index": i, "start_id": 3 + i, "prefix_len": 1, "finish": "length", "logprob": -1.0,
             "ids": [3 + i, 4, 5, 6], "text": "x"} for i in range(n)]


def test_merge_rejects_a_shard_whose_token_ids_were_changed(tmp_path):
    shard = publish_shard(tmp_path, toy_records())
    manifest = json.loads((shard / "manifest.json").read_text())
    assert len(manifest["records_sha256"]) == 64
    out = tmp_path / "out"
    out.mkdir()
    merge([shard], MergeConfig(val_fraction=0.0), 0, out)  # untouched: fine
    path = shard / RECORDS
    path.write_text(path.read_text().replace('"ids":[3,4,5,6]', '"ids":[3,4,5,7]'))  # still valid JSON
    with pytest.raises(InputError, match=rf"{path}: the records do not match records_sha256"):
        merge([shard], MergeConfig(val_fraction=0.0), 0, out)


def test_second_process_on_the_same_shard_fails_at_once(tmp_path):
    w = ShardWriter(tmp_path / "w", {"x": 1})
    code = ("import sys; from quant.synth.store import ShardWriter; from quant.config import InputError\n"
            f"try: ShardWriter({str(tmp_path / 'w')!r}, {{'x': 1}})\n"
            "except InputError as e: print(e); sys.exit(2)\n")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "is being written by another process" in r.stdout, r.stdout + r.stderr
    assert time.time() - t0 < 60
    w.close()
    ShardWriter(tmp_path / "w", {"x": 1}).close()  # free again once the first writer is done


# ---------------------------------------------------------------------------
# Orphans and leaks

FAKE_STAGE = """
import sys, time
from pathlib import Path
from quant.io import atomic_dir
from tasks import common

def run(params):
    with atomic_dir(common.stage_dir("calibrate") / "model") as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        Path("started").write_text("1")
        time.sleep(120)
    return {}

common.main("calibrate", run)
"""


def wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_marks_the_run_failed_and_removes_temporaries(tmp_path, store, sig):
    work = workdir_with_params(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", FAKE_STAGE], cwd=work, env=stage_env(tmp_path),
                         stderr=subprocess.PIPE, text=True)
    wait_for(work / "started")
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "Traceback" not in err
    assert list((work / "artifacts" / "calibrate").iterdir()) == []  # no .model.tmp-*
    (run,) = runs_of(store, "calibrate")
    assert run.info.status == "FAILED"
    assert "stopped by" in run.data.tags["error"] and run.data.tags["pid"] == str(p.pid)
    assert run.data.tags["host"] == socket.gethostname()


def test_stage_dies_with_its_parent(tmp_path, store):
    """SIGKILL to the parent (dvc) must not leave the stage writing on its own."""
    work = workdir_with_params(tmp_path)
    (work / "stage.py").write_text(FAKE_STAGE)
    parent = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, 'stage.py'])\n"
              "open('child.pid', 'w').write(str(p.pid))\n"
              "time.sleep(300)\n")
    dad = subprocess.Popen([sys.executable, "-c", parent], cwd=work, env=stage_env(tmp_path))
    wait_for(work / "started")
    child = int((work / "child.pid").read_text())
    dad.kill()
    dad.wait()
    deadline = time.time() + 60
    while tracking.process_alive(child, "") and time.time() < deadline:
        time.sleep(0.1)
    assert not tracking.process_alive(child, ""), "stage outlived its parent"
    (run,) = runs_of(store, "calibrate")
    assert run.info.status == "FAILED" and "SIGTERM" in run.data.tags["error"]
    assert list((work / "artifacts" / "calibrate").iterdir()) == []


def test_orphaned_running_run_is_marked_failed_at_the_next_start(store):
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.set_experiment("hardening")
    host = socket.gethostname()
    gone = store.create_run(exp.experiment_id, run_name="e2e",
                            tags={"stage": "e2e", "pid": str(dead_pid()), "host": host})
    alive = store.create_run(exp.experiment_id, run_name="e2e",
                             tags={"stage": "e2e", "pid": str(os.getpid()), "host": host,
                                   "pid_start": tracking.process_start(os.getpid())})
    elsewhere = store.create_run(exp.experiment_id, run_name="e2e",
                                 tags={"stage": "e2e", "pid": "1", "host": "another-host"})
    other_stage = store.create_run(exp.experiment_id, run_name="evaluate",
                                   tags={"stage": "evaluate", "pid": str(dead_pid()), "host": host})
    with tracking.stage_run("e2e", {}):
        pass
    status = lambda r: store.get_run(r.info.run_id).info.status  # noqa: E731
    assert status(gone) == "FAILED"
    assert "ended without closing this run" in store.get_run(gone.info.run_id).data.tags["error"]
    assert status(other_stage) == "FAILED"  # any stage's start ends any stage's orphans on this host
    assert [status(alive), status(elsewhere)] == ["RUNNING"] * 2


def test_stale_temporaries_of_killed_runs_are_removed_on_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage = tmp_path / "artifacts" / "calibrate"
    stage.mkdir(parents=True)
    (tmp_path / "metrics").mkdir()
    dead = dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [stage / f".model.tmp-{dead}-abc", stage / ".model.tmp-k2j_x1",  # new and old format
                 stage / f".model.old-{dead}", tmp_path / "metrics" / f".calibrate.json.tmp-{dead}-q"]
        live = [stage / f".model.tmp-{sleeper.pid}-abc", tmp_path / "artifacts" / ".merge.tmp-k2j_x1"]
        for p in stale + live:
            if "json" in p.name:
                p.write_text("{")
            else:
                p.mkdir()
        (stage / "model").mkdir()
        removed = common.clean_stale_temporaries("calibrate")
        assert sorted(p.resolve() for p in removed) == sorted(stale)
        assert all(p.exists() for p in live) and (stage / "model").is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_outputs_get_umask_permissions(tmp_path):
    from quant.io import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as d:
            (d / "w.bin").write_bytes(b"1")
        common.write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------
# Clear errors instead of tracebacks


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from conftest import make_tiny_llama

    out = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_llama().save_pretrained(out)
    return out


def damaged_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_a_clear_error(tiny_model_dir, tmp_path, damage):
    from quant.load import load_model

    d = damaged_copy(tiny_model_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file" * 4)
    with pytest.raises(InputError, match=rf"{f} is corrupt or truncated"):
        load_model(d)


def test_config_json_that_is_not_json_is_a_clear_error(tiny_model_dir, tmp_path):
    from quant.load import load_model

    d = damaged_copy(tiny_model_dir, tmp_path / "m")
    (d / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(InputError, match=rf"{d / 'config.json'} is not valid JSON"):
        load_model(d)


def test_truncated_line_in_a_published_shard_names_the_file(tmp_path):
    shard = publish_shard(tmp_path, toy_records())
    path = shard / RECORDS
    path.write_bytes(path.read_bytes()[:-20])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=rf"{path}: line 6 is truncated"):
        merge([shard], MergeConfig(val_fraction=0.0), 0, out)


def test_corrupt_record_in_a_resume_file_is_a_config_error(tmp_path):
    w = ShardWriter(tmp_path / "w", {"x": 1})
    w.append([{"index": 0, "ids": [1]}])
    w.close()
    with open(tmp_path / "w" / RECORDS, "a") as f:
        f.write("{not json}\n")
    with pytest.raises(InputError, match=r"sequences.jsonl: record 2 is corrupt"):
        ShardWriter(tmp_path / "w", {"x": 1})
    assert issubclass(InputError, ConfigError)  # main() turns it into one line and exit 2


def test_invalid_yaml_exits_2_with_one_line_and_a_failed_run(tmp_path, store):
    work = workdir_with_params(tmp_path, "base:\n  seed: 0\n device: cpu\n")
    r = run_stage("tasks.calibrate", work, tmp_path)
    assert_one_line_error(r, "params.yaml is not valid YAML at line 3")
    (run,) = runs_of(store, "calibrate")
    assert run.info.status == "FAILED" and "not valid YAML" in run.data.tags["error"]
    assert run.data.tags["mlflow.note.content"] == run.data.tags["error"]


def test_unreachable_hub_dataset_fails_after_one_short_attempt(monkeypatch):
    from tasks import textdata

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"prepare\.calib_source='wikitext2': the Hugging Face Hub dataset "
                                          r"'wikitext' is not reachable from here .*HF_DATASETS_OFFLINE=1"):
        textdata.hf_texts("wikitext2", "train")
    assert time.time() - t0 < textdata.HUB_PROBE_SECONDS + 5


# ---------------------------------------------------------------------------
# Params


def test_empty_params_file_is_an_error(tmp_path):
    (tmp_path / "params.yaml").write_text("# nothing\n")
    with pytest.raises(ConfigError, match=r"params.yaml is empty"):
        common.load_params(tmp_path / "params.yaml")


def test_unknown_top_level_section_is_an_error(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text() + "\ncalibrat:\n  samples: 4\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['calibrat'\] in .*accepted sections: \["):
        common.load_params(tmp_path / "params.yaml")


def test_repository_params_load():  # the check above must not reject the real file
    params = common.load_params(ROOT / "params.yaml")
    assert set(params.sections) <= common.known_sections()


def test_negative_threads_is_an_error():
    with pytest.raises(ConfigError, match=r"^base\.threads=-1 must be >= 0"):
        common.BaseParams.from_dict({"threads": -1}, "base")


@pytest.mark.parametrize(("values", "message"), [
    ({"seq_len": 0}, r"^calibrate\.seq_len=0 must be >= 2 \(one input and one target token\)$"),
    ({"seq_len": 1}, r"^calibrate\.seq_len=1 must be >= 2"),
    ({"samples": 0}, r"^calibrate\.samples=0 must be >= 1$"),
])
def test_calibrate_checks_name_only_the_wrong_field(values, message):
    from tasks.calibrate import CalibrateConfig

    with pytest.raises(ConfigError, match=message):
        CalibrateConfig.from_dict(values, "calibrate")


@pytest.mark.parametrize(("updates", "field"), [
    ({"base.threads": -2}, "base.threads"),
    ({"model.revision": 3}, "model.revision"),
    ({"scheme.weight.group_size": 0}, "scheme.weight.group_size"),
])
def test_shared_section_errors_leave_a_failed_run(tmp_path, store, updates, field):
    work = workdir_with_params(tmp_path)
    set_params(work, updates)
    r = run_stage("tasks.calibrate", work, tmp_path)
    assert_one_line_error(r, field)
    (run,) = runs_of(store, "calibrate")
    assert run.info.status == "FAILED" and field in run.data.tags["error"]


# ---------------------------------------------------------------------------
# Checks that need only config.json run before the weights load


def test_group_size_against_in_features_is_checked_before_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    from tasks import calibrate

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "artifacts" / "prepare" / "model"
    model.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", model)  # hidden 64, intermediate 128: no weights at all
    params = common.load_params(ROOT / "params.yaml")
    raw = {**params.scheme.to_dict()}
    raw["weight"] = {**raw["weight"], "group_size": 48}
    from quant.config.scheme import QuantScheme

    params = common.Params(params.base, params.model, QuantScheme.from_dict(raw, "scheme"), params.sections)
    monkeypatch.setattr(calibrate, "load_quantized", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(ConfigError, match=r"scheme\.weight\.group_size=48 does not divide in_features=64 of "
                                          r"q_proj/k_proj/v_proj/gate_proj/up_proj \(hidden_size\)"):
        calibrate.run(params)


def test_inconsistent_head_counts_are_caught_from_config_json(tiny_model_dir, tmp_path):
    from quant.checkpoint import check_scheme_fits
    from quant.config.scheme import QuantScheme

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(InputError, match=r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        check_scheme_fits(tmp_path, QuantScheme.from_dict({}, "scheme"))


# ---------------------------------------------------------------------------
# synthesize says that it resumed, and from where


def test_synthesize_logs_where_it_resumed(tmp_path, caplog):
    from tests.tasks.test_synth import cfg_of, save_tiny_model
    from tests.tasks.test_synth import run_shard as run_tiny_shard

    model_dir = save_tiny_model(tmp_path / "model")
    cfg = cfg_of(num_start_ids=4, seq_len=8, batch_size=2)
    run_tiny_shard(cfg, 0, model_dir, tmp_path)
    # turn the published shard back into an interrupted work directory holding 2 records
    work = tmp_path / "work" / "shard-0"
    shutil.move(tmp_path / "shard-0", work)
    manifest = json.loads((work / "manifest.json").read_text())
    (work / "manifest.json").write_text(json.dumps({"complete": False, "run": manifest["run"]}))
    lines = (work / RECORDS).read_text().splitlines(keepends=True)
    (work / RECORDS).write_text("".join(lines[:2]))
    with caplog.at_level("INFO", logger="quant"):
        metrics = run_tiny_shard(cfg, 0, model_dir, tmp_path)
    assert metrics["resumed_from"] == 2
    assert f"synthesize shard 0: resuming from record 2 of {len(lines)}" in caplog.text


# ---------------------------------------------------------------------------
# Nothing lost under DVC


def copy_repo(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True, text=True).stdout.split("\n")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file() and not f.startswith(("metrics/", "artifacts/")) and f != "dvc.lock":
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def test_failed_repro_leaves_every_previous_output_restorable(tmp_path):
    """`dvc repro` deletes a stage's outputs before running it; after a failing run, `dvc
    checkout` brings back every output of the last good run, metrics included."""
    from tests.tasks.test_synth import save_tiny_model

    repo = copy_repo(tmp_path / "repo")
    model = save_tiny_model(tmp_path / "tiny")  # a local model directory: prepare copies it in seconds
    set_params(repo, {"base.threads": 2, "model.name_or_path": str(model)})
    env = {**stage_env(repo), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo)}
    dvc = lambda *a: subprocess.run([str(BIN / "dvc"), *a], cwd=repo, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    r = dvc("repro", "prepare")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    outs = ["metrics/prepare.json", "artifacts/prepare/data/calib.txt", "artifacts/prepare/model/config.json"]
    before = {o: (repo / o).read_bytes() for o in outs}
    set_params(repo, {"prepare.wiki_eval_every": 1})  # rejected inside the stage, after DVC removed its outs
    r = dvc("repro", "prepare")
    assert r.returncode != 0 and "prepare.wiki_eval_every=1 must be >= 2" in r.stderr + r.stdout
    assert not any((repo / o).exists() for o in outs)  # what DVC does; the point is getting them back
    r = dvc("checkout", "prepare")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert {o: (repo / o).read_bytes() for o in outs} == before


def test_committed_dvc_lock_is_in_sync_with_the_code_and_params(tmp_path):
    """A fresh clone of the committed state: no stage has changed code or params deps
    against dvc.lock (missing artifacts of a clone are not staleness). Fails until the
    lock is regenerated by `make run` after a change of dvc.yaml, code or params."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=clone, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tracked = set(subprocess.run(["git", "ls-files"], cwd=clone, capture_output=True, text=True,
                                 check=True).stdout.split())
    stale = {}
    for stage, changes in json.loads(r.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):
                stale.setdefault(stage, []).append(change)  # "changed command", "always changed"
                continue
            for path, what in change.get("changed deps", {}).items():
                if path in tracked or any(t.startswith(path.rstrip("/") + "/") for t in tracked):
                    stale.setdefault(stage, []).append(f"{path}: {what}")
    assert stale == {}, f"dvc.lock is stale (run `make run` and commit dvc.lock): {stale}"
