"""The pipeline's side of shards on a work pool: each item of a foreach wave (a synthesis
shard) as a flow run of the shard deployment (flows/shard.py, prefect.yaml `shard`), taken
by whichever worker of the pool `quant-shards` has a free slot; the pipeline waits for them.

The item's row (ran / restored / up to date, seconds, GPU, host, pid) or its stage's failure
comes back through the run's `quant-shard` table artifact. A shard run that ends without a
stage result (Crashed: its worker or process died, which the crash watcher establishes by
the process's liveness, flows/watch.py) raises ShardRunEnded, and the task's retries
submit the item again, so a live worker takes it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import dvc_stages
from flows.stages import retry_unless_bad_params
from flows.tracking import file_md5

SHARD_FLOW = "quant-shard"  # the flow of the shard deployment (flows/shard.py)
SHARD_DEPLOYMENT = f"{SHARD_FLOW}/shard"  # prefect.yaml
SHARD_ARTIFACT = "quant-shard"  # the table artifact a shard run leaves: its stage row, or its failure
SHARD_POLL_SECONDS = 2.0


class ShardRunEnded(RuntimeError):
    """A shard's flow run ended without a stage result: Crashed (its worker or process died),
    Failed before its stage ran (retried: another worker may take it), or Cancelled (not)."""

    def __init__(self, stage: str, run_name: str, state_name: str, message: str | None, retry: bool):
        self.stage, self.retry = stage, retry
        super().__init__(f"stage {stage!r}: shard flow run {run_name!r} ended {state_name}"
                         + (f": {message}" if message else ""))


@task(task_run_name="{stage} on {deployment}", cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_params)
def run_stage_on_pool(stage: str, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """One foreach item as a flow run of the shard deployment (flows/shard.py), taken by
    whichever worker of its pool has a free slot; waits for the run to end. Its row (or its
    stage's failure) comes back through the run's `quant-shard` artifact. A crashed run
    raises ShardRunEnded, and this task's retries submit a new one."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    fr = run_deployment(deployment, parameters={"stage": stage, **parameters}, timeout=0, as_subflow=True,
                        flow_run_name=f"{flow_run.get_name() or 'quant-pipeline'}/{stage}")
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


def check_shard_deployment(name: str, logger) -> None:
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


def pool_submitter(deployment: str, root: Path, work: Path, env: dict[str, str], log_dir: Path, force: bool,
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
