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
dvc.lock hash, all DVC metrics, the metrics files, tables, plots and every stage's
log) and hands its id to the stage processes ($QUANT_PARENT_RUN_ID), which nest their
own runs under it. After the stages, the registered model is put up for promotion
(`python -m tasks.register promote`): the gates in params.yaml decide.

Params overrides (`overrides=["scheme.weight.format=int3"]`) never touch the user's
params.yaml: they are checked all together first (known keys, the typed configs; a bad
one fails the run before any stage, naming it), then the run happens in a scratch copy of
the checkout (flows/dvc_stages.scratch_checkout) that shares the DVC cache, so stages the
overrides do not affect are checked out, not rerun. Like `dvc exp run --temp -S`, but
stage by stage under Prefect. The overrides are recorded on the MLflow parent run (param
and tag `overrides`) and on the flow run (artifact `quant-overrides`); the run's
params.yaml, dvc.lock and metrics stay in .state/flow-runs/<flow run id>/ (the outputs
are in the DVC cache: copy those two files into a checkout and `dvc checkout`).
A run without overrides runs in the checkout itself, as `dvc repro` would.

Several machines: with `shard_deployment="quant-shard/shard"` the items of a `foreach`
stage are not run in this process but submitted as flow runs of that deployment
(flows/shard.py, prefect.yaml `shard`) on its work pool (`quant-shards`): each worker of
the pool with a free slot takes one (one worker per GPU, `make shard-worker GPUS=k`, each
`--limit 1`), on this machine or another that sees this checkout at the same path. This
flow waits for them; a shard run that Crashed (its worker killed: the zombie automation
below) or Failed is submitted again (`retries`), so a live worker picks it up.

Failures: the flow fails with `stage 'x' failed: <its one-line error>` (what
`make flow-run` prints), and that text is the parent run's `error` tag. Crashes (the
worker or the flow process killed): the zombie-flow automation that scripts/servers.py
installs marks the flow run Crashed once its heartbeats stop, and `reap_crashed` (run at
the start of every flow run and by `python -m flows.client reap`) marks the MLflow runs
it left RUNNING as FAILED; the `on_crashed` hook does the same when the process lives
long enough to run it.

No math here. Run it through the deployment (prefect.yaml, `make deploy` then
`make flow-run`) or directly: `python -m flows.pipeline -S scheme.weight.format=int3`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.states import Completed

from flows import dvc_stages, reaper
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
REGISTER_STAGE = "register"
PROMOTION_REFUSED = 3  # exit code of `python -m tasks.register promote` when a gate failed
STAGE_NAME_ENV = "QUANT_STAGE_RUN_NAME"  # the MLflow stage run's name (`synthesize@0`), read by tasks/common
SHARD_FLOW = "quant-shard"  # the flow of the shard deployment (flows/shard.py)
SHARD_DEPLOYMENT = f"{SHARD_FLOW}/shard"  # prefect.yaml
SHARD_ARTIFACT = "quant-shard"  # the table artifact a shard run leaves: its stage row, or its failure
SHARD_POLL_SECONDS = 2.0
TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                 "HF_HUB_DISABLE_TELEMETRY": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


class ShardRunEnded(RuntimeError):
    """A shard's flow run ended without a stage result: Crashed (its worker or process died),
    Failed before its stage ran (retried: another worker may take it), or Cancelled (not)."""

    def __init__(self, stage: str, run_name: str, state_name: str, message: str | None, retry: bool):
        self.stage, self.retry = stage, retry
        super().__init__(f"stage {stage!r}: shard flow run {run_name!r} ended {state_name}"
                         + (f": {message}" if message else ""))


def _retry_unless_bad_params(task, task_run, state) -> bool:
    """Retry a failed stage unless it rejected its params (exit 2): that never heals; nor
    a cancelled shard run."""
    try:
        state.result()
    except dvc_stages.StageFailed as exc:
        return not exc.config_error
    except ShardRunEnded as exc:
        return exc.retry
    except Exception:
        return True
    return False


