"""The DVC side of the pipeline flow: params overrides, the stage graph, waves, one repro.

Nothing here knows about Prefect or MLflow, so the tests drive it directly.

- `apply_overrides` changes params.yaml with DVC's own `-S` machinery
  (`dvc.utils.hydra.apply_overrides`, what `dvc exp run -S` calls), after checking
  every override on a scratch copy first: one bad override changes nothing and the
  error names it.
- `read_graph` asks DVC for the stage graph (the same index `dvc dag` prints), with
  `foreach`/`matrix` stages already expanded (`synthesize@0`, `synthesize@1`, ...).
- `waves` orders it: one stage at a time in dependency order, except that the ready
  items of one `foreach` stage form a single wave and run concurrently.
- `repro` runs `dvc repro --single-item <stage>` and tells "ran" from "up to date".
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARAMS_FILE = "params.yaml"
# DVC gives up on its repo lock after ~3 s; concurrent shards can contend for it at
# start and end of their repro, which is not a stage failure: try again.
LOCK_ERROR = "Unable to acquire lock"
LOCK_RETRIES = 30
CONFIG_ERROR_EXIT = 2  # tasks.common.main exits 2 on a ConfigError / missing dependency


class OverrideError(ValueError):
    """A params override is malformed or names a key params.yaml does not have."""


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str, config_error: bool):
        self.stage, self.returncode, self.config_error = stage, returncode, config_error
        kind = "bad params (not retried)" if config_error else f"exit code {returncode}"
        super().__init__(f"stage {stage!r} failed ({kind}); last lines:\n{tail}")


# ---------------------------------------------------------------------------
# Overrides


def apply_overrides(root: Path, overrides: list[str]) -> list[str]:
    """Apply `[file:]key=value` overrides (DVC `-S` syntax) to the params files under `root`.

    Each override is first applied alone to a scratch copy so that an error names it;
    only when all apply are the real files changed. Returns the overrides applied."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides as dvc_apply

    for i, text in enumerate(overrides):
        if not isinstance(text, str) or "=" not in text or text.startswith("="):
            raise OverrideError(f"overrides[{i}]={text!r} is not an override; write key=value, "
                                f"e.g. scheme.weight.format=int3 (or file.yaml:key=value)")
    by_file = to_path_overrides(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        for path, items in by_file.items():
            src = root / path
            if not src.is_file():
                raise OverrideError(f"overrides {items}: params file {path!r} not found under {root}")
            scratch = Path(tmp) / Path(path).name
            shutil.copyfile(src, scratch)
            for item in items:
                try:
                    dvc_apply(scratch, [item])
                except Exception as exc:  # hydra/omegaconf errors carry the reason in the cause
                    reason = exc.__cause__ or exc
                    raise OverrideError(f"override {item!r} for {path}: {reason}".splitlines()[0]) from None
        for path, items in by_file.items():
            dvc_apply(root / path, items)
    return list(overrides)


# ---------------------------------------------------------------------------
# Graph


@dataclass(frozen=True)
class StageGraph:
    order: list[str]  # stages in dvc.yaml order (foreach items expanded)
    upstream: dict[str, set[str]]  # stage -> stages it depends on


def read_graph(root: Path) -> StageGraph:
    """The pipeline's stages and dependencies, as DVC resolves them (templating, foreach)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        index = repo.index
        stages = [s for s in index.stages if not s.is_data_source]  # skip `dvc add`ed files
        order = [_address(s) for s in stages]
        upstream = {name: set() for name in order}
        for a, b in index.graph.edges:  # (stage, stage it depends on)
            if _address(a) in upstream and _address(b) in upstream:
                upstream[_address(a)].add(_address(b))
    if not order:
        raise ValueError(f"{root}/dvc.yaml defines no stages")
    return StageGraph(order, upstream)


def restrict(graph: StageGraph, targets: list[str]) -> StageGraph:
    """`targets` and everything they depend on (as `dvc repro <targets>` would run); a
    foreach stage's name (`synthesize`) stands for all its items."""
    families = {family(s) for s in graph.order}
    unknown = [t for t in targets if t not in graph.upstream and t not in families]
    if unknown:
        raise ValueError(f"targets {unknown} are not stages of dvc.yaml; known: {sorted(families)}")
    keep: set[str] = set()
    todo = [s for s in graph.order if s in targets or family(s) in targets]
    while todo:
        s = todo.pop()
        if s not in keep:
            keep.add(s)
            todo.extend(graph.upstream[s])
    return StageGraph([s for s in graph.order if s in keep], {s: graph.upstream[s] & keep for s in keep})


def _address(stage) -> str:
    """What `dvc repro` run in the repository root accepts: `name`, or `sub/dvc.yaml:name`."""
    path = stage.path_in_repo.replace(os.sep, "/")
    return stage.name if path == "dvc.yaml" else f"{path}:{stage.name}"


def family(stage: str) -> str:
    """`synthesize@3` -> `synthesize` (the foreach/matrix stage it was expanded from)."""
    return stage.split("@", 1)[0]


def waves(graph: StageGraph) -> list[list[str]]:
    """Dependency order; the ready items of one foreach stage share a wave, others run alone."""
    done: set[str] = set()
    left = list(graph.order)
    out: list[list[str]] = []
    while left:
        ready = [s for s in left if graph.upstream[s] <= done]
        if not ready:
            raise ValueError(f"dvc.yaml has a dependency cycle among {left}")
        first = ready[0]
        wave = [s for s in ready if "@" in first and family(s) == family(first)] or [first]
        out.append(wave)
        done.update(wave)
        left = [s for s in left if s not in done]
    return out


# ---------------------------------------------------------------------------
# GPUs


def gpu_slots(env: dict[str, str] | None = None) -> list[str]:
    """GPU ids a shard can be pinned to: $CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# One stage


@dataclass(frozen=True)
class ReproResult:
    stage: str
    ran: bool  # False: DVC found it up to date
    seconds: float
    log: Path


def repro(stage: str, root: Path, env: dict[str, str], log: Path, force: bool = False,
          echo: Callable[[str], None] | None = None) -> ReproResult:
    """`dvc repro --single-item <stage>` in `root`; output to `log` (and `echo`, line by line)."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for _attempt in range(LOCK_RETRIES):
        rc, text = _run(cmd, root, env, log, echo)
        if rc == 0 or LOCK_ERROR not in text:
            break
        time.sleep(random.uniform(0.5, 2.0))
    if rc != 0:
        tail = "\n".join(text.splitlines()[-25:])
        config_error = re.search(rf"exited with {CONFIG_ERROR_EXIT}\b", text) is not None
        raise StageFailed(stage, rc, tail, config_error)
    ran = f"Running stage '{stage}'" in text
    return ReproResult(stage, ran, round(time.time() - t0, 2), log)


def _run(cmd: list[str], root: Path, env: dict[str, str], log: Path,
         echo: Callable[[str], None] | None) -> tuple[int, str]:
    lines = []
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd[1:])}\n")
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            lines.append(line)
            if echo:
                echo(line.rstrip())
        rc = proc.wait()
    return rc, "".join(lines)


def stage_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of a stage process: `base` + `extra`, with this interpreter's bin
    directory first on PATH (dvc.yaml says `python -m tasks.<stage>`)."""
    env = {**base, **extra, "PYTHONUNBUFFERED": "1"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    return env


# ---------------------------------------------------------------------------
# What the stages left behind


def metrics(root: Path) -> dict[str, Any]:
    """`dvc metrics show` as {metrics file: data}, workspace only."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        shown = repo.metrics.show()
    files = shown.get("", {}).get("data", {})
    return {path: entry["data"] for path, entry in files.items() if "data" in entry}


def report_files(root: Path, max_bytes: int = 5 << 20) -> list[Path]:
    """Small outputs that people read: metrics, plots and uncached outputs (tables such as
    artifacts/evaluate/results.md, plot directories); files or directories of <= max_bytes."""
    from dvc.repo import Repo

    out = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for o in stage.outs:
                path = Path(o.fs_path)
                if (o.metric or o.plot or not o.use_cache) and path.exists() and _size(path) <= max_bytes:
                    out.append(path)
    return sorted(set(out))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
