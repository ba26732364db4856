"""What every stage shares: params, paths, atomic outputs, metrics, one MLflow run.

A stage module defines a frozen `Config` dataclass for its params section and a
`run(params) -> dict` function that does the work; `main(stage, ...)` wires it
to params.yaml, MLflow and the metrics file, and is what `python -m tasks.<stage>`
(and therefore `dvc repro`, the Prefect flow and the tests) executes.

MLflow (rules in tasks/tracking.py): one run per stage process, nested under
`$QUANT_PARENT_RUN_ID` when the Prefect flow set it. A failing stage marks its run
FAILED with the error text and re-raises; nothing is registered. A stage that
fails before its run could open (params.yaml unreadable, bad `base`/`model`/`scheme`)
still leaves a FAILED run with the message.

Params: `main` checks the whole params.yaml (tasks.params_check.check_params, every
section's typed config and the recipe) before the stage does anything, as the flow and
the sweep do: a bad value anywhere fails the first stage that runs, not the one that
reads it hours later.

Process hygiene (`main`): SIGTERM/SIGINT end the stage through its normal error
path (run FAILED, temporaries removed, exit 128+signal); the stage dies with its
parent process (`dvc repro` killed by SIGTERM must not leave it writing on its own);
temporaries that a killed run of the stage left behind are removed at start. Python runs
a signal handler only between bytecodes, so a stage stuck in native code (a collective
waiting for a dead peer, a long kernel) would ignore SIGTERM: a watchdog thread, woken by
the signal itself (`signal.set_wakeup_fd`), ends such a process `SIGNAL_GRACE_SECONDS`
later (its run FAILED, its own temporaries removed) with the same exit status.

Errors: one `error: ...` line on stderr, on a line of its own (after a progress bar's
carriage-return updates, a newline first: `print_error`). An output that cannot be
written (a read-only directory, a full disk) or an MLflow store that cannot be used is
such an error too, naming the path or store.

Exit status: 2 for bad params or unusable inputs (never worth retrying), 1 for any
other failure, 128+N for signal N.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from quant.config import Config, ConfigError, InputError, MissingDependencyError, flatten
from quant.config.scheme import QuantScheme
from quant.io import atomic_file, remove_stale_temporaries, write_json_atomic  # noqa: F401 (atomic_file: stages use it from here)
from tasks import tracking
from tasks.tracking import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, PARENT_RUN_ENV  # noqa: F401 (re-exported)

log = logging.getLogger("quant")

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = "params.yaml"
ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
SHARED_SECTIONS = ("base", "model", "scheme")
# sections no DVC stage reads (so not in dvc.yaml), read by another entry point
OTHER_SECTIONS = ("sweep",)  # flows/sweep.py (`make sweep`)


# ---------------------------------------------------------------------------
# Params


@dataclass(frozen=True)
class BaseParams(Config):
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = 0  # CPU threads for torch (0 = torch's default)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be >= 0 (0 = torch's default)")


@dataclass(frozen=True)
class ModelParams(Config):
    name_or_path: str = "embedded:smollm2-135m"
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Params:
    """The whole params.yaml: typed shared sections plus each stage's raw section."""

    base: BaseParams
    model: ModelParams
    scheme: QuantScheme
    sections: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str, cls: type[Config]) -> Any:
        return cls.from_dict(self.sections.get(name), name)

    def flat(self, *names: str) -> dict[str, Any]:
        """Flattened params of the shared sections plus `names`, for MLflow."""
        d = {"base": self.base.to_dict(), "model": self.model.to_dict(), "scheme": self.scheme.to_dict()}
        for n in names:
            d[n] = self.sections.get(n)
        return flatten(d)


