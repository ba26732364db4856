"""MLflow for stages and the flow: the one copy of the tracking rules.

- Tracking URI: `$MLFLOW_TRACKING_URI` if set, else `sqlite:///<repo>/mlflow/mlflow.db`
  with artifacts in `<repo>/mlflow/mlartifacts` (a server decides for itself).
- Experiment: `$QUANT_EXPERIMENT`, else `quant-pipeline`. Creating it on a fresh
  sqlite store is serialised by a file lock (parallel shards would race its migration).
- A stage run (`stage_run`) is nested under `$QUANT_PARENT_RUN_ID` when the flow set
  it, and is tagged with the stage, the process id, host and process start time.
  On an exception (a signal included) it ends FAILED with the error text as tag
  `error` and as the run's description (`mlflow.note.content`); a stage that fails
  before it could open its run (bad params) still leaves such a run (`failed_run`).
  A stage that finishes after its run was marked FAILED from outside (its flow process
  died; the stage ran on under DVC) ends FINISHED without that `error` tag.
- Orphans: at the start of a stage, RUNNING runs of the same stage whose process
  on this host is gone are ended FAILED with a note (`end_orphaned_runs`).
- A store that cannot be used (a full disk, a read-only or corrupt sqlite file, a server
  that refuses) is an `InputError` naming the store and the reason, in one line
  (`StoreError`), not the chain of SQLAlchemy tracebacks underneath.
- `active_mlflow()` is the one "is a stage run active in this process?" check that
  helpers use to log optionally (the library never imports MLflow).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quant.config import InputError

log = logging.getLogger("quant")

ROOT = Path(__file__).resolve().parent.parent
PARENT_RUN_ENV = "QUANT_PARENT_RUN_ID"
EXPERIMENT_ENV = "QUANT_EXPERIMENT"
DEFAULT_EXPERIMENT = "quant-pipeline"
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 5000
ERROR_TAG = "error"
NOTE_TAG = "mlflow.note.content"  # the run description in the MLflow UI


def quiet_telemetry() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the switch MLflow 3 reads
    os.environ.setdefault("DO_NOT_TRACK", "true")


def tracking_uri(root: Path = ROOT) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = Path(root) / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def store_lock(uri: str):
    """A file lock beside a local sqlite store; a no-op for a tracking server."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=600)


def ensure_experiment(client: Any, name: str, uri: str, root: Path = ROOT) -> str:
    """The id of experiment `name`, created (artifacts beside a sqlite store) if missing.
    `client`: an MlflowClient, or the mlflow module (then its own store is the one created)."""
    with store_lock(uri):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = (Path(root) / "mlflow" / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
            with contextlib.suppress(Exception):  # another process (or a server) may race us to it
                client.create_experiment(name, artifact_location=location)
            exp = client.get_experiment_by_name(name)
    return exp.experiment_id


def client(root: Path = ROOT) -> tuple[Any, str]:
    """(MlflowClient, uri) for explicit, thread-safe use (the flow process)."""
    quiet_telemetry()
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    return MlflowClient(uri), uri


def fluent_mlflow() -> Any:
    """The mlflow module with tracking URI and experiment set (stage processes)."""
    quiet_telemetry()
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    ensure_experiment(mlflow, name, uri)  # the fluent store, created under the lock
    mlflow.set_experiment(name)
    return mlflow


def active_mlflow() -> Any | None:
    """The mlflow module if this process has an active run, else None (nothing is imported)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return None
    return mlflow


def set_tag(key: str, value: Any) -> None:
    """Tag the active stage run (no-op outside one)."""
    mlflow = active_mlflow()
    if mlflow is not None:
        mlflow.set_tag(key, str(value)[:MAX_TAG_CHARS])


def log_step(metrics: dict[str, float], step: int) -> None:
    """Log metrics at `step` on the active stage run (no-op outside one)."""
    mlflow = active_mlflow()
    if mlflow is not None:
        mlflow.log_metrics(metrics, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Attach a file or directory to the active stage run (no-op outside one)."""
    mlflow = active_mlflow()
    if mlflow is None:
        return
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path)


def params_items(params: dict[str, Any]) -> list[tuple[str, str]]:
    """Params as MLflow stores them: sorted, None as "None", long values cut."""
    return sorted((k, ("None" if v is None else str(v))[:MAX_PARAM_CHARS]) for k, v in params.items())


# ---------------------------------------------------------------------------
# Process identity (to tell a live run from an orphan)


def process_start(pid: int) -> str:
    """Start time of `pid` in clock ticks since boot ("" where /proc is not available)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5)


def process_tags() -> dict[str, str]:
    pid = os.getpid()
    return {"pid": str(pid), "host": socket.gethostname(), "pid_start": process_start(pid)}


def process_alive(pid: int, start: str) -> bool:
    """True if `pid` runs (not a zombie) and, when `start` is known, is the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # exited, not yet reaped
    except OSError:
        pass
    return not start or process_start(pid) in ("", start)  # a reused pid has another start time


def end_orphaned_runs(client: Any, experiment_id: str, stage: str | None = None) -> list[str]:
    """End RUNNING runs of `stage` (None: of every stage) whose process on this host is gone;
    returns their ids."""
    host = socket.gethostname()
    which = f"tags.stage = '{stage}'" if stage else "tags.stage != ''"
    runs = client.search_runs(
        [experiment_id], filter_string=f"{which} and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    ended = []
    for r in runs:
        tags = r.data.tags
        if tags.get("host") != host or not tags.get("pid", "").isdigit():
            continue  # another machine's run, or one from before pids were recorded
        if process_alive(int(tags["pid"]), tags.get("pid_start", "")):
            continue
        note = (f"process {tags['pid']} on {host} ended without closing this run (killed); marked FAILED at "
                f"the next {stage or 'stage'} start")
        client.set_tag(r.info.run_id, ERROR_TAG, note)
        client.set_tag(r.info.run_id, NOTE_TAG, note)
        client.set_terminated(r.info.run_id, "FAILED")
        log.warning("mlflow run %s (%s): %s", r.info.run_id, stage, note)
        ended.append(r.info.run_id)
    return ended


# ---------------------------------------------------------------------------
# Stage runs


def error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, ValueError | RuntimeError) else f"{type(exc).__name__}: {text}"


