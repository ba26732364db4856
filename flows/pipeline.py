"""quant-pipeline: the Prefect flow that runs every DVC stage, in dependency order.

Why DVC runs the stages and Prefect only sequences them: DVC decides what is stale
(hashes of params, deps and outs in dvc.lock), so a flow run after a params change
reruns exactly what `dvc repro` would, and a repeated run redoes nothing. Each stage
is one `dvc repro --single-item <stage>` (flows/dvc_stages.py); Prefect adds what DVC
lacks: the items of a `foreach` stage (the synthesis shards) run as concurrent
processes, each pinned to its own GPU when there are GPUs; failed stages are retried
(not when the stage rejected its params: that fails the same way every time); logs,
states and a results table land in the Prefect UI.

The stage list is never written here: the graph comes from DVC after the params
overrides are applied (a `foreach` over `synthesize.shards` grows with that param),
so a stage added to dvc.yaml runs without touching this file.

MLflow: the flow opens one parent run (flattened params.yaml, overrides, git commit,
dvc.lock hash, the metrics of this run's own stages, their files, tables, plots and every
stage's log) and hands its id to the stage processes ($QUANT_PARENT_RUN_ID), which nest
their own runs under it. After the stages, the registered model is put up for promotion
(`python -m tasks.register promote`): the gates in params.yaml decide. A run reports only
the stages of its plan (run, restored from the run cache, or up to date for its params):
other stages' metrics files in the checkout belong to other params.

Params overrides (`overrides=["scheme.weight.format=int3"]`) never touch the user's
workspace: the whole effective params are checked first (known keys, every section's typed
config, method options, the recipe; a bad value fails the run before any stage, naming
it), then the run happens in a scratch checkout (flows/scratch.py: a git clone of the
checkout plus its local edits) that shares the DVC cache, so stages the overrides do not
affect are checked out, not rerun, and is saved as a DVC experiment of the checkout
(`dvc exp show` lists it, `dvc exp apply flow-<run name>` brings it into the workspace).
Like `dvc exp run --temp -S`, but stage by stage under Prefect. The overrides are recorded
on the MLflow parent run (param and tag `overrides`, tag `dvc_experiment`) and on the flow
run (artifact `quant-overrides`); the run's params.yaml, dvc.lock and metrics also stay in
.state/flow-runs/<flow run id>/. A run without overrides runs in the checkout itself, as
`dvc repro` would.

Several machines: with `shard_deployment="quant-shard/shard"` the items of a `foreach`
stage are not run in this process but submitted as flow runs of that deployment
(flows/shard.py, prefect.yaml `shard`; flows/pool.py) on its work pool (`quant-shards`):
each worker of the pool with a free slot takes one (one worker per GPU,
`make shard-worker GPUS=k`, each `--limit 1`), on this machine or another that sees this
checkout at the same path. This flow waits for them; a shard run that Crashed (its worker
killed) or Failed is submitted again (`retries`), so a live worker picks it up.

Failures: the flow fails with `stage 'x' failed: <its one-line error>` (what
`make flow-run` prints), and that text is the parent run's `error` tag. Crashes: every
flow run keeps a lease naming its process (flows/liveness.py, written from a thread of its
own); the crash watcher (flows/watch.py, started by `make servers-up`) sets a run Crashed
once that process is gone, never because it is slow, and marks its MLflow runs FAILED;
`reap_crashed` (run at the start of every flow run) does the same for any it missed, and
leaves alone the runs of a process that still runs. A stage's output goes to its log file,
not through a pipe, so a finished stage reaches dvc.lock and the run cache even when this
process dies; and a dead worker's broken pipe does not end this process
(`liveness.guard_streams`).

No math here. Run it through the deployment (prefect.yaml, `make deploy` then
`make flow-run`) or directly: `python -m flows.pipeline -S scheme.weight.format=int3`.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.states import Completed

from flows import dvc_stages, liveness, pool, reaper, scratch
from flows.pool import SHARD_DEPLOYMENT
from flows.stages import REGISTER_STAGE, promote_model, run_stage
from flows.tracking import (
    DEFAULT_EXPERIMENT,
    EXPERIMENT_ENV,
    PARENT_RUN_ENV,
    ParentRun,
    file_md5,
    flatten,
    git_state,
)

FLOW_NAME = "quant-pipeline"
TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                 "HF_HUB_DISABLE_TELEMETRY": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _run_wave(wave: list[str], root: Path, env: dict[str, str], gpus: list[str], log_dir: Path,
              force: bool, max_parallel: int | None, rows: list[dict[str, Any]], stage_task,
              on_pool=None) -> None:
    """A single stage runs alone (with every GPU); a wave of foreach items runs concurrently,
    item i pinned to GPU i mod n, at most `max_parallel` (default: the number of GPUs, or all
    items without GPUs) at a time. With `on_pool` (stage -> future), foreach items go to the
    shard deployment's work pool instead: its workers decide where they run and how many at
    a time (`max_parallel`, when set, still caps the runs in flight)."""
    if on_pool is not None and "@" in wave[0]:
        limit = max_parallel or len(wave)

        def submit(i: int, stage: str):
            return on_pool(stage)
    elif len(wave) == 1:
        try:
            rows.append(stage_task(wave[0], str(root), env, str(log_dir), force))
        except Exception:
            rows.append({"stage": wave[0], "status": "failed", "started": "", "seconds": None, "gpu": ""})
            raise
        return
    else:
        limit = max_parallel or len(gpus) or len(wave)

        def submit(i: int, stage: str):
            pin = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {}
            return stage_task.submit(stage, str(root), {**env, **pin}, str(log_dir), force)
    for start in range(0, len(wave), limit):
        chunk = wave[start : start + limit]
        futures = [submit(i, stage) for i, stage in enumerate(chunk)]
        wait(futures)
        failed = []
        for stage, fut in zip(chunk, futures, strict=True):
            if fut.state.is_completed():
                rows.append(fut.result())
            else:
                rows.append({"stage": stage, "status": "failed", "started": "", "seconds": None, "gpu": ""})
                failed.append(fut)
        if failed:
            failed[0].result()  # re-raise the first failure (all items finished first)


def _crashed(flow, flow_run_, state) -> None:
    """on_crashed (the engine itself found this process crashing): the MLflow runs this flow
    run left RUNNING become FAILED."""
    reaper.fail_runs_of(Path.cwd(), str(flow_run_.id), f"flow run crashed: {state.message or state.name}")


@flow(name=FLOW_NAME, log_prints=True, on_crashed=[_crashed])
def pipeline(
    overrides: list[str] | None = None,
    targets: list[str] | None = None,
    promote: bool = True,
    force: bool = False,
    retries: int = 2,
    retry_delay_seconds: float = 10.0,
    max_parallel: int | None = None,
    experiment: str | None = None,
    shard_deployment: str | None = None,
):
    """Run every DVC stage (what is stale) in order, or only `targets` and what they depend
    on; overrides use DVC's -S syntax (key=value) and run in a scratch checkout, saved as a
    DVC experiment. With `shard_deployment` (e.g. "quant-shard/shard"), foreach items run as
    flow runs of that deployment on its work pool instead of in this process."""
    if retries < 0:
        raise ValueError(f"retries={retries} must be >= 0")
    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel={max_parallel} must be >= 1 or null (one per GPU / all shards)")
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        raise ValueError(f"no dvc.yaml in {root}: the flow runs in the repository root "
                         f"(the deployment's working directory)")
    liveness.guard_streams()  # a dead worker's pipe must not end this process
    run_id = str(flow_run.get_id() or "local")
    with liveness.Lease(run_id):  # what the crash watcher asks (flows/watch.py), not heartbeats
        return _pipeline(root, run_id, list(overrides or []), targets, promote, force, retries,
                         retry_delay_seconds, max_parallel, experiment, shard_deployment)


def _pipeline(root: Path, run_id: str, overrides: list[str], targets: list[str] | None, promote: bool,
              force: bool, retries: int, retry_delay_seconds: float, max_parallel: int | None,
              experiment: str | None, shard_deployment: str | None):
    logger = get_run_logger()
    resolved = dvc_stages.resolve_overrides(root, overrides)  # the whole effective params, before any work
    if shard_deployment:
        pool.check_shard_deployment(shard_deployment, logger)
    applied = resolved.overrides
    experiment = experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    reaped = _reap_before_start(root, run_id, logger)
    work = root / ".state" / "scratch" / run_id if applied else root
    if applied:
        shutil.rmtree(work, ignore_errors=True)
        scratch.scratch_checkout(root, work, resolved)
        logger.info("overrides %s: running in the scratch checkout %s (params.yaml untouched)", applied, work)
        create_table_artifact(table=[{"override": o} for o in applied], key="quant-overrides",
                              description="params overrides of this run (the checkout's params.yaml is untouched)")
    graph = dvc_stages.read_graph(work)
    plan = dvc_stages.waves(dvc_stages.restrict(graph, list(targets)) if targets else graph)
    logger.info("stages: %s", " -> ".join("{" + ", ".join(w) + "}" if len(w) > 1 else w[0] for w in plan))
    parent = ParentRun(root, experiment, run_name=flow_run.get_name() or FLOW_NAME,
                       tags={"prefect.flow_run_id": run_id, "overrides": " ".join(applied) or "none"})
    logger.info("MLflow parent run %s (experiment %r, %s)", parent.run_id, experiment, parent.uri)
    log_dir = root / ".state" / "logs" / "flow-runs" / run_id
    env = {**TELEMETRY_OFF, PARENT_RUN_ENV: parent.run_id, EXPERIMENT_ENV: experiment,
           "MLFLOW_TRACKING_URI": parent.uri,
           "QUANT_CACHE_DIR": str(root / "artifacts" / ".cache")}  # shared by scratch checkouts
    own = {s for wave in plan for s in wave}  # what this run reports: its own stages' results only
    rows: list[dict[str, Any]] = []
    decision: dict[str, Any] | None = None
    error: str | None = None
    try:
        params = yaml.safe_load((work / dvc_stages.PARAMS_FILE).read_text()) or {}
        parent.log_params({**flatten(params), **git_state(root), "overrides": " ".join(applied) or "none"})
        gpus = dvc_stages.gpu_slots()
        stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        on_pool = (pool.pool_submitter(shard_deployment, root, work, env, log_dir, force, retries,
                                       retry_delay_seconds) if shard_deployment else None)
        for wave in plan:
            _run_wave(wave, work, env, gpus, log_dir, force, max_parallel, rows, stage_task, on_pool)
        if promote and REGISTER_STAGE in own:
            decision = promote_model(str(work), env)
    except dvc_stages.StageFailed as exc:
        error = f"stage {exc.stage!r} failed: {exc.reason}"
        raise PipelineFailed(error) from exc
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise
    finally:
        summary = _report(parent, work, own, rows, decision, log_dir, error, logger)
        if work != root:
            summary["experiment"] = _finish_scratch(root, work, run_id, own, error is None, parent, logger)
        parent.end(error is None)
    summary["reaped"] = reaped
    if decision is not None and decision["failed_gates"]:  # registered, not promoted: say so
        return Completed(message=decision["message"], data=summary)
    return summary


def _finish_scratch(root: Path, work: Path, run_id: str, own: set[str], ok: bool, parent: ParentRun,
                    logger) -> str | None:
    """A scratch run's results: a DVC experiment in the checkout's repository (when the run
    completed and the checkout is a git repository) and, always, its params.yaml, dvc.lock
    and metrics under .state/flow-runs/<id>/ (the outputs are in the shared cache). Then
    the scratch checkout goes. Returns the experiment's name, if one was saved."""
    name = None
    try:
        if ok and scratch.is_git_checkout(root):
            name = scratch.experiment_name(flow_run.get_name() or run_id)
            scratch.save_experiment(work, root, name)
            parent.set_tags({"dvc_experiment": name})
            logger.info("DVC experiment %s: `dvc exp show` lists it, `dvc exp apply %s` brings its params, "
                        "dvc.lock and outputs into the workspace", name, name)
    except Exception as exc:  # the results below still keep the run
        logger.warning("could not save the run as a DVC experiment: %s", exc)
        name = None
    try:
        dest = root / ".state" / "flow-runs" / run_id
        if scratch.keep_results(work, dest, own):
            logger.info("this run's params.yaml, dvc.lock and metrics: %s", dest)
    except Exception as exc:  # e.g. the scratch dvc.yaml was what failed to parse
        logger.warning("could not keep the scratch run's results: %s", exc)
    shutil.rmtree(work, ignore_errors=True)
    return name


