"""What `make deploy`, `make flow-run` and `make promote` run on the user's side.

    python -m flows.client check            # servers reachable? else say `make servers-up`
    python -m flows.client run [-S k=v ...] [-T stage ...] [--shards quant-shard/shard]   # run it, watch it

`run` submits the deployment, follows its state and, at the end, prints what the user
needs: on success the final state (and its message: a refused promotion says so); on
failure the failing stage and its one-line error (the flow's state message), the log
file to read, and exit 1; on a crash (worker or flow process killed: Prefect's zombie
automation sets Crashed once heartbeats stop) it marks the run's MLflow runs FAILED
(flows/reaper.py) and exits 1. With the servers down it says to run `make servers-up`
instead of showing a connection traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
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
    last, t0 = None, time.time()
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(fr.id).state
            if state is not None and state.name != last:
                last = state.name
                print(f"  {time.strftime('%H:%M:%S')} {state.name}", flush=True)
            if state is not None and state.is_final():
                break
            if time.time() - t0 > timeout:
                print(f"still {last} after {timeout:.0f}s; follow it in the UI", file=sys.stderr)
                return 1
            time.sleep(2)
    return report(str(fr.id), state)


def report(flow_run_id: str, state) -> int:
    message = (state.message or "").strip()
    if state.is_completed():
        print(f"Flow run finished: {state.name}" + (f" ({message})" if message else ""))
        return 0
    if state.is_crashed():
        from flows.reaper import fail_runs_of

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
