"""The DVC side of the pipeline flow: params overrides, the stage graph, waves, one repro.

Nothing here knows about Prefect or MLflow, so the tests drive it directly.

- `resolve_overrides` applies all params overrides at once, in memory, with DVC's own
  `-S` grammar (Hydra's, what `dvc exp run -S` uses): every key must already exist (a
  typo is "unknown key"), the result must parse and the whole params.yaml, overridden or
  not, must pass the one params check of every entry path (tasks.params_check), before
  DVC sees it: DVC builds paths from params (a foreach item names its outputs) and may
  delete what they point at before any stage runs. `scratch_checkout` writes the result into a copy of the checkout
  that shares the DVC cache; the user's params.yaml is never written.
- `read_graph` asks DVC for the stage graph (the same index `dvc dag` prints), with
  `foreach`/`matrix` stages already expanded (`synthesize@0`, `synthesize@1`, ...).
- `waves` orders it: one stage at a time in dependency order, except that the ready
  items of one `foreach` stage form a single wave and run concurrently.
- `repro` runs `dvc repro --single-item <stage>` and tells "ran" from "up to date"; its
  output goes to the stage's log file as it comes, progress bars to a callback, and a
  failure carries the one line that says what went wrong.
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

import yaml

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
        self.stage, self.returncode, self.config_error, self.tail = stage, returncode, config_error, tail
        self.reason = one_line_error(tail)
        kind = "bad params (not retried)" if config_error else f"exit code {returncode}"
        super().__init__(f"stage {stage!r} failed ({kind}): {self.reason}; last lines:\n{tail}")


DVC_NOISE = re.compile(r"^(ERROR: failed to reproduce|Running stage|\$ |Updating lock file|Use `dvc push`|"
                       r"To track the changes|\s*$)")
TRACEBACK_LAST = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failed)\b.*")


def one_line_error(text: str) -> str:
    """The line of a stage's output that says what went wrong: the `error: ...` line a stage
    prints for bad params, else the last exception line of a traceback, else the last line
    that is not DVC's own bookkeeping."""
    lines = [ln.strip() for ln in text.splitlines()]
    for pattern in (re.compile(r"^error: "), TRACEBACK_LAST):
        hits = [ln for ln in lines if pattern.match(ln)]
        if hits:
            return hits[-1][:500]
    rest = [ln for ln in lines if not DVC_NOISE.match(ln)]
    return (rest[-1] if rest else lines[-1] if lines else "no output")[:500]


# ---------------------------------------------------------------------------
# Overrides

@dataclass(frozen=True)
class Overridden:
    """Params files with every override applied at once, not yet written anywhere."""

    overrides: list[str]
    texts: dict[str, str]  # params file (relative path) -> its new text
    data: dict[str, Any]  # params file -> its new content


def resolve_overrides(root: Path, overrides: list[str], check_types: bool = True) -> Overridden:
    """Apply `[file:]key=value` overrides (DVC `-S` syntax) together, in memory.

    Every key must exist in its params file (a typo says which key is unknown and what
    its section holds); the result must parse and, for params.yaml, pass the typed
    configs of the sections it touches. Nothing on disk changes: the caller writes
    `texts` into a scratch checkout."""
    from dvc.utils.cli_parse import to_path_overrides

    for i, text in enumerate(overrides):
        if not isinstance(text, str) or "=" not in text or text.startswith(("=", "+", "~")):
            raise OverrideError(f"overrides[{i}]={text!r} is not an override; write key=value, "
                                f"e.g. scheme.weight.format=int3 (or file.yaml:key=value)")
    texts, data = {}, {}
    for path, items in to_path_overrides(overrides).items():
        src = root / path
        if not src.is_file():
            raise OverrideError(f"overrides {items}: params file {path!r} not found under {root}")
        original_text = src.read_text()
        original = yaml.safe_load(original_text) or {}
        for item in items:
            _check_key(path, original, item)
        new = _merged(path, original, items)
        texts[path] = _render(src, original_text, items, new)
        data[path] = new
    if check_types and (root / PARAMS_FILE).is_file():  # every section, overridden or not
        params = data.get(PARAMS_FILE) or yaml.safe_load((root / PARAMS_FILE).read_text()) or {}
        _check_types(params, "overrides" if PARAMS_FILE in data else PARAMS_FILE)
    return Overridden(list(overrides), texts, data)


