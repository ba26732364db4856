"""The MLflow parent run of one pipeline run; the stage processes nest their runs under it.

The flow process talks to MLflow through an explicit `MlflowClient` (no fluent
`mlflow.start_run`): Prefect runs tasks in threads, and the fluent API keeps the
active run in global state. Tracking URI, experiment creation and param formatting
are the stages' own (tasks/tracking.py, one copy); the flow passes the URI it used on
to every stage process so both sides always agree.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from quant.config import flatten  # noqa: F401 (the one copy; flows.pipeline imports it from here)
from tasks import tracking
from tasks.tracking import (  # noqa: F401 (the flow's import point)
    DEFAULT_EXPERIMENT,
    EXPERIMENT_ENV,
    MAX_PARAM_CHARS,
    PARENT_RUN_ENV,
    tracking_uri,
)


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "none"


def git_state(root: Path) -> dict[str, str]:
    """Commit and dirtiness of the workspace, through scmrepo (no git binary needed)."""
    try:
        from scmrepo.git import Git

        scm = Git(str(root))
        return {"git_commit": scm.get_rev(), "git_dirty": str(scm.is_dirty(untracked_files=False))}
    except Exception:  # not a git checkout (e.g. the Docker image): record that, do not fail
        return {"git_commit": "none", "git_dirty": "unknown"}


class ParentRun:
    """Create, fill and end the parent run of one pipeline run."""

    def __init__(self, root: Path, experiment: str, run_name: str, tags: dict[str, str]):
        self.root = root
        self.client, self.uri = tracking.client(root)
        self.experiment_id = tracking.ensure_experiment(self.client, experiment, self.uri, root)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**tags, "stage": "pipeline"})
        self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = tracking.params_items(params)
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])

    def log_metrics(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Log the numeric leaves; returns what was logged."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        items = sorted(numeric.items())
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, 0) for k, v in items[i : i + 500]])
        return numeric

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v)[:5000])

    def nested_runs(self) -> list[dict[str, str]]:
        """The runs nested under this one (one per stage process that ran), oldest first."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'", max_results=1000
        )
        return [
            {"name": r.info.run_name, "stage": r.data.tags.get("stage", ""), "run_id": r.info.run_id,
             "status": r.info.status}
            for r in sorted(runs, key=lambda r: r.info.start_time)
        ]

    def end(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
