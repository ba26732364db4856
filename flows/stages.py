"""The Prefect tasks of the pipeline flow: one DVC stage, and the promotion after them.

`run_stage` is the one way a stage runs, in the pipeline's own process or on a shard
worker (flows/shard.py): `dvc repro --single-item <stage>` (flows/dvc_stages.py), with
what a person following the run needs as log lines, in one form that `make flow-run`
prints (flows/client.py): `stage x: started`, `stage x: 40% block 4/10 [...]`, and
`stage x: ran in 12.3s` / `restored from the run cache` / `up to date`.

The `register` stage is the one stage whose result lives outside DVC as well: the version
it registered is in a tracking store. When DVC finds it up to date (or restores it) but
its metrics/register.json names another store than the run's (a `make run` into the
local sqlite store, then a flow run against the servers), the version would not exist
where this run promotes: the stage runs again, into this run's store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from flows import dvc_stages
from flows.tracking import tracking_uri

REGISTER_STAGE = "register"
REGISTER_METRICS = Path("metrics/register.json")  # tasks/register.py: the version and the store it is in
PROMOTION_REFUSED = 3  # exit code of `python -m tasks.register promote` when a gate failed
STAGE_NAME_ENV = "QUANT_STAGE_RUN_NAME"  # the MLflow stage run's name (`synthesize@0`), read by tasks/common
OUTCOME_TEXT = {dvc_stages.RAN: "ran", dvc_stages.RESTORED: "restored from the run cache",
                dvc_stages.UP_TO_DATE: "up to date"}


def retry_unless_bad_params(task, task_run, state) -> bool:
    """Retry a failed stage unless it rejected its params (exit 2): that never heals; nor
    anything that says it must not be retried (a cancelled shard run: `retry = False`)."""
    try:
        state.result()
    except dvc_stages.StageFailed as exc:
        return not exc.config_error
    except Exception as exc:
        return bool(getattr(exc, "retry", True))
    return False


@task(task_run_name="{stage}", cache_policy=NO_CACHE, retry_condition_fn=retry_unless_bad_params)
def run_stage(stage: str, root: str, extra_env: dict[str, str], log_dir: str, force: bool) -> dict[str, Any]:
    """One `dvc repro --single-item <stage>`; its output streams into the task's log."""
    logger = get_run_logger()
    env = dvc_stages.stage_env(dict(os.environ), **extra_env, **{STAGE_NAME_ENV: stage})
    started = datetime.now().isoformat(timespec="seconds")
    log = Path(log_dir) / f"{stage.replace('@', '-')}.log"
    logger.info("stage %s: started", stage)
    r = dvc_stages.repro(stage, Path(root), env, log, force, echo=logger.info, progress=StageProgress(stage, logger))
    if stage == REGISTER_STAGE and not r.ran:
        store = extra_env.get("MLFLOW_TRACKING_URI") or tracking_uri(Path(root))
        elsewhere = registered_elsewhere(Path(root), store)
        if elsewhere is not None:
            logger.info("stage %s: %s names %s as its store, this run's is %s: registering again", stage,
                        REGISTER_METRICS, elsewhere, store)
            r = dvc_stages.repro(stage, Path(root), env, log, True, echo=logger.info,
                                 progress=StageProgress(stage, logger))
    logger.info("stage %s: %s in %.1fs", stage, OUTCOME_TEXT[r.outcome], r.seconds)
    return {"stage": stage, "status": r.outcome, "started": started, "seconds": r.seconds,
            "gpu": extra_env.get("CUDA_VISIBLE_DEVICES", "")}


def registered_elsewhere(root: Path, store: str) -> str | None:
    """The store metrics/register.json says its version is in, when that is not `store`
    (a file without one, from before stores were recorded, counts as elsewhere)."""
    f = root / REGISTER_METRICS
    if not f.is_file():
        return None
    recorded = json.loads(f.read_text()).get("store")
    if recorded and same_store(recorded, store):
        return None
    return recorded or "an unrecorded store"


def same_store(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


class StageProgress:
    """A stage's progress (tqdm bars, counting lines such as `block 12/30`): one Prefect
    progress artifact per stage, and a log line per 10% of each bar that lasts
    (`stage block_ap: 40% block 12/30`); bars that come and go within PROGRESS_EVERY
    (loading weights) only reach the artifact."""

    def __init__(self, stage: str, logger, clock=time.time):
        self.stage, self.logger, self.clock, self.id = stage, logger, clock, None
        self.bars: dict[str, tuple[float, float]] = {}  # which bar -> (first seen, last percent logged)

    def __call__(self, percent: float, line: str) -> None:
        counted = dvc_stages.progress_of(line)
        what = counted[2] if counted else line.strip()
        key = dvc_stages.PROGRESS.sub("", line).split("[")[0].strip() if counted else what
        if counted and dvc_stages.PROGRESS.search(line) is None:
            key = what.split(" ")[0]  # a counting line: `block`
        now = self.clock()
        first, logged = self.bars.setdefault(key, (now, 0.0))
        lasted = now - first >= dvc_stages.PROGRESS_EVERY or logged > 0
        if percent > 0 and lasted and (percent - logged >= 10 or (percent >= 100 > logged)):
            self.bars[key] = (first, percent)
            self.logger.info("stage %s: %.0f%% %s", self.stage, percent, what)
        try:
            if self.id is None:
                self.id = create_progress_artifact(percent, key=f"progress-{artifact_key(self.stage)}",
                                                   description=f"{self.stage}: {what}"[:500])
            else:
                update_progress_artifact(self.id, percent, description=f"{self.stage}: {what}"[:500])
        except Exception as exc:  # progress reporting never fails a stage
            self.logger.debug("progress artifact: %s", exc)


def artifact_key(stage: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in stage.lower())


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