def _check_key(path: str, params: dict, item: str) -> None:
    key = item.split("=", 1)[0].strip()
    node: Any = params
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:depth]) or path
            known = sorted(node) if isinstance(node, dict) else []
            raise OverrideError(f"override {item!r}: unknown key {key!r} ({path} has no {part!r} under "
                                f"{where}; known: {known})")
        node = node[part]


def _merged(path: str, original: dict, items: list[str]) -> dict:
    """What DVC's `-S` computes (Hydra's override grammar over the file's data), all at once."""
    from dvc.utils.hydra import to_hydra_overrides
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.create(original, flags={"allow_objects": True})
        OmegaConf.set_struct(cfg, True)
        ConfigLoaderImpl._apply_overrides_to_config(to_hydra_overrides(items), cfg)
        return OmegaConf.to_object(cfg)
    except Exception as exc:  # hydra/omegaconf errors carry the reason in the cause
        reason = str(exc.__cause__ or exc).splitlines()[0]
        raise OverrideError(f"overrides {items} for {path}: {reason}") from None


def _render(src: Path, original_text: str, items: list[str], new: dict) -> str:
    """The new file's text: DVC's comment-preserving rewrite when it round-trips to `new`
    (it does not always: flow lists emptied next to comments came out as invalid YAML),
    else a plain dump of `new`."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / src.name
        scratch.write_text(original_text)
        try:
            dvc_apply(scratch, items)
            text = scratch.read_text()
            if yaml.safe_load(text) == new:
                return text
        except Exception:  # noqa: S110 - the plain dump below is the fallback
            pass
    return yaml.safe_dump(new, sort_keys=False, default_flow_style=None)


def _check_types(params: dict, what: str) -> None:
    """Every section's typed config and the recipe accept the params (ConfigError -> OverrideError)."""
    from quant.config import ConfigError
    from tasks.common import load_params
    from tasks.params_check import check_params

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / PARAMS_FILE
        f.write_text(yaml.safe_dump(params, sort_keys=False))
        try:
            loaded = load_params(f, check_sections=False)  # keys were checked one by one above
            check_params(loaded)
        except ConfigError as exc:
            raise OverrideError(f"{what} rejected by the params checks: {exc}") from None


def apply_overrides(root: Path, overrides: list[str]) -> list[str]:
    """Write the overridden params files into `root` (a scratch checkout, never the user's:
    see `scratch_checkout`). Returns the overrides applied."""
    resolved = resolve_overrides(root, overrides)
    for path, text in resolved.texts.items():
        (root / path).write_text(text)
    return resolved.overrides


# ---------------------------------------------------------------------------
# Scratch checkout


SCRATCH_SKIP = {".git", ".venv", ".state", "artifacts", "mlflow/mlflow.db", "mlflow/mlartifacts",
                ".dvc/cache", ".dvc/tmp", ".dvc/config.local", "__pycache__"}


def scratch_checkout(root: Path, dest: Path, resolved: Overridden) -> Path:
    """A copy of the checkout at `dest` that a flow run with overrides runs in.

    The files git sees (tracked and untracked-not-ignored, as they are in the workspace:
    local edits included) are copied; the DVC cache is the checkout's own (shared, so
    stages whose deps and params did not change are checked out from it, not rerun, and
    what the run produces is cached for later runs and `dvc exp`/`dvc checkout`); the
    overridden params files are written last. DVC runs there without git (no_scm)."""
    from dvc.repo import Repo

    dest.mkdir(parents=True)
    for rel in _checkout_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    with Repo(str(root)) as repo:
        cache_dir = repo.cache.local_cache_dir
        uncached = [Path(o.fs_path).relative_to(root) for s in repo.index.stages for o in s.outs
                    if not o.use_cache]
    for rel in uncached:  # metrics, tables, plots: DVC has no cached copy of them
        if (root / rel).is_file() and not (dest / rel).exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dest / rel)
    (dest / ".dvc").mkdir(exist_ok=True)
    (dest / ".dvc" / "config.local").write_text(
        f"[core]\n    no_scm = true\n[cache]\n    dir = {cache_dir}\n    type = reflink,hardlink,copy\n")
    for path, text in resolved.texts.items():
        (dest / path).write_text(text)
    # the outputs of dvc.lock as it stands, linked from the shared cache (missing ones are
    # simply produced by the run)
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--quiet"], cwd=dest, capture_output=True,
                   env=stage_env(dict(os.environ)))
    return dest