@task(task_run_name="{stage}", cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_bad_params)
def run_stage(stage: str, root: str, extra_env: dict[str, str], log_dir: str, force: bool) -> dict[str, Any]:
    """One `dvc repro --single-item <stage>`; its output streams into the task's log."""
    logger = get_run_logger()
    env = dvc_stages.stage_env(dict(os.environ), **extra_env, **{STAGE_NAME_ENV: stage})
    started = datetime.now().isoformat(timespec="seconds")
    r = dvc_stages.repro(stage, Path(root), env, Path(log_dir) / f"{stage.replace('@', '-')}.log", force,
                         echo=logger.info, progress=_ProgressArtifact(stage))
    status = "ran" if r.ran else "up to date"
    logger.info("stage %s: %s in %.1fs", stage, status, r.seconds)
    return {"stage": stage, "status": status, "started": started, "seconds": r.seconds,
            "gpu": extra_env.get("CUDA_VISIBLE_DEVICES", "")}


class _ProgressArtifact:
    """One Prefect progress artifact per stage, fed by the stage's progress bars."""

    def __init__(self, stage: str):
        self.stage, self.id = stage, None

    def __call__(self, percent: float, line: str) -> None:
        try:
            if self.id is None:
                self.id = create_progress_artifact(percent, key=f"progress-{_key(self.stage)}",
                                                   description=f"{self.stage}: {line}"[:500])
            else:
                update_progress_artifact(self.id, percent, description=f"{self.stage}: {line}"[:500])
        except Exception as exc:  # progress reporting never fails a stage
            get_run_logger().debug("progress artifact: %s", exc)


def _key(stage: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in stage.lower())


