"""Comparison report across `evaluate` runs recorded in MLflow (tasks.reporting draws it).

The evaluate stage calls `report_for_current_run` at its end: it tags its run with
the method and scheme, gathers the finished evaluate runs of the same experiment
that were scored under the same evaluation settings (`COMPARABLE` params: model,
tasks, task source, limit, shots, PPL context and windows), adds itself, keeps the
latest run per (method, scheme), and writes and logs artifacts/evaluate/report/
(comparison.md, comparison.csv, ppl_vs_bits.png, acc_vs_bits.png).

Across experiments, or to rebuild it alone:

    python -m tasks.report --experiment quant-pipeline --experiment sweep-w3 [--all]

compares the runs of those experiments that match the evaluation settings of the
current params.yaml (every finished evaluate run with `--all`), writes
artifacts/report/ and logs it as the artifacts of an MLflow run named `report`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from quant.eval import lm_tasks
from tasks import tracking
from tasks.common import (
    ARTIFACTS,
    DEFAULT_EXPERIMENT,
    EXPERIMENT_ENV,
    _mlflow,
    load_params,
    log_artifact,
    stage_run,
)
from tasks.reporting import Row, rows_from_metrics, unflatten, write_report

COMPARABLE = (
    "model.name_or_path",
    "evaluate.tasks",
    "evaluate.task_source",
    "evaluate.limit",
    "evaluate.num_fewshot",
    "evaluate.seq_len",
    "evaluate.max_windows",
)
TAG_METHOD, TAG_SCHEME = "method", "scheme"
TASK_LABELS = {name: t.label for name, t in lm_tasks.TASKS.items()}


def _as_logged(value: Any) -> str:
    """A param value as tasks.common.stage_run logs it."""
    return ("None" if value is None else str(value))[:6000]


def comparable_params(flat_params: Mapping[str, Any]) -> dict[str, str]:
    return {k: _as_logged(flat_params.get(k)) for k in COMPARABLE}


def rows_from_run(run: Any) -> list[Row]:
    """Rows of one MLflow evaluate run (empty if it lacks the method/scheme tags)."""
    tags = run.data.tags
    if TAG_METHOD not in tags or TAG_SCHEME not in tags:
        return []
    metrics = unflatten(run.data.metrics)
    return rows_from_metrics(metrics, tags[TAG_METHOD], tags[TAG_SCHEME], list(TASK_LABELS),
                             run_id=run.info.run_id, order=float(run.info.start_time or 0))


def collect_rows(mlflow: Any, experiments: Iterable[str], match: Mapping[str, str] | None) -> list[Row]:
    """Rows of the finished evaluate runs of `experiments` whose params equal `match`."""
    names = [e for e in experiments if mlflow.get_experiment_by_name(e) is not None]
    if not names:
        return []
    runs = mlflow.search_runs(
        experiment_names=names,
        filter_string="tags.stage = 'evaluate' AND attributes.status = 'FINISHED'",
        output_format="list",
    )
    rows: list[Row] = []
    for run in runs:
        params = run.data.params
        if match is not None and any(params.get(k, "None") != v for k, v in match.items()):
            continue
        rows += rows_from_run(run)
    return rows


def _chance(tasks: Iterable[str]) -> float | None:
    names = [t for t in tasks if t in lm_tasks.TASKS]
    return sum(lm_tasks.TASKS[t].chance for t in names) / len(names) if names else None


def report_for_current_run(metrics: dict[str, Any], method: str, scheme: str, out_dir: Path) -> dict[str, Path]:
    """Called inside the evaluate stage's MLflow run (or outside one: then this run alone)."""
    mlflow = tracking.active_mlflow()
    active = mlflow.active_run() if mlflow is not None else None
    rows = rows_from_metrics(metrics, method, scheme, list(TASK_LABELS), order=float("inf"))
    if active is not None:
        mlflow.set_tags({TAG_METHOD: method, TAG_SCHEME: scheme})
        params = mlflow.get_run(active.info.run_id).data.params
        experiment = mlflow.get_experiment(active.info.experiment_id).name
        rows += collect_rows(mlflow, [experiment], comparable_params(params))
    tasks = [t for t in TASK_LABELS if t in metrics]
    files = write_report(rows, out_dir, TASK_LABELS, chance=_chance(tasks),
                         title="Comparable evaluate runs of this experiment")
    log_artifact(out_dir, "report")
    return files


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", action="append", default=None,
                    help=f"MLflow experiment (repeatable); default ${EXPERIMENT_ENV} or {DEFAULT_EXPERIMENT}")
    ap.add_argument("--all", action="store_true", help="do not filter runs by evaluation settings")
    ap.add_argument("--out", default=str(ARTIFACTS / "report"))
    args = ap.parse_args(argv)
    experiments = args.experiment or [os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)]
    params = load_params()
    match = None if args.all else comparable_params(params.flat("evaluate"))
    mlflow = _mlflow()
    rows = collect_rows(mlflow, experiments, match)
    if not rows:
        raise SystemExit(f"no finished evaluate runs with method/scheme tags in {experiments}"
                         + ("" if args.all else " under the current evaluation settings (try --all)"))
    with stage_run("report", {"experiments": ",".join(experiments), **(match or {})}):
        tasks = {t for r in rows for t in r.acc}
        files = write_report(rows, args.out, TASK_LABELS, chance=_chance(tasks),
                             title=f"evaluate runs of {', '.join(experiments)}")
        log_artifact(args.out, "report")
    for f in files.values():
        print(f)


if __name__ == "__main__":
    main()
