"""quant-shard: one item of a DVC `foreach` stage (a synthesis shard) as a flow run of its
own, on whichever worker of a Prefect work pool takes it.

The pipeline flow (flows/pipeline.py) with `shard_deployment="quant-shard/shard"` submits
each item of a foreach wave as a flow run of this deployment (prefect.yaml `shard`, work
pool `quant-shards`) instead of running it in its own process, and waits for them. A worker
with a free slot takes one: start one worker per GPU, each with `--limit 1` and its own
`CUDA_VISIBLE_DEVICES` (`make shard-worker NAME=gpu1 GPUS=1`), on this machine or on others.

What runs here is what the pipeline would run itself: the same `run_stage` task, i.e.
`dvc repro --single-item <stage>`, in the pipeline's checkout (`workdir`, relative to this
deployment's working directory, the checkout `prefect deploy` ran in: `.`, or the run's
scratch checkout under `.state/scratch/`), with the pipeline's environment (MLflow parent run
id, experiment and tracking URI, QUANT_CACHE_DIR), on the GPUs the worker was given. The
stage's row (ran / restored / up to date, seconds, GPU, host and pid) or its failure (exit code, last
lines, bad params or not) goes to the run's `quant-shard` table artifact, which the
pipeline reads back through the Prefect API.

Crashes: a shard run keeps a lease naming its process (flows/liveness.py); once that
process is gone (its worker killed with it), the crash watcher (flows/watch.py) sets the
run Crashed, and the pipeline submits the item again (its `retries`): a worker with a free
slot takes it. A slow shard on a loaded machine is never taken for a dead one. The killed stage's MLflow run is marked FAILED when the stage starts again
(tasks/common), and DVC drops the dead process's entry from its lock file.

What several machines need, and what is not handled: every worker must see the pipeline's
checkout (dvc.yaml, params.yaml, dvc.lock, the DVC cache, `.state/`) at the same path, on a
shared filesystem, and reach the Prefect and MLflow servers (they listen on 127.0.0.1 only:
an SSH tunnel to the head machine, `ssh -N -L 4200:127.0.0.1:4200 -L 5000:127.0.0.1:5000`).
Workers without the shared checkout (pulling deps from a DVC remote, pushing outputs and
handing the dvc.lock entry back) are not supported: a shard that does not see the
pipeline's checkout (no dvc.yaml at `workdir`, or another params.yaml) fails saying so.
DVC's lock file recognises dead processes by pid on its own machine only.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from flows import dvc_stages, liveness
from flows.pool import SHARD_ARTIFACT, SHARD_FLOW
from flows.stages import run_stage
from flows.tracking import file_md5


class ShardCheckoutError(RuntimeError):
    """The worker does not see the pipeline's checkout (no shared filesystem)."""


@flow(name=SHARD_FLOW, log_prints=True)
def run_shard(stage: str, workdir: str = ".", env: dict[str, str] | None = None,
              log_dir: str = ".state/logs/shards", force: bool = False,
              params_md5: str | None = None) -> dict[str, Any]:
    """`dvc repro --single-item <stage>` for one foreach item, in `workdir` (relative to the
    deployment's working directory) with the pipeline's `env`; `params_md5`, when given, is
    the md5 of the pipeline's params.yaml there, which this worker must see too."""
    if "@" not in stage:
        raise ValueError(f"stage={stage!r} is not an item of a foreach stage (`<name>@<key>`, e.g. synthesize@0)")
    root = Path.cwd()
    work = (root / workdir).resolve()
    _check_checkout(root, work, workdir, params_md5)
    where = {"gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "host": socket.gethostname(), "pid": os.getpid()}
    liveness.guard_streams()
    try:
        with liveness.Lease(str(flow_run.get_id() or "local")):
            row = run_stage(stage, str(work), dict(env or {}), str(root / log_dir), force)
    except dvc_stages.StageFailed as exc:
        _leave_row({"stage": stage, "status": "failed", "returncode": exc.returncode,
                    "config_error": exc.config_error, "tail": exc.tail, **where})
        raise
    row = {**row, **where}
    _leave_row(row)
    return row


def _check_checkout(root: Path, work: Path, workdir: str, params_md5: str | None) -> None:
    if not (work / "dvc.yaml").is_file():
        raise ShardCheckoutError(
            f"no dvc.yaml at workdir={workdir!r} ({work}, under this deployment's working directory {root} on "
            f"{socket.gethostname()}): shard workers need the pipeline's checkout at the same path (a shared "
            f"filesystem; see flows/shard.py)")
    seen = file_md5(work / dvc_stages.PARAMS_FILE)
    if params_md5 is not None and seen != params_md5:
        raise ShardCheckoutError(
            f"{work / dvc_stages.PARAMS_FILE} on {socket.gethostname()} has md5 {seen}, the pipeline's has "
            f"{params_md5}: this worker sees another checkout than the pipeline's (a shared filesystem is needed)")


def _leave_row(row: dict[str, Any]) -> None:
    """The pipeline reads this back (flows.pool.run_stage_on_pool)."""
    create_table_artifact(table=[row], key=SHARD_ARTIFACT,
                          description=f"shard {row['stage']}: {row['status']} on {row['host']} (pid {row['pid']})")