@task(task_run_name="{stage} on {deployment}", cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_params)
def run_stage_on_pool(stage: str, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """One foreach item as a flow run of the shard deployment (flows/shard.py), taken by
    whichever worker of its pool has a free slot; waits for the run to end. Its row (or its
    stage's failure) comes back through the run's `quant-shard` artifact. A crashed run
    raises ShardRunEnded, and this task's retries submit a new one."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    fr = run_deployment(deployment, parameters={"stage": stage, **parameters}, timeout=0, as_subflow=True,
                        flow_run_name=f"{flow_run.get_name() or FLOW_NAME}/{stage}")
    logger.info("stage %s: flow run %r of %s submitted", stage, fr.name, deployment)
    last = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(fr.id)
            if run.state is not None and run.state.name != last:
                last = run.state.name
                pid = f" (process {run.infrastructure_pid})" if run.infrastructure_pid else ""
                logger.info("stage %s: flow run %r %s%s", stage, fr.name, last, pid)
            if run.state is not None and run.state.is_final():
                break
            time.sleep(SHARD_POLL_SECONDS)
        row = _shard_row(client, fr.id)
    state = run.state
    if state.is_completed() and row is not None and row["status"] != "failed":
        return {**row, "flow_run": fr.name}
    if row is not None and row["status"] == "failed":  # the stage itself failed: as if it ran here
        raise dvc_stages.StageFailed(stage, int(row["returncode"]), row["tail"], bool(row["config_error"]))
    raise ShardRunEnded(stage, fr.name, state.name, state.message, retry=not state.is_cancelled())


def _shard_row(client, flow_run_id) -> dict[str, Any] | None:
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SHARD_ARTIFACT])),
                                 flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    if not arts:
        return None
    data = arts[-1].data
    return (json.loads(data) if isinstance(data, str) else data)[0]


def _check_shard_deployment(name: str, logger) -> None:
    """The shard deployment exists and runs the shard flow (else fail before any stage,
    saying how to deploy it); warn when no worker of its pool is online."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.exceptions import ObjectNotFound

    if name.count("/") != 1 or not all(name.split("/")):
        raise ValueError(f"shard_deployment={name!r} must be '<flow>/<deployment>', e.g. {SHARD_DEPLOYMENT!r}")
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ValueError(f"shard_deployment={name!r} is not a deployment of the Prefect server at "
                             f"{client.api_url}: `make deploy` registers {SHARD_DEPLOYMENT!r} (prefect.yaml)") from None
        flow_name = client.read_flow(dep.flow_id).name
        if flow_name != SHARD_FLOW:
            raise ValueError(f"shard_deployment={name!r} runs the flow {flow_name!r}, not {SHARD_FLOW!r} "
                             f"(flows/shard.py:run_shard)")
        workers = client.read_workers_for_work_pool(dep.work_pool_name) if dep.work_pool_name else []
    online = sorted(w.name for w in workers if w.status == WorkerStatus.ONLINE)
    if online:
        logger.info("shards go to work pool %r (workers online: %s)", dep.work_pool_name, ", ".join(online))
    else:
        logger.warning("no worker of work pool %r is online: the shard runs wait for one (`make shard-worker`)",
                       dep.work_pool_name)


@task(cache_policy=NO_CACHE)
def promote_model(root: str, extra_env: dict[str, str]) -> dict[str, Any]:
    """`python -m tasks.register promote --json`: the gates decide; a refusal is not a failure."""
    env = dvc_stages.stage_env(dict(os.environ), **extra_env)
    proc = subprocess.run([sys.executable, "-m", "tasks.register", "promote", "--json"], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode not in (0, PROMOTION_REFUSED):
        raise RuntimeError(f"promotion failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    decision = json.loads(proc.stdout.strip().splitlines()[-1])
    get_run_logger().info("promotion: %s", decision["message"])
    return decision


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


def _pool_submitter(deployment: str, root: Path, work: Path, env: dict[str, str], log_dir: Path, force: bool,
                    retries: int, retry_delay_seconds: float):
    """stage -> future of its run on the shard deployment. Paths go relative to the checkout
    (the shard deployment runs in its own working directory: this checkout, shared), with
    the md5 of the run's params.yaml, which the shard checks it sees too."""
    pool_task = run_stage_on_pool.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    parameters = {"workdir": str(work.relative_to(root)), "env": env, "log_dir": str(log_dir.relative_to(root)),
                  "force": force, "params_md5": file_md5(work / dvc_stages.PARAMS_FILE)}

    def submit(stage: str):
        return pool_task.submit(stage, deployment, parameters)

    return submit


def _crashed(flow, flow_run_, state) -> None:
    """on_crashed: the MLflow runs this flow run left RUNNING become FAILED."""
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
    on; overrides use DVC's -S syntax (key=value) and run in a scratch checkout. With
    `shard_deployment` (e.g. "quant-shard/shard"), foreach items run as flow runs of that
    deployment on its work pool instead of in this process."""
    if retries < 0:
        raise ValueError(f"retries={retries} must be >= 0")
    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel={max_parallel} must be >= 1 or null (one per GPU / all shards)")
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        raise ValueError(f"no dvc.yaml in {root}: the flow runs in the repository root "
                         f"(the deployment's working directory)")
    logger = get_run_logger()
    resolved = dvc_stages.resolve_overrides(root, list(overrides or []))  # all checked before any work
    if shard_deployment:
        _check_shard_deployment(shard_deployment, logger)
    applied = resolved.overrides
    run_id = str(flow_run.get_id() or "local")
    experiment = experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    reaped = _reap_before_start(root, run_id, logger)
    work = root
    if applied:
        work = root / ".state" / "scratch" / run_id
        shutil.rmtree(work, ignore_errors=True)
        dvc_stages.scratch_checkout(root, work, resolved)
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
    rows: list[dict[str, Any]] = []
    decision: dict[str, Any] | None = None
    error: str | None = None
    try:
        params = yaml.safe_load((work / dvc_stages.PARAMS_FILE).read_text()) or {}
        parent.log_params({**flatten(params), **git_state(root), "overrides": " ".join(applied) or "none"})
        gpus = dvc_stages.gpu_slots()
        stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        on_pool = (_pool_submitter(shard_deployment, root, work, env, log_dir, force, retries, retry_delay_seconds)
                   if shard_deployment else None)
        for wave in plan:
            _run_wave(wave, work, env, gpus, log_dir, force, max_parallel, rows, stage_task, on_pool)
        if promote and any(REGISTER_STAGE in w for w in plan):
            decision = promote_model(str(work), env)
    except dvc_stages.StageFailed as exc:
        error = f"stage {exc.stage!r} failed: {exc.reason}"
        raise PipelineFailed(error) from exc
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise
    finally:
        summary = _report(parent, work, rows, decision, log_dir, error, logger)
        parent.end(error is None)
        if work != root:
            _keep_and_remove(work, root / ".state" / "flow-runs" / run_id, logger)
    summary["reaped"] = reaped
    if decision is not None and decision["failed_gates"]:  # registered, not promoted: say so
        return Completed(message=decision["message"], data=summary)
    return summary


def _keep_and_remove(scratch: Path, dest: Path, logger) -> None:
    """Keep a scratch run's params.yaml, dvc.lock and metrics (outputs are in the cache)."""
    try:
        kept = dvc_stages.keep_results(scratch, dest)
        if kept:
            logger.info("this run's params.yaml, dvc.lock and metrics: %s", dest)
    except Exception as exc:  # e.g. the scratch dvc.yaml was what failed to parse
        logger.warning("could not keep the scratch run's results: %s", exc)
    shutil.rmtree(scratch, ignore_errors=True)


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


def _report(parent: ParentRun, root: Path, rows: list[dict[str, Any]], decision: dict[str, Any] | None,
            log_dir: Path, error: str | None, logger) -> dict[str, Any]:
    """Metrics, files and logs to the parent run; table + markdown artifacts to Prefect."""
    summary: dict[str, Any] = {"mlflow_parent_run_id": parent.run_id, "stages": rows, "promotion": decision}
    ok = error is None
    try:
        if error is not None:  # first, so that a failing report below cannot lose it
            parent.set_tags({"status_detail": "failed", "error": error})
        metrics = {}
        for path, data in dvc_stages.metrics(root).items():
            metrics.update(flatten(data, Path(path).stem, sep="/"))
        logged = parent.log_metrics(metrics)
        parent.log_params({"dvc_lock_md5": file_md5(root / "dvc.lock")})
        for f in (root / "params.yaml", root / "dvc.lock"):
            parent.log_artifact(f, "pipeline")
        for f in dvc_stages.report_files(root):
            parent.log_artifact(f, str((f if f.is_dir() else f.parent).relative_to(root)))
        parent.log_artifact(log_dir, "logs")
        tags = {"status_detail": "ok"} if ok else {}
        if decision is not None:
            tags["promotion"] = decision["message"]
        parent.set_tags(tags)
        summary["metrics"] = logged
        _prefect_artifacts(root, rows, metrics, decision, parent)
    except Exception as exc:  # reporting must not hide the stage failure that brought us here
        if ok:
            raise
        logger.warning("report after failure incomplete: %s", exc)
    return summary


def _prefect_artifacts(root: Path, rows: list[dict[str, Any]], metrics: dict[str, Any],
                       decision: dict[str, Any] | None, parent: ParentRun) -> None:
    table = [{"metric": k, "value": round(v, 4) if isinstance(v, float) else v} for k, v in sorted(metrics.items())]
    if decision is not None:
        table.append({"metric": "promotion", "value": decision["message"]})
    create_table_artifact(table=table or [{"metric": "-", "value": "-"}], key="quant-results",
                          description=f"DVC metrics of this run (MLflow parent run {parent.run_id})")
    create_table_artifact(table=rows or [{"stage": "-", "status": "-"}], key="quant-stages",
                          description="each stage: ran (stale) or up to date (DVC cache), seconds")
    tables = [f for f in dvc_stages.report_files(root) if f.is_file() and f.suffix == ".md"]
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
