"""Start, stop and inspect the local servers: Prefect server, MLflow server, the crash watcher,
Prefect process worker.

    python scripts/servers.py up       # start what is not running, wait until healthy
    python scripts/servers.py down     # stop them and the shard workers (SIGTERM to each one's process group, then SIGKILL)
    python scripts/servers.py status   # what runs, where
    eval "$(python scripts/servers.py env)"   # point prefect/mlflow clients at them
    python scripts/servers.py shard-worker --name gpu1 --gpus 1   # one more worker, for shards

Shard workers: `up` creates the work pool of the shard deployment ($QUANT_SHARD_POOL,
quant-shards; prefect.yaml `shard`); `shard-worker` starts a process worker on it that runs
one flow run at a time (`--limit 1`) with CUDA_VISIBLE_DEVICES=--gpus, so one worker per GPU
takes one synthesis shard each. On another machine (same checkout path on a shared
filesystem, the servers reached through an SSH tunnel to 127.0.0.1) it is the same command.

The crash watcher (flows/watch.py) sets a Running flow run Crashed once its process is gone
(a lease names it, flows/liveness.py): a slow run on a loaded machine is never taken for a
dead one, as a heartbeat timeout would. `up` deletes the heartbeat automation that did that
on servers that still have it.

Why a script and not `prefect server start -b` + `mlflow server &`: the services must
share one state directory, one set of telemetry switches and one notion of "is it up"
(an HTTP health check, not a sleep), and stopping must end exactly the processes this
script started. Each service runs in its own session, its pid is kept in
`<state>/pids/<name>.pid` together with its command line, and `down` signals that
process group only after checking the pid still runs the command it started.

Everything binds 127.0.0.1; nothing else is accepted. State (Prefect database and
home, MLflow database and artifacts, logs) lives in `.state/` under the repository
(git-ignored) unless $QUANT_STATE_DIR says otherwise. Ports: $QUANT_PREFECT_PORT
(4200), $QUANT_MLFLOW_PORT (mlflow/server.toml, 5000); work pool: $QUANT_WORK_POOL
(quant-process). Telemetry is off for Prefect, MLflow, DVC and Hugging Face.

Standard library only, so it runs before anything is imported from the venv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
MLFLOW_CONFIG = ROOT / "mlflow" / "server.toml"
DEFAULT_POOL = "quant-process"
DEFAULT_SHARD_POOL = "quant-shards"
SHARD_WORKER = "shard-worker-"  # pid file / log name prefix of a shard worker

# Every switch each tool reads (MLflow wants DO_NOT_TRACK=true, not 1; its own
# switch is MLFLOW_DISABLE_TELEMETRY; Prefect accepts 1/true/yes).
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


class ServerError(RuntimeError):
    pass


@dataclass
class Settings:
    state: Path
    prefect_port: int
    mlflow_port: int
    pool: str
    shard_pool: str
    mlflow: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        state = Path(os.environ.get("QUANT_STATE_DIR") or ROOT / ".state").resolve()
        mlflow = tomllib.loads(MLFLOW_CONFIG.read_text())
        unknown = sorted(set(mlflow) - {"port", "workers", "backend_store_uri", "artifacts_destination", "env"})
        if unknown:
            raise ServerError(f"{MLFLOW_CONFIG}: unknown key(s) {unknown}")
        return cls(
            state=state,
            prefect_port=_port("QUANT_PREFECT_PORT", 4200),
            mlflow_port=_port("QUANT_MLFLOW_PORT", int(mlflow["port"])),
            pool=os.environ.get("QUANT_WORK_POOL") or DEFAULT_POOL,
            shard_pool=os.environ.get("QUANT_SHARD_POOL") or DEFAULT_SHARD_POOL,
            mlflow=mlflow,
        )

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    def client_env(self) -> dict[str, str]:
        """What a client (CLI, worker, flow, stage process) needs to reach these servers.
        Every flow run started with it, by a worker or in-process, keeps its lease where
        the crash watcher reads it, and sends Prefect heartbeats (shown in the UI; no
        decision rests on them)."""
        return {
            **TELEMETRY_OFF,
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_HOME": str(self.state / "prefect"),
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "QUANT_LEASE_DIR": str(self.state / "leases"),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        }


def _port(var: str, default: int) -> int:
    raw = os.environ.get(var)
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ServerError(f"${var}={raw!r} must be a TCP port number (1..65535)")
    return int(raw)


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int | None
    healthy: Callable[[float], bool]  # (start time) -> ready?
    env: dict[str, str] = field(default_factory=dict)


def _http_ok(url: str, method: str = "GET", body: bytes | None = None) -> bytes | None:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.read() if r.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def _worker_online(s: Settings, since: float, pool: str, name: str) -> bool:
    """Our worker sent a heartbeat after `since` (a record left by an earlier worker does not count)."""
    raw = _http_ok(f"{s.prefect_api_url}/work_pools/{pool}/workers/filter", "POST", b"{}")
    if not raw:
        return False
    return any(
        w.get("name") == name and w.get("status") == "ONLINE" and w.get("last_heartbeat_time")
        and datetime.fromisoformat(w["last_heartbeat_time"]).timestamp() >= since
        for w in json.loads(raw)
    )


def _watch_passed(s: Settings, since: float) -> bool:
    """The crash watcher finished a pass against the server after `since`."""
    try:
        st = json.loads((s.state / "crash-watch.json").read_text())
    except (OSError, ValueError):
        return False
    return st.get("checked", 0) >= since and not st.get("error")


def services(s: Settings) -> list[Service]:
    state = str(s.state)
    m = s.mlflow
    return [
        Service(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(s.prefect_port),
             "--analytics-off", "--log-level", "WARNING"],
            s.prefect_port,
            lambda since: _http_ok(f"{s.prefect_api_url}/health") == b"true",
        ),
        Service(
            "mlflow-server",
            [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(s.mlflow_port),
             "--workers", str(m["workers"]),
             "--backend-store-uri", m["backend_store_uri"].format(state=state),
             "--serve-artifacts", "--artifacts-destination", m["artifacts_destination"].format(state=state)],
            s.mlflow_port,
            lambda since: _http_ok(f"{s.mlflow_uri}/health") is not None,
            {k: str(v) for k, v in m.get("env", {}).items()},
        ),
        Service(
            "crash-watch",
            [sys.executable, "-m", "flows.watch", "--interval", str(WATCH_INTERVAL),
             "--status", str(s.state / "crash-watch.json")],
            None,
            lambda since: _watch_passed(s, since),
        ),
        Service(
            "prefect-worker",
            [str(BIN / "prefect"), "worker", "start", "--pool", s.pool, "--type", "process",
             "--name", f"{s.pool}-worker", "--install-policy", "never"],
            None,
            lambda since: _worker_online(s, since, s.pool, f"{s.pool}-worker"),
        ),
    ]


def shard_worker(s: Settings, name: str, gpus: str | None = None, limit: int = 1) -> Service:
    """A process worker on the shard pool running `limit` flow runs at a time, on `gpus`."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ServerError(f"--name {name!r} must be letters, digits, '-' or '_' (it names the worker and its pid file)")
    if gpus is not None and not all(g.strip().isdigit() for g in gpus.split(",")):
        raise ServerError(f"--gpus {gpus!r} must be GPU indices separated by commas, e.g. 0 or 0,1")
    if limit < 1:
        raise ServerError(f"--limit {limit} must be >= 1 (flow runs at a time)")
    worker = f"{s.shard_pool}-{name}"
    return Service(
        f"{SHARD_WORKER}{name}",
        [str(BIN / "prefect"), "worker", "start", "--pool", s.shard_pool, "--type", "process", "--name", worker,
         "--limit", str(limit), "--install-policy", "never"],
        None,
        lambda since: _worker_online(s, since, s.shard_pool, worker),
        {"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {},
    )


def shard_workers(s: Settings) -> list[Service]:
    """The shard workers that have a pid file (started by `shard-worker`)."""
    return [shard_worker(s, f.stem.removeprefix(SHARD_WORKER))
            for f in sorted((s.state / "pids").glob(f"{SHARD_WORKER}*.pid"))]


def ensure_pool(s: Settings, pool: str) -> None:
    """Create the process work pool `pool` unless the server has it (so that `prefect deploy`
    of a deployment on it works before any of its workers started)."""
    if _http_ok(f"{s.prefect_api_url}/work_pools/{pool}") is not None:
        return
    r = subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"],
                       env={**os.environ, **s.client_env()}, capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and _http_ok(f"{s.prefect_api_url}/work_pools/{pool}") is None:
        raise ServerError(f"could not create work pool {pool!r}: {(r.stdout + r.stderr)[-2000:]}")
    print(f"work pool {pool!r}: created")


# ---------------------------------------------------------------------------
# Automations

# Crash detection is the crash watcher's (flows/watch.py: the process's liveness). The
# heartbeat automation that came before it set live runs Crashed on a loaded machine, and
# a Crashed run loses its concurrency lease and terminates itself: a server that still has
# it gets it deleted.
RETIRED_AUTOMATIONS = ["quant-pipeline: crash zombie flow runs"]
WATCH_INTERVAL = 15


def retire_automations(s: Settings) -> None:
    """Delete the automations of RETIRED_AUTOMATIONS that the server has (by name)."""
    for name in RETIRED_AUTOMATIONS:
        body = json.dumps({"automations": {"name": {"any_": [name]}}}).encode()
        found = _http_ok(f"{s.prefect_api_url}/automations/filter", "POST", body)
        if found is None:
            raise ServerError(f"could not list automations at {s.prefect_api_url}")
        for auto in json.loads(found):
            req = urllib.request.Request(f"{s.prefect_api_url}/automations/{auto['id']}", method="DELETE")
            try:
                with urllib.request.urlopen(req, timeout=10):
                    pass
            except (urllib.error.URLError, OSError) as exc:
                raise ServerError(f"could not delete the retired automation {name!r}: {exc}") from None
            print(f"automation {name!r}: deleted (the crash watcher decides crashes now)")


# ---------------------------------------------------------------------------
# Process bookkeeping


def _pidfile(s: Settings, name: str) -> Path:
    return s.state / "pids" / f"{name}.pid"


def _running(s: Settings, svc: Service) -> int | None:
    """The pid of this service if the recorded process still runs the recorded command."""
    f = _pidfile(s, svc.name)
    if not f.exists():
        return None
    rec = json.loads(f.read_text())
    try:
        cmdline = Path(f"/proc/{rec['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if [c.decode() for c in cmdline if c][-len(rec["argv"]) + 1:] != rec["argv"][1:]:
        return None  # the pid was recycled by some other program
    return rec["pid"]


def _port_busy(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def start(s: Settings, svc: Service, timeout: float) -> None:
    if _running(s, svc):
        print(f"{svc.name}: already running")
        return
    if svc.port is not None and _port_busy(svc.port):
        raise ServerError(f"{svc.name}: {HOST}:{svc.port} is taken by another program; "
                          f"pick another port (QUANT_PREFECT_PORT / QUANT_MLFLOW_PORT)")
    for sub in ("pids", "logs", "prefect", "mlflow"):
        (s.state / sub).mkdir(parents=True, exist_ok=True)
    log = s.state / "logs" / f"{svc.name}.log"
    env = {**os.environ, **s.client_env(), **svc.env}
    with open(log, "ab") as out:
        proc = subprocess.Popen(svc.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    _pidfile(s, svc.name).write_text(json.dumps({"pid": proc.pid, "argv": svc.argv}))
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise ServerError(f"{svc.name} exited with code {proc.returncode}; last lines of {log}:\n{_tail(log)}")
        if svc.healthy(t0):
            print(f"{svc.name}: up in {time.time() - t0:.1f}s (pid {proc.pid}, log {log})")
            return
        time.sleep(0.5)
    stop(s, svc)
    raise ServerError(f"{svc.name} not healthy after {timeout:.0f}s; last lines of {log}:\n{_tail(log)}")


def stop(s: Settings, svc: Service, grace: float = 30.0) -> None:
    pid = _running(s, svc)
    if pid is None:
        _pidfile(s, svc.name).unlink(missing_ok=True)
        print(f"{svc.name}: not running")
        return
    # start_new_session made the service its own process-group leader: signal that group
    # (uvicorn workers, ...) and the groups of its descendants that left it (the process
    # worker starts each flow run in a session of its own), nothing else.
    members = [pid, *_descendants(pid)]
    groups = sorted({g for g in map(_pgid, members) if g is not None})
    _signal_groups(groups, signal.SIGTERM)
    t0 = time.time()
    while time.time() - t0 < grace and _alive(pid):
        time.sleep(0.2)
    # SIGKILL only groups that still hold one of the processes we signalled
    _signal_groups(sorted({g for g in map(_pgid, members) if g in groups}), signal.SIGKILL)
    _pidfile(s, svc.name).unlink(missing_ok=True)
    print(f"{svc.name}: stopped (pid {pid})")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pgid(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[2]) if st else None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))):
            children.setdefault(int(st[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal_groups(groups: list[int], sig: int) -> None:
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, sig)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


# ---------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["up", "down", "status", "env", "shard-worker"])
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each service")
    ap.add_argument("--name", default="1", help="shard-worker: its name (worker <shard pool>-<name>)")
    ap.add_argument("--gpus", default=None, help="shard-worker: its CUDA_VISIBLE_DEVICES, e.g. 1 (default: inherited)")
    ap.add_argument("--limit", type=int, default=1, help="shard-worker: flow runs at a time (default 1)")
    args = ap.parse_args(argv)
    try:
        s = Settings.from_env()
        svcs = services(s)
        if args.action == "up":
            for svc in svcs:
                start(s, svc, args.timeout)
            retire_automations(s)
            ensure_pool(s, s.shard_pool)
            print(f"Prefect API {s.prefect_api_url} (UI http://{HOST}:{s.prefect_port}), "
                  f"MLflow {s.mlflow_uri}, work pools {s.pool!r} and {s.shard_pool!r} (shards), state {s.state}")
        elif args.action == "shard-worker":
            svc = shard_worker(s, args.name, args.gpus, args.limit)
            if _http_ok(f"{s.prefect_api_url}/health") != b"true":
                raise ServerError(f"the Prefect server is not up at {s.prefect_api_url}: run `make servers-up` "
                                  f"first (on another machine: tunnel its port {s.prefect_port} here)")
            start(s, svc, args.timeout)
        elif args.action == "down":
            for svc in [*shard_workers(s), *reversed(svcs)]:
                stop(s, svc)
        elif args.action == "status":
            up = True
            for svc in svcs:
                pid = _running(s, svc)
                ok = pid is not None and svc.healthy(0.0)
                up &= ok
                print(f"{svc.name}: {'up' if ok else 'down'}" + (f" (pid {pid})" if pid else ""))
            for svc in shard_workers(s):  # optional: not part of "up"
                pid = _running(s, svc)
                print(f"{svc.name}: {'running' if pid else 'down'}" + (f" (pid {pid})" if pid else ""))
            return 0 if up else 1
        else:
            for k, v in s.client_env().items():
                print(f"export {k}={v}")
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