class PipelineFailed(RuntimeError):
    """A stage failed; the message names it and gives its one-line error."""


def _reap_before_start(root: Path, run_id: str, logger) -> list[str]:
    """MLflow runs left RUNNING by crashed flow runs become FAILED before this one starts."""
    try:
        changed = reaper.reap_crashed(root, exclude={run_id})
    except Exception as exc:  # housekeeping must not stop a run
        logger.warning("could not check for MLflow runs left RUNNING by crashed flow runs: %s", exc)
        return []
    if changed:
        logger.info("marked %d MLflow run(s) of crashed flow runs FAILED", len(changed))
    return changed


def _report(parent: ParentRun, root: Path, own: set[str], rows: list[dict[str, Any]],
            decision: dict[str, Any] | None, log_dir: Path, error: str | None, logger) -> dict[str, Any]:
    """Metrics, files and logs of this run's own stages to the parent run; table + markdown
    artifacts to Prefect. Other stages' metrics files in the checkout are not this run's
    (in a scratch checkout they are those of the checkout's params)."""
    summary: dict[str, Any] = {"mlflow_parent_run_id": parent.run_id, "stages": rows, "promotion": decision}
    ok = error is None
    try:
        if error is not None:  # first, so that a failing report below cannot lose it
            parent.set_tags({"status_detail": "failed", "error": error})
        metrics = {}
        for path, data in dvc_stages.metrics(root, own).items():
            metrics.update(flatten(data, Path(path).stem, sep="/"))
        logged = parent.log_metrics(metrics)
        parent.log_params({"dvc_lock_md5": file_md5(root / "dvc.lock")})
        for f in (root / "params.yaml", root / "dvc.lock"):
            parent.log_artifact(f, "pipeline")
        for f in dvc_stages.report_files(root, stages=own):
            parent.log_artifact(f, str((f if f.is_dir() else f.parent).relative_to(root)))
        parent.log_artifact(log_dir, "logs")
        tags = {"status_detail": "ok"} if ok else {}
        if decision is not None:
            tags["promotion"] = decision["message"]
        parent.set_tags(tags)
        summary["metrics"] = logged
        _prefect_artifacts(root, own, rows, metrics, decision, parent)
    except Exception as exc:  # reporting must not hide the stage failure that brought us here
        if ok:
            raise
        logger.warning("report after failure incomplete: %s", exc)
    return summary