def known_sections(dvc_file: str | Path = ROOT / "dvc.yaml") -> set[str] | None:
    """Top-level params sections some stage of dvc.yaml reads (None without a dvc.yaml)."""
    try:
        stages = (yaml.safe_load(Path(dvc_file).read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return None
    names = {*SHARED_SECTIONS, *OTHER_SECTIONS}
    for stage in stages.values():
        for p in (stage.get("do", stage) or {}).get("params", []):
            for key in p if isinstance(p, dict) else [p]:
                names.add(str(key).split(".")[0])
    return names


def load_params(path: str | Path = PARAMS_FILE, check_sections: bool = True) -> Params:
    """params.yaml as typed shared sections + raw stage sections. `check_sections=False`
    skips the unknown-top-level-section check (for callers that validate a params file
    of another project, whose dvc.yaml is not this repository's)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found; run from the repository root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{line}: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path} is empty; it must hold the sections {list(SHARED_SECTIONS)} and the stages'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    known = known_sections() if check_sections else None
    unknown = sorted(set(raw) - known) if known is not None else []
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in {path}; accepted sections: {sorted(known)}")
    return Params(
        base=BaseParams.from_dict(raw.get("base"), "base"),
        model=ModelParams.from_dict(raw.get("model"), "model"),
        scheme=QuantScheme.from_dict(raw.get("scheme"), "scheme"),
        sections={k: v for k, v in raw.items() if k not in SHARED_SECTIONS},
    )


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_torch(base: BaseParams) -> tuple[str, Any]:
    """Seed, threads; returns (device, dtype)."""
    import torch

    from quant.models.hub import resolve_device, resolve_dtype

    seed_everything(base.seed)
    if base.threads > 0:
        torch.set_num_threads(base.threads)
    device = resolve_device(base.device)
    return device, resolve_dtype(base.dtype, device)


# ---------------------------------------------------------------------------
# Outputs


def stage_dir(stage: str) -> Path:
    return ARTIFACTS / stage


def clean_stale_temporaries(stage: str, own: bool = False) -> list[Path]:
    """Remove what killed runs left in the stage's output folders (dead writers only; with
    `own`, this process's too: it is about to exit)."""
    dirs = [ARTIFACTS, stage_dir(stage), METRICS, METRICS / stage]
    if stage_dir(stage).is_dir():
        dirs += [d for d in stage_dir(stage).iterdir() if d.is_dir() and not d.name.startswith(".")]
    removed = [p for d in dirs for p in remove_stale_temporaries(d, owner=stage, own=own)]
    for p in removed:
        log.warning("removed %s, left by a killed run", p)
    return removed


def pass_through(src: Path, out: Path) -> Path:
    """A stage whose recipe part has no step hands its input model on unchanged (a copy,
    written atomically: DVC tracks each stage's output on its own)."""
    import shutil

    from quant.io import atomic_dir

    if not src.is_dir():
        raise ConfigError(f"{src} does not exist; run the stage that writes it first")
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return out


def write_json(path: str | Path, data: Any) -> Path:
    return write_json_atomic(path, data)


def read_json(path: str | Path) -> Any:
    """A JSON file a stage reads (metrics, caches); an InputError naming it when it is not UTF-8
    JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid UTF-8 JSON ({exc}); re-run the stage that wrote it") from None


# ---------------------------------------------------------------------------
# MLflow (the rules live in tasks/tracking.py; these names are what stages import)

tracking_uri = tracking.tracking_uri
stage_run = tracking.stage_run
log_artifact = tracking.log_artifact
_mlflow = tracking.fluent_mlflow


def log_metrics(mlflow: Any, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the numeric leaves of a (nested) metrics dict under MLflow-safe names (a/b)."""
    flat = flatten(metrics, sep="/")
    numeric = {k: float(v) for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric, step=step)


# ---------------------------------------------------------------------------
# Entry point


class _LastChar:
    """sys.stderr, remembering whether the last thing written ended a line (a progress bar's
    `\r` updates do not): `print_error` then starts its line on a fresh one."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def track_stderr() -> None:
    """Route sys.stderr through `_LastChar` (idempotent; before logging and progress bars)."""
    if not isinstance(sys.stderr, _LastChar):
        sys.stderr = _LastChar(sys.stderr)


def print_error(message: str, prefix: str = "error") -> None:
    """The one `error: ...` line, on a line of its own."""
    fresh = getattr(sys.stderr, "at_line_start", True)
    sys.stderr.write(("" if fresh else "\n") + f"{prefix}: {message}\n")
    sys.stderr.flush()


# errno of an OSError that names a path the stage cannot use (permissions, read-only, full)
PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def path_error(exc: OSError) -> str | None:
    """One line for an OSError about a path the user must fix, or None for any other."""
    if exc.errno not in PATH_ERRNOS or not exc.filename:
        return None
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system"}.get(exc.errno, "permission denied")
    return (f"{exc.filename}: {what} ({exc.strerror}); the stage cannot write or read there: free space "
            "or fix the permissions of that path and run it again")


class StageInterrupted(BaseException):
    """SIGTERM/SIGINT: unwinds the stage like an error (run FAILED, temporaries removed)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _on_signal(signum: int, frame: Any) -> None:
    for s in (signal.SIGTERM, signal.SIGINT):  # a second signal takes the default, immediate way
        signal.signal(s, signal.SIG_DFL)
    raise StageInterrupted(signum)


def exit_now(code: int) -> None:
    """Exit after a signal, once the stage has unwound (run FAILED, temporaries removed): flush
    and leave without the interpreter's teardown, which can wait on a process group's or a
    library's threads (reported: DDP processes on gloo alive 30 s after their error line)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


SIGNAL_GRACE_SECONDS = 5.0  # after SIGTERM/SIGINT, the time a stage has to unwind on its own
_watched: dict[str, Any] = {}


def handle_signals(stage: str) -> None:
    """SIGTERM/SIGINT raise StageInterrupted in the main thread; a watchdog thread, woken by
    the signal at the C level (`signal.set_wakeup_fd`), ends the process if the main thread
    has not exited `SIGNAL_GRACE_SECONDS` later (stuck in native code). Main thread only."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _on_signal)
    if _watched.get("stage") is not None:
        _watched["stage"] = stage
        return
    _watched["stage"] = stage
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            data = os.read(r, 64)
            hits = [b for b in data if b in (signal.SIGTERM, signal.SIGINT)]
            if hits:
                break
        time.sleep(SIGNAL_GRACE_SECONDS)
        _hard_exit(hits[0])

    threading.Thread(target=watch, name="signal-watchdog", daemon=True).start()


def _hard_exit(signum: int) -> None:
    """The main thread did not end within the grace period: mark the run FAILED, remove this
    process's temporaries, exit 128+signum (at most a few seconds more, whatever hangs)."""
    code = 128 + signum
    threading.Timer(3.0, os._exit, (code,)).start()  # if the cleanup below hangs itself
    stage = _watched.get("stage") or "stage"
    name = signal.Signals(signum).name
    msg = (f"{stage} stopped by {name}; it did not stop within {SIGNAL_GRACE_SECONDS:.0f} s (busy in "
           "native code) and was ended; its MLflow run is marked FAILED")
    try:
        print_error(msg)
        tracking.fail_current_run(f"stopped by {name} (ended after {SIGNAL_GRACE_SECONDS:.0f} s)")
        clean_stale_temporaries(stage, own=True)
    finally:
        os._exit(code)


def die_with_parent() -> str:
    """Make this process get SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG on Linux,
    else a watchdog thread polling the parent pid); returns which one is in place."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
        how = "prctl"
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
        how = "watchdog"
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    return how


def peak_memory() -> dict[str, float]:
    """Peak resident host memory of this process and, when CUDA was used, the peak memory
    torch allocated on each visible GPU (GiB; logged with every stage run's metrics)."""
    import resource

    out = {"peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks = [torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())]
        out["peak_gpu_gib"] = round(max(peaks) / 2**30, 3)
    return out


def check_all_params(params: Params) -> None:
    """tasks.params_check.check_params on the whole params.yaml. Imported by name: that module
    imports every stage's config, and a stage's DVC deps are the code that can change its
    output (tests/test_stage_deps.py), which other stages' validation cannot."""
    importlib.import_module("tasks.params_check").check_params(params)


def main(stage: str, run: Callable[[Params], dict[str, Any]], sections: tuple[str, ...] = ()) -> None:
    """`python -m tasks.<stage>`: load and check params, run the stage inside its MLflow run."""
    track_stderr()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    handle_signals(stage)
    die_with_parent()
    try:
        clean_stale_temporaries(stage)
        try:
            params = load_params()
            check_all_params(params)
            flat = params.flat(stage, *sections)
        except ConfigError as exc:
            tracking.failed_run(stage, exc)
            raise
        t0 = time.time()
        with stage_run(stage, flat) as mlflow:
            metrics = run(params) or {}
            metrics = {**metrics, "wall_seconds": round(time.time() - t0, 2), **peak_memory()}
            log_metrics(mlflow, metrics)
            mlflow.set_tag("status_detail", "ok")
    except (ConfigError, MissingDependencyError) as exc:
        print_error(str(exc))
        sys.exit(2)
    except StageInterrupted as exc:
        print_error(f"{stage} {exc}; its MLflow run is marked FAILED")
        exit_now(128 + exc.signum)
    except OSError as exc:
        msg = path_error(exc)
        if msg is None:
            raise
        print_error(f"{stage}: {msg}")
        sys.exit(2)
