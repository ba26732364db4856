"""The crash watcher: a Running flow run whose process is gone becomes Crashed, and only then.

    python -m flows.watch [--interval 15] [--status <file>] [--once]

`make servers-up` starts it next to the Prefect server (scripts/servers.py, service
`crash-watch`), in place of a "no heartbeat for 90 s" automation, which on a loaded
machine took live runs for dead ones (see flows/liveness.py). Every `interval` seconds
it reads the Running flow runs of the Prefect server and each one's lease:

- the lease's process runs (same host: pid and start time; other host: touched within
  its adaptive window): left alone, however late its heartbeats are;
- the lease's process is gone: the run is set Crashed with the reason (which frees a
  deployment's concurrency slot, and makes the pipeline resubmit a shard run), and the
  MLflow runs it left RUNNING are set FAILED (flows/reaper.py);
- no lease (a flow of another project, or a run still starting): left alone.

A lease whose run ended more than a day ago is removed. `--status` is a JSON file the
watcher rewrites after every pass (when, how many runs, what it crashed): scripts/servers.py
reads it to tell that the watcher is up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flows import reaper
from flows.liveness import Verdict, judge, lease_dir, read_lease

log = logging.getLogger("quant.watch")
INTERVAL = 15.0
KEEP_ENDED_LEASES = 24 * 3600.0


@dataclass(frozen=True)
class Decision:
    flow_run_id: str
    name: str
    verdict: Verdict
    crashed: bool  # this pass set it Crashed


def check_runs(client, directory: Path | None = None, root: Path | None = None, now: float | None = None,
               host: str | None = None) -> list[Decision]:
    """One pass over the Running flow runs of `client`'s server (a sync PrefectClient)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    running: list = []
    while True:  # the API serves at most 200 at a time
        page = client.read_flow_runs(flow_run_filter=flt, offset=len(running), limit=200)
        running += page
        if len(page) < 200:
            break
    out = []
    for run in running:
        verdict = judge(read_lease(str(run.id), directory), now, host)
        crashed = verdict.alive is False and _crash(client, run, verdict, root or Path.cwd())
        out.append(Decision(str(run.id), run.name, verdict, crashed))
    return out


def _crash(client, run, verdict: Verdict, root: Path) -> bool:
    from prefect.states import Crashed

    message = f"crash watcher: {verdict.reason}"
    result = client.set_flow_run_state(run.id, Crashed(message=message))
    if getattr(result, "status", None) is not None and str(result.status.value).upper() != "ACCEPT":
        log.info("flow run %s (%s): Crashed not accepted (%s)", run.name, run.id, result.status)
        return False
    log.warning("flow run %s (%s) set Crashed: %s", run.name, run.id, verdict.reason)
    try:
        failed = reaper.fail_runs_of(root, str(run.id), f"flow run crashed: {message}")
        if failed:
            log.warning("flow run %s: %d MLflow run(s) left RUNNING set FAILED", run.name, len(failed))
    except Exception as exc:  # MLflow down: the next flow run's reaper does it
        log.warning("flow run %s: MLflow runs not updated (%s)", run.name, exc)
    return True


def remove_old_leases(directory: Path, now: float | None = None) -> int:
    """Delete leases of runs that ended (or whose file was not touched) more than a day ago."""
    now = time.time() if now is None else now
    removed = 0
    for f in directory.glob("*.json") if directory.is_dir() else []:
        try:
            if now - f.stat().st_mtime > KEEP_ENDED_LEASES:
                f.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def watch(interval: float, status: Path | None, once: bool = False) -> None:
    from prefect.client.orchestration import get_client

    directory = lease_dir()
    while True:
        started = time.time()
        try:
            with get_client(sync_client=True) as client:
                decisions = check_runs(client, directory)
            remove_old_leases(directory)
            _write_status(status, started, decisions, None)
        except Exception as exc:  # the server restarting, a network hiccup: try again next pass
            log.warning("crash watcher pass failed: %s", exc)
            _write_status(status, started, [], str(exc))
        if once:
            return
        time.sleep(max(0.0, interval - (time.time() - started)))


def _write_status(path: Path | None, checked: float, decisions: list[Decision], error: str | None) -> None:
    if path is None:
        return
    data = {"pid": os.getpid(), "checked": checked, "running": len(decisions), "error": error,
            "crashed": [d.flow_run_id for d in decisions if d.crashed],
            "runs": [{"id": d.flow_run_id, "name": d.name, "alive": d.verdict.alive, "why": d.verdict.reason}
                     for d in decisions]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=INTERVAL, help="seconds between passes")
    ap.add_argument("--status", type=Path, default=None, help="JSON file rewritten after every pass")
    ap.add_argument("--once", action="store_true", help="one pass, then exit")
    args = ap.parse_args(argv)
    if args.interval <= 0:
        print(f"error: --interval {args.interval} must be > 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a request per pass: the log is for decisions
    watch(args.interval, args.status, args.once)
    return 0


if __name__ == "__main__":
    sys.exit(main())
