"""What every stage shares: params, paths, atomic outputs, metrics, one MLflow run.

A stage module defines a frozen `Config` dataclass for its params section and a
`run(params) -> dict` function that does the work; `main(stage, ...)` wires it
to params.yaml, MLflow and the metrics file, and is what `python -m tasks.<stage>`
(and therefore `dvc repro`, the Prefect flow and the tests) executes.

MLflow: the tracking URI is `$MLFLOW_TRACKING_URI` if set, else
`sqlite:///mlflow/mlflow.db` under the repository root. If
`$QUANT_PARENT_RUN_ID` is set, the stage run is nested under that parent run
(the Prefect flow opens the parent). A failing stage marks its run FAILED and
re-raises; nothing is registered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from quant.config import Config, ConfigError, flatten
from quant.config.scheme import QuantScheme
from quant.models.hub import MissingDependencyError

log = logging.getLogger("quant")

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = "params.yaml"
ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
PARENT_RUN_ENV = "QUANT_PARENT_RUN_ID"
EXPERIMENT_ENV = "QUANT_EXPERIMENT"
DEFAULT_EXPERIMENT = "quant-pipeline"


# ---------------------------------------------------------------------------
# Params


@dataclass(frozen=True)
class BaseParams(Config):
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = 0  # CPU threads for torch (0 = torch's default)


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


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found; run from the repository root")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return Params(
        base=BaseParams.from_dict(raw.get("base"), "base"),
        model=ModelParams.from_dict(raw.get("model"), "model"),
        scheme=QuantScheme.from_dict(raw.get("scheme"), "scheme"),
        sections={k: v for k, v in raw.items() if k not in ("base", "model", "scheme")},
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


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling; rename over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> Path:
    with atomic_file(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------
# MLflow


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = ROOT / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _store_lock(uri: str):
    """A file lock beside a local sqlite store; a no-op for a tracking server."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=600)


def _mlflow():
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the switch MLflow 3 reads (issue 7)
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    # Stage processes started together (parallel shards) would race to create and
    # migrate a fresh sqlite store ("duplicate column name"); serialise that step.
    lock = _store_lock(uri)
    with lock:
        if mlflow.get_experiment_by_name(name) is None:
            # artifacts next to the sqlite store unless a server decides otherwise
            location = (ROOT / "mlflow" / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
            mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return mlflow


@contextmanager
def stage_run(stage: str, params: dict[str, Any]) -> Iterator[Any]:
    """One MLflow run for a stage (nested under $QUANT_PARENT_RUN_ID if set).

    Yields the mlflow module with the run active. On an exception the run is ended
    with status FAILED and the exception propagates."""
    mlflow = _mlflow()
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {"stage": stage}
    if parent:
        tags["mlflow.parentRunId"] = parent
    # the flow names the run after the DVC stage item it runs (`synthesize@0`)
    run = mlflow.start_run(run_name=os.environ.get("QUANT_STAGE_RUN_NAME") or stage, tags=tags)
    try:
        items = {k: ("None" if v is None else str(v))[:6000] for k, v in params.items()}
        keys = sorted(items)
        for i in range(0, len(keys), 100):
            mlflow.log_params({k: items[k] for k in keys[i : i + 100]})
        yield mlflow
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")
    log.info("mlflow run %s (%s) finished", run.info.run_id, stage)


def log_metrics(mlflow: Any, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the numeric leaves of a (nested) metrics dict under MLflow-safe names (a/b)."""
    flat = flatten(metrics, sep="/")
    numeric = {k: float(v) for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric, step=step)


# ---------------------------------------------------------------------------
# Entry point


def main(stage: str, run: Callable[[Params], dict[str, Any]], sections: tuple[str, ...] = ()) -> None:
    """`python -m tasks.<stage>`: load params, run the stage inside its MLflow run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        params = load_params()
        t0 = time.time()
        with stage_run(stage, params.flat(stage, *sections)) as mlflow:
            metrics = run(params) or {}
            metrics = {**metrics, "wall_seconds": round(time.time() - t0, 2)}
            log_metrics(mlflow, metrics)
            mlflow.set_tag("status_detail", "ok")
    except (ConfigError, MissingDependencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Attach a file or directory to the active MLflow run (no-op outside a stage run)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path)