class StoreError(InputError):
    """The MLflow store cannot be used; the message names it and says why (one line)."""


def _is_store_error(exc: BaseException, mlflow_too: bool = True) -> bool:
    """An exception of the tracking store's database (SQLAlchemy, sqlite, alembic) or, with
    `mlflow_too` (the store's own calls: opening it, ending the run), of MLflow itself."""
    packages = ("sqlalchemy", "sqlite3", "alembic", *(("mlflow",) if mlflow_too else ()))
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__module__.split(".")[0] in packages:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def store_error(exc: BaseException, uri: str | None = None) -> StoreError:
    """A one-line StoreError for `exc`: the store, and the innermost reason (sqlite's own words,
    e.g. "database or disk is full")."""
    uri = uri or tracking_uri()
    reasons: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        orig = getattr(seen, "orig", None)  # SQLAlchemy wraps the DB-API error
        text = str(orig if orig is not None else seen).strip().splitlines()
        if text:
            reasons.append(text[0][:300])
        seen = seen.__cause__ or seen.__context__
    reason = reasons[-1] if reasons else type(exc).__name__
    where = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri
    return StoreError(f"the MLflow store {where} cannot be used: {reason}; free space or fix it (or point "
                      "MLFLOW_TRACKING_URI at another store) and run the stage again")


_current: dict[str, str] = {}  # the stage run of this process: uri, run_id (for fail_current_run)


def fail_current_run(text: str) -> None:
    """Mark this process's stage run FAILED from any thread (the signal watchdog); best effort."""
    if not _current:
        return
    with contextlib.suppress(Exception):
        from mlflow.tracking import MlflowClient

        c = MlflowClient(_current["uri"])
        c.set_tag(_current["run_id"], ERROR_TAG, text)
        c.set_tag(_current["run_id"], NOTE_TAG, text)
        c.set_terminated(_current["run_id"], "FAILED")


def _mark_failed(mlflow: Any, exc: BaseException) -> None:
    text = error_text(exc)[:MAX_TAG_CHARS]
    with contextlib.suppress(Exception):  # never hide the stage's own error behind a tracking one
        mlflow.set_tags({ERROR_TAG: text, NOTE_TAG: text})
    with contextlib.suppress(Exception):  # a store that broke mid-run: the stage's error still reads
        mlflow.end_run(status="FAILED")


def _start(stage: str) -> Any:
    mlflow = fluent_mlflow()
    with contextlib.suppress(Exception):  # the sweep is housekeeping: never fail a stage on it
        exp = mlflow.get_experiment_by_name(experiment_name())
        end_orphaned_runs(mlflow.MlflowClient(tracking_uri()), exp.experiment_id)
    tags = {"stage": stage, **process_tags()}
    parent = os.environ.get(PARENT_RUN_ENV) or None
    if parent:
        tags["mlflow.parentRunId"] = parent
    # the flow names the run after the DVC stage item it runs (`synthesize@0`)
    mlflow.start_run(run_name=os.environ.get("QUANT_STAGE_RUN_NAME") or stage, tags=tags)
    return mlflow


@contextmanager
def stage_run(stage: str, params: dict[str, Any]) -> Iterator[Any]:
    """One MLflow run for a stage; yields the mlflow module with the run active.

    On an exception (a signal included) the run ends FAILED with the error text, and the
    exception propagates."""
    try:
        mlflow = _start(stage)
    except Exception as exc:
        if not _is_store_error(exc):
            raise
        raise store_error(exc) from None
    run = mlflow.active_run()
    _current.update(uri=tracking_uri(), run_id=run.info.run_id)
    try:
        items = params_items(params)
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        yield mlflow
    except BaseException as exc:
        _mark_failed(mlflow, exc)
        if isinstance(exc, Exception) and not isinstance(exc, InputError) and _is_store_error(exc, False):
            raise store_error(exc) from None
        raise
    _clear_outside_failure(mlflow, run.info.run_id)
    try:
        mlflow.end_run(status="FINISHED")
    except Exception as exc:
        if not _is_store_error(exc):
            raise
        raise store_error(exc) from None
    finally:
        _current.clear()
    log.info("mlflow run %s (%s) finished", run.info.run_id, stage)


def _clear_outside_failure(mlflow: Any, run_id: str) -> None:
    """A stage that finishes after its run was marked FAILED from outside (its flow process
    died and the reaper closed the runs it left; the stage, DVC's child, ran on) drops the
    `error` tag that no longer holds, and says so in the description."""
    with contextlib.suppress(Exception):  # housekeeping: never fail a finished stage on it
        tags = mlflow.get_run(run_id).data.tags
        if ERROR_TAG in tags:
            mlflow.delete_tag(ERROR_TAG)
            mlflow.set_tags({NOTE_TAG: f"finished after being marked failed from outside ({tags[ERROR_TAG]})"[
                :MAX_TAG_CHARS], "status_detail": "ok"})


def failed_run(stage: str, exc: BaseException) -> None:
    """A FAILED run carrying the error, for a stage that failed before it could open its run."""
    with contextlib.suppress(Exception):  # an unreachable store must not hide the real error
        mlflow = _start(stage)
        _mark_failed(mlflow, exc)
