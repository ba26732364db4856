"""A stage on several processes, started by accelerate's launcher (torchrun underneath).

`python -m tasks.<stage>` stays the one command (dvc.yaml, the Prefect flow, a shell).
`stage_entry` reads how many processes the stage's params ask for; for one it runs the
stage here (`tasks.common.main`), exactly as a stage always ran; for N > 1 it runs
accelerate's launcher *in this process*, which starts N copies of `python -m
tasks.<stage>` with RANK / LOCAL_RANK / WORLD_SIZE set. In those copies rank 0 runs
the stage through `main` (its MLflow run, metrics, outputs) and the others through
`worker_main` (the same `run`, no MLflow run of their own).

Why the launcher runs in this process rather than `os.exec` of `accelerate launch`:
torchrun reports a failed process by raising `ChildFailedError`, which the CLI turns
into exit status 1 whatever happened. Here the first failed process's own status is
kept, so bad params still exit 2 (never worth retrying) and a signal 128+N, as for a
one-process stage. Params that fail the stage's checks before launching are reported
by `main` in this process (a FAILED MLflow run, exit 2) and nothing is launched.

The launch is hermetic where it matters: the number of processes, one machine, a free
rendezvous port, no mixed precision or dynamo from a user's accelerate config (the
stage's Accelerator sets its own precision and FSDP plugin in code).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from quant.config import ConfigError, MissingDependencyError
from tasks import common

log = logging.getLogger("quant.launch")

LAUNCHER = [sys.executable, "-m", "accelerate.commands.launch"]  # the CLI, for callers that want a subprocess


def launched() -> bool:
    """True inside a process started by torchrun / accelerate's launcher."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_args(processes: int, target: list[str], port: int | None = None) -> list[str]:
    """Arguments of accelerate's launcher for `processes` processes on this machine running
    `target` (a script and its arguments, or ["-m", module, ...]).

    Several processes go through torchrun (`--multi_gpu`: on a machine without CUDA, or
    where the stage's Accelerator is made with cpu=True, the processes use gloo on the CPU)."""
    if processes < 1:
        raise ValueError(f"processes={processes} must be >= 1")
    mode = ["--multi_gpu", "--main_process_port", str(port or free_port())] if processes > 1 else []
    return [*mode, "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *target]


def _exit_status(exc: Any) -> int:
    """The stage's exit status from torchrun's ChildFailedError: 2 when any process met bad
    params or unusable inputs (torchrun then stops the others, which fail too), else the
    status of the first process that failed."""
    if any(f.exitcode == 2 for f in exc.failures.values()):
        return 2
    _, failure = exc.get_first_failure()
    code = int(failure.exitcode)
    return 128 - code if code < 0 else code  # negative: killed by signal -code


def relaunch(module: str, processes: int) -> NoReturn:
    """Run `python -m <module>` in `processes` processes through accelerate's launcher and
    exit with the stage's status (0, or the first failed process's own status)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    common.track_stderr()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    common.die_with_parent()  # a killed `dvc repro` takes the launcher, which stops its processes
    argv = launcher_args(processes, ["-m", module])
    log.info("launching %d processes: accelerate launch %s", processes, " ".join(argv))
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        sys.exit(_exit_status(exc))
    except SignalException as exc:  # torchrun stopped the processes on SIGTERM / SIGINT
        common.print_error(f"{module} stopped by {signal.Signals(exc.sigval).name}")
        sys.exit(128 + int(exc.sigval))
    sys.exit(0)


def worker_main(stage: str, run: Callable[[common.Params], Any]) -> None:
    """A process other than rank 0 of a launched stage: the same `run`, no MLflow run; bad
    params exit 2 and a signal 128+N, as `common.main` does on rank 0."""
    common.track_stderr()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank()}] %(name)s %(levelname)s %(message)s")
    common.handle_signals(stage)
    common.die_with_parent()
    try:
        run(common.load_params())
    except (ConfigError, MissingDependencyError) as exc:
        common.print_error(str(exc), prefix=f"error [rank {rank()}]")
        sys.exit(2)
    except common.StageInterrupted as exc:
        common.exit_now(128 + exc.signum)


def stage_entry(stage: str, module: str, run: Callable[[common.Params], Any],
                processes: Callable[[common.Params], int]) -> None:
    """`python -m tasks.<stage>`: the stage in this process, or in `processes(params)`
    processes through accelerate's launcher (see the module docstring)."""
    if launched():
        if rank() == 0:
            common.main(stage, run)
        else:
            worker_main(stage, run)
        return
    try:
        n = processes(common.load_params())
    except Exception:  # noqa: BLE001 (whatever it is, `main` meets it again in `run` and reports it)
        n = 1  # bad params: a FAILED run and exit 2, from the same checks, before any work
    if n == 1:
        common.main(stage, run)
    else:
        relaunch(module, n)
