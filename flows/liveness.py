"""Is a flow run's process alive? A lease file the flow process keeps, and the one verdict
that the crash watcher, the MLflow reaper and `make flow-run` share.

Why not Prefect's heartbeats and a zombie automation ("no heartbeat for 90 s -> Crashed"):
on a loaded machine heartbeats arrive minutes late, the automation declares a live run
Crashed, Crashed releases the run's concurrency lease, and the run, failing to renew it,
terminates itself; the reaper then marks its MLflow runs FAILED. A late heartbeat cannot
tell a slow process from a dead one. The kernel can: a lease names the process (host,
pid, its start time), so on the host that runs it the verdict is `kill(pid, 0)` and the
start time (a reused pid is another process), never a clock. Only a process on another
host is judged by the age of its lease, against a window that grows with the worst
lateness the lease has seen (a loaded machine shows it), and that window is generous.

The lease is written by a plain daemon thread (no event loop, no HTTP), every
LEASE_SECONDS, atomically, under `lease_dir()`: $QUANT_LEASE_DIR (scripts/servers.py
exports `<state>/leases`), else $PREFECT_HOME/leases. The watcher (flows/watch.py) reads
it next to the Prefect server.

`guard_streams` keeps a flow process alive when the worker that started it dies: the
worker holds the read end of the flow's stdout/stderr pipes, and the next log line would
raise EPIPE (rich, behind Prefect's console log handler, turns that into SystemExit(1)).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.tracking import process_alive, process_start

LEASE_SECONDS = 10.0  # how often the flow process touches its lease
BASE_WINDOW = 300.0  # a lease on another host older than this (at least) means a dead process
LATE_FACTOR = 4.0  # ... or older than this many times the worst gap the lease has seen
LEASE_DIR_ENV = "QUANT_LEASE_DIR"
log = logging.getLogger("quant.liveness")


def lease_dir() -> Path:
    explicit = os.environ.get(LEASE_DIR_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect") / "leases"


@dataclass(frozen=True)
class LeaseRecord:
    flow_run_id: str
    host: str
    pid: int
    pid_start: str
    touched: float  # the writer's clock
    max_gap: float  # the longest time between two touches so far (seconds)
    interval: float
    ended: bool = False  # the flow function returned or raised; the process is finishing

    @classmethod
    def read(cls, path: Path) -> LeaseRecord | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def read_lease(flow_run_id: str, directory: Path | None = None) -> LeaseRecord | None:
    return LeaseRecord.read((directory or lease_dir()) / f"{flow_run_id}.json")


class Lease:
    """The lease of one flow run, kept fresh by a daemon thread while the run's code runs."""

    def __init__(self, flow_run_id: str, directory: Path | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.path = (directory or lease_dir()) / f"{flow_run_id}.json"
        self.flow_run_id, self.interval, self.clock = flow_run_id, interval or LEASE_SECONDS, clock
        self.pid = os.getpid()
        self.pid_start, self.host = process_start(self.pid), socket.gethostname()
        self.max_gap, self.last = 0.0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{flow_run_id[:8]}", daemon=True)

    def __enter__(self) -> Lease:
        try:
            self.touch()
        except OSError as exc:  # no lease: the watcher leaves the run alone (it cannot judge it)
            log.warning("no lease for flow run %s (%s): crash detection cannot see it", self.flow_run_id, exc)
            return self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.touch(ended=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):  # a full or vanished disk must not end the run
                self.touch()

    def touch(self, ended: bool = False) -> None:
        now = self.clock()
        if self.last is not None:
            self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
        rec = LeaseRecord(self.flow_run_id, self.host, self.pid, self.pid_start, now, round(self.max_gap, 3),
                          self.interval, ended)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{self.pid}")
        tmp.write_text(json.dumps(asdict(rec)))
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class Verdict:
    alive: bool | None  # None: no lease, nothing to judge by
    reason: str


def judge(rec: LeaseRecord | None, now: float | None = None, host: str | None = None) -> Verdict:
    """Whether the process that holds the lease still runs."""
    if rec is None:
        return Verdict(None, "no lease")
    here = host or socket.gethostname()
    where = f"process {rec.pid} on {rec.host}"
    if rec.host == here:
        if process_alive(rec.pid, rec.pid_start):
            return Verdict(True, f"{where} runs")
        return Verdict(False, f"{where} is gone (the worker or the flow process died)")
    age = (time.time() if now is None else now) - rec.touched
    window = window_for(rec)
    if age <= window:
        return Verdict(True, f"{where}: lease touched {age:.0f} s ago (window {window:.0f} s)")
    return Verdict(False, f"{where}: lease not touched for {age:.0f} s (window {window:.0f} s, worst gap "
                          f"seen {rec.max_gap:.0f} s): the process or its machine is gone")


def window_for(rec: LeaseRecord) -> float:
    """How old a lease on another host may get: BASE_WINDOW, or more when the lease has been
    late before (a loaded machine), so lateness alone never reads as death."""
    return max(BASE_WINDOW, LATE_FACTOR * rec.max_gap, 3 * rec.interval)


# ---------------------------------------------------------------------------
# A flow process whose worker died


_guarded: list[int] = []


def guard_streams() -> bool:
    """Put a forwarding thread between this process's stdout/stderr and the pipes they are
    (a worker's): writes always succeed, and once the reader is gone further output is
    dropped instead of raising EPIPE. Only for pipes (a terminal or a file cannot break
    that way); idempotent. Returns whether a guard was installed."""
    fds = [fd for fd in (1, 2) if fd not in _guarded and _is_pipe(fd)]
    for fd in fds:
        original = os.dup(fd)
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        t = threading.Thread(target=_forward, args=(r, original), name=f"stream-guard-{fd}", daemon=True)
        t.start()
        _guarded.append(fd)
        atexit.register(_drain, r)
    return bool(fds)


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _forward(r: int, original: int | None) -> None:
    while True:
        try:
            data = os.read(r, 1 << 16)
        except OSError:
            return
        if not data:
            return
        while original is not None and data:
            try:
                data = data[os.write(original, data):]
            except OSError:  # EPIPE: nobody reads any more; keep draining, forward nothing
                os.close(original)
                original = None


def _drain(r: int, timeout: float = 2.0) -> None:
    """At exit: flush Python's buffers and give the forwarding thread (a daemon, so it dies
    with the interpreter) the time to pass on what they held."""
    import fcntl
    import struct
    import sys
    import termios

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pending = struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return
        if not pending:
            return
        time.sleep(0.01)