def _prefect_artifacts(root: Path, own: set[str], rows: list[dict[str, Any]], metrics: dict[str, Any],
                       decision: dict[str, Any] | None, parent: ParentRun) -> None:
    table = [{"metric": k, "value": round(v, 4) if isinstance(v, float) else v} for k, v in sorted(metrics.items())]
    if decision is not None:
        table.append({"metric": "promotion", "value": decision["message"]})
    create_table_artifact(table=table or [{"metric": "-", "value": "-"}], key="quant-results",
                          description=f"DVC metrics of this run (MLflow parent run {parent.run_id})")
    create_table_artifact(table=rows or [{"stage": "-", "status": "-"}], key="quant-stages",
                          description="each stage: ran (stale), restored (DVC run cache) or up to date, seconds")
    tables = [f for f in dvc_stages.report_files(root, stages=own) if f.is_file() and f.suffix == ".md"]
    md = [f"# quant-pipeline results\n\nMLflow parent run `{parent.run_id}` at {parent.uri}\n"]
    for f in tables:
        md.append(f"## {f.relative_to(root)}\n\n{f.read_text()}")
    if decision is not None:
        md.append(f"## Promotion\n\n{decision['message']}\n")
    create_markdown_artifact(markdown="\n".join(md), key="quant-report", description="results tables")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the pipeline flow in this process (repo root).")
    ap.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                    help="params override, DVC syntax: key=value (repeatable)")
    ap.add_argument("--target", dest="targets", action="append", default=None,
                    help="run only this stage and what it depends on (repeatable)")
    ap.add_argument("--no-promote", dest="promote", action="store_false")
    ap.add_argument("--force", action="store_true", help="rerun every stage (dvc repro --force)")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--max-parallel", type=int, default=None)
    ap.add_argument("--shard-deployment", default=None,
                    help=f"run foreach items as flow runs of this deployment (e.g. {SHARD_DEPLOYMENT}) on its work pool")
    args = ap.parse_args(argv)
    pipeline(overrides=args.overrides, targets=args.targets, promote=args.promote, force=args.force,
             retries=args.retries, max_parallel=args.max_parallel, shard_deployment=args.shard_deployment)


if __name__ == "__main__":
    main()
