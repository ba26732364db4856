"""What `make deploy`, `make flow-run` and `make promote` run on the user's side.

    python -m flows.client check            # servers reachable? else say `make servers-up`
    python -m flows.client run [-S k=v ...] [-T stage ...] [--shards quant-shard/shard]   # run it, watch it

`run` submits the deployment and follows it as it runs: state changes, and the flow's
stage-level log lines (flows/stages.py: `stage x: started`, `stage x: 40% block 4/10`,
`stage x: ran in 12.3s` / `restored from the run cache` / `up to date`, the plan, the
promotion, the DVC experiment), not every line of every stage (those are in the UI and in
.state/logs/flow-runs/<id>/). At the end it prints what the user needs: on success the
final state (and its message: a refused promotion says so); on failure the failing stage
and its one-line error (the flow's state message), the log file to read, and exit 1; on a
crash (the crash watcher found the worker or flow process gone) it marks the run's MLflow
runs FAILED (flows/reaper.py) and exits 1, unless the run's process still runs (a false
alarm: its MLflow runs are left to it). With the servers down it says to run
`make servers-up` instead of showing a connection traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

DEPLOYMENT = "quant-pipeline/embedded-default"
SERVERS_DOWN = "{what} is not reachable at {url}: start the servers with `make servers-up`"


def unreachable() -> str | None:
    """None when the Prefect API (and the MLflow server, when one is configured) answer,
    else the line to print."""
    checks = [("the Prefect server", os.environ.get("PREFECT_API_URL", ""), "/health")]
    mlflow = os.environ.get("MLFLOW_TRACKING_URI", "")
    if mlflow.startswith("http"):
        checks.append(("the MLflow server", mlflow, "/health"))
    for what, url, path in checks:
        if not url:
            return "PREFECT_API_URL is not set: start the servers with `make servers-up`"
        try:
            with urllib.request.urlopen(url.rstrip("/") + path, timeout=5) as r:
                if r.status == 200:
                    continue
        except (urllib.error.URLError, OSError):
            pass
        return SERVERS_DOWN.format(what=what, url=url)
    return None


def run(overrides: list[str], targets: list[str] | None, timeout: float, shards: str | None = None) -> int:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        params = {"overrides": overrides, "targets": targets, **({"shard_deployment": shards} if shards else {})}
        fr = run_deployment(DEPLOYMENT, parameters=params, timeout=0)
    except ObjectNotFound:
        print(f"error: deployment {DEPLOYMENT!r} not found on this Prefect server: run `make deploy` first",
              file=sys.stderr)
        return 2
    print(f"flow run {fr.name!r} ({fr.id}) submitted; UI {os.environ.get('PREFECT_API_URL', '')[:-4]}"
          f"/runs/flow-run/{fr.id}", flush=True)
    with get_client(sync_client=True) as client:
        state = follow(client, fr.id, timeout)
    if state is None:
        print(f"still running after {timeout:.0f}s; follow it in the UI", file=sys.stderr)
        return 1
    return report(str(fr.id), state)


# the flow's lines a person follows a run by (flows/pipeline.py, flows/stages.py)
PROGRESS_LINE = re.compile(r"^(stage \S+: |stages: |overrides |promotion: |DVC experiment |"
                           r"this run's params\.yaml)")


def follow(client, flow_run_id, timeout: float, poll: float = 2.0, clock=time.time, sleep=time.sleep,
           out=None):
    """Print the run's state changes and progress lines (to `out`, default stdout) until it
    ends; returns its final state, or None after `timeout` seconds."""
    out = out or sys.stdout
    last, seen, since, t0 = None, set(), None, clock()
    while True:
        state = client.read_flow_run(flow_run_id).state
        final = state is not None and state.is_final()
        for rec in _logs(client, flow_run_id, since):
            since = max(since or rec.timestamp, rec.timestamp - LATE_LOGS)
            if rec.id not in seen and PROGRESS_LINE.match(rec.message):
                seen.add(rec.id)
                print(f"  {rec.timestamp.astimezone().strftime('%H:%M:%S')} {rec.message}", file=out, flush=True)
        if state is not None and state.name != last:
            last = state.name
            print(f"  {time.strftime('%H:%M:%S')} {state.name}", file=out, flush=True)
        if final:
            return state
        if clock() - t0 > timeout:
            return None
        sleep(poll)


LATE_LOGS = timedelta(seconds=60)  # logs reach the API in batches: look back this far each time


def _logs(client, flow_run_id, since) -> list:
    """The run's log records from `since` on (all of them without), oldest first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort

    flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                    timestamp=LogFilterTimestamp(after_=since) if since is not None else None)
    out: list = []
    while True:
        page = client.read_logs(log_filter=flt, sort=LogSort.TIMESTAMP_ASC, offset=len(out), limit=200)
        out += page
        if len(page) < 200:
            return out


def report(flow_run_id: str, state) -> int:
    message = (state.message or "").strip()
    if state.is_completed():
        print(f"Flow run finished: {state.name}" + (f" ({message})" if message else ""))
        return 0
    if state.is_crashed():
        from flows.liveness import judge, read_lease
        from flows.reaper import fail_runs_of

        alive = judge(read_lease(flow_run_id))
        if alive.alive:  # set Crashed from outside, yet its process runs: leave its MLflow runs to it
            print(f"Flow run CRASHED: {message}\n  but {alive.reason}: its MLflow runs are left as they are",
                  file=sys.stderr)
            return 1
        changed = fail_runs_of(Path.cwd(), flow_run_id, f"flow run crashed: {message}")
        print(f"Flow run CRASHED: {message}\n  its {len(changed)} MLflow run(s) left RUNNING are now FAILED; "
              f"run again with `make flow-run`", file=sys.stderr)
        return 1
    # "Flow run encountered an exception: PipelineFailed: stage 'evaluate' failed: ..."
    reason = message.split("PipelineFailed: ", 1)[-1] if "PipelineFailed: " in message else message
    print(f"Flow run {state.name}: {reason}", file=sys.stderr)
    logs = Path(".state") / "logs" / "flow-runs" / flow_run_id
    if logs.is_dir():
        print(f"  stage logs: {logs}/", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="are the servers up?")
    r = sub.add_parser("run", help="run the deployment and wait for it")
    r.add_argument("-S", dest="overrides", default="", help="params overrides, space separated (key=value ...)")
    r.add_argument("-T", dest="targets", default="", help="stages to run (and what they depend on), space separated")
    r.add_argument("--shards", default=None,
                   help="run the foreach items (synthesis shards) as flow runs of this deployment on its work "
                        "pool, e.g. quant-shard/shard (start workers with `make shard-worker`)")
    r.add_argument("--timeout", type=float, default=6 * 3600)
    args = ap.parse_args(argv)
    down = unreachable()
    if down:
        print(f"error: {down}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        return 0
    return run(args.overrides.split(), args.targets.split() or None, args.timeout, args.shards)


if __name__ == "__main__":
    sys.exit(main())