def _checkout_files(root: Path) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but state
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return [f for f in files if (root / f).is_file() and not _skipped(f)]


def _skipped(rel: str) -> bool:
    parts = Path(rel).parts
    return any("/".join(parts[:i]) in SCRATCH_SKIP for i in range(1, len(parts) + 1)) or "__pycache__" in parts


def keep_results(scratch: Path, dest: Path) -> list[Path]:
    """Copy what a scratch run decided (params files, dvc.lock, metrics, uncached outputs)
    to `dest`, so the run can be brought into a workspace later (`dvc checkout` after
    copying params.yaml and dvc.lock): the outputs themselves are in the shared cache."""
    from dvc.repo import Repo

    keep = [scratch / PARAMS_FILE, scratch / "dvc.lock"]
    with Repo(str(scratch)) as repo:
        # uncached outputs, and the metrics files (small; cached by DVC)
        keep += [Path(o.fs_path) for s in repo.index.stages for o in s.outs if not o.use_cache or o.metric]
    out = []
    for f in keep:
        if f.is_file():
            target = dest / f.relative_to(scratch)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            out.append(target)
    return out


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
          echo: Callable[[str], None] | None = None,
          progress: Callable[[float, str], None] | None = None) -> ReproResult:
    """`dvc repro --single-item <stage>` in `root`; output to `log` as it comes (and to
    `echo`, line by line; progress-bar updates go to `progress(percent, line)` instead,
    and to `echo` only every 10%)."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for _attempt in range(LOCK_RETRIES):
        rc, text = _run(cmd, root, env, log, echo, progress)
        if rc == 0 or LOCK_ERROR not in text:
            break
        time.sleep(random.uniform(0.5, 2.0))
    if rc != 0:
        tail = "\n".join(text.splitlines()[-25:])
        config_error = re.search(rf"exited with {CONFIG_ERROR_EXIT}\b", text) is not None
        raise StageFailed(stage, rc, tail, config_error)
    ran = f"Running stage '{stage}'" in text
    return ReproResult(stage, ran, round(time.time() - t0, 2), log)


# a tqdm bar: "desc:  42%|####      | 21/50 [00:10<00:14,  2.0it/s]"
PROGRESS = re.compile(r"(\d+)%\|[^|]*\|\s*(\d+)/(\d+)")
PROGRESS_EVERY = 5.0  # seconds between progress callbacks


def _run(cmd: list[str], root: Path, env: dict[str, str], log: Path, echo: Callable[[str], None] | None,
         progress: Callable[[float, str], None] | None = None) -> tuple[int, str]:
    """Run `cmd`, writing its output to `log` line by line as it comes (text mode splits
    tqdm's carriage-return updates into lines too)."""
    lines = []
    last_echo, last_call = -10, 0.0
    with open(log, "a", buffering=1) as f:
        f.write(f"$ {' '.join(cmd[1:])}\n")
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            m = PROGRESS.search(line)
            if m is None:
                lines.append(line)
                if echo:
                    echo(line.rstrip())
                continue
            done, total = int(m.group(2)), int(m.group(3))
            pct = 100.0 * done / total if total else 0.0
            now = time.time()
            if progress and (now - last_call >= PROGRESS_EVERY or done == total):
                last_call = now
                progress(pct, line.strip())
            if echo and (pct - last_echo >= 10 or done == total):
                last_echo = pct
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
