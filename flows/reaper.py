"""MLflow runs of crashed flow runs: find them and mark them FAILED.

A flow run whose process is killed (the worker SIGKILLed, the machine gone) cannot close
its MLflow runs: the parent run and the stage run in progress stay RUNNING. The crash
watcher (flows/watch.py) sets such a flow run Crashed once its process is gone, and fails
its MLflow runs; this module brings MLflow in line with Prefect: every MLflow parent run
still RUNNING whose flow run Prefect holds in a final state, and the stage runs nested under
it, become FAILED with an `error` tag, unless the flow run's lease (flows/liveness.py)
shows its process still running: a false alarm never fails a live run's MLflow runs.

It runs from the crash watcher, at the start of every flow run (so a re-run cleans up
first), from the flow's `on_crashed` hook (when the process lives long enough to run it),
and by hand: `python -m flows.reaper` (what the `make flow-run` client runs when it sees
a crash).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PIPELINE_TAG = "pipeline"  # tags.stage of a parent run (flows/tracking.py)
FLOW_RUN_TAG = "prefect.flow_run_id"


def _client(root: Path):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from flows.tracking import tracking_uri

    return MlflowClient(tracking_uri(root))


def _experiments(client) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def open_parent_runs(root: Path) -> dict[str, list[str]]:
    """{flow run id: [MLflow parent run ids still RUNNING]}."""
    client = _client(root)
    runs = client.search_runs(_experiments(client), f"tags.stage = '{PIPELINE_TAG}' and attributes.status = 'RUNNING'",
                              max_results=1000)
    out: dict[str, list[str]] = {}
    for r in runs:
        out.setdefault(r.data.tags.get(FLOW_RUN_TAG, ""), []).append(r.info.run_id)
    return out


def fail_runs_of(root: Path, flow_run_id: str, message: str) -> list[str]:
    """Mark FAILED (tag `error`=message) the RUNNING parent run of `flow_run_id` and its
    RUNNING stage runs; returns the run ids changed."""
    client = _client(root)
    exps = _experiments(client)
    parents = client.search_runs(exps, f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' and attributes.status = 'RUNNING'")
    changed = []
    for parent in parents:
        nested = client.search_runs(exps, f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                          f"and attributes.status = 'RUNNING'")
        for run in [*nested, parent]:
            client.set_tag(run.info.run_id, "error", message[:5000])
            client.set_tag(run.info.run_id, "status_detail", "failed")
            client.set_terminated(run.info.run_id, "FAILED")
            changed.append(run.info.run_id)
    return changed


def reap_crashed(root: Path, exclude: set[str] = frozenset()) -> list[str]:
    """The runs of every flow run that Prefect holds in a final state while MLflow still
    says RUNNING, unless the flow run's lease shows its process still running (a run set
    Crashed by mistake keeps its MLflow runs; it closes them itself). Flow runs unknown
    to this Prefect server are left alone."""
    from prefect.client.orchestration import get_client

    from flows.liveness import judge, read_lease

    changed: list[str] = []
    open_runs = open_parent_runs(root)
    if not any(fr for fr in open_runs if fr and fr not in exclude):
        return changed
    with get_client(sync_client=True) as client:
        for fr_id in open_runs:
            if not fr_id or fr_id in exclude or fr_id == "local":
                continue
            try:
                state = client.read_flow_run(fr_id).state
            except Exception:  # not a flow run of this Prefect server
                continue
            if state is None or not state.is_final():
                continue
            alive = judge(read_lease(fr_id))
            if alive.alive:  # Prefect says it ended, its process says otherwise: a false alarm
                continue
            changed += fail_runs_of(root, fr_id, f"flow run ended {state.name}: {state.message or ''}".strip())
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Mark FAILED the MLflow runs that crashed flow runs left RUNNING.")
    ap.add_argument("--root", default=".", help="repository root (for the default sqlite store)")
    args = ap.parse_args(argv)
    changed = reap_crashed(Path(args.root).resolve())
    print(f"marked {len(changed)} MLflow run(s) FAILED" + (f": {', '.join(changed)}" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
