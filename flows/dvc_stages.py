"""The DVC side of the pipeline flow: params overrides, the stage graph, waves, one repro.

Nothing here knows about Prefect or MLflow, so the tests drive it directly.

- `resolve_overrides` applies all params overrides at once, in memory, with DVC's own
  `-S` grammar (Hydra's, what `dvc exp run -S` uses): every key must already exist (a
  typo is "unknown key"; list items are keys too: `block_ap.steps.0.block-ap.epochs`),
  the result must parse, and the whole effective params must pass the one params check
  (`tasks.params_check.check_params`: every section, method options, the recipe).
  DVC builds paths from params (a foreach item names its outputs) and may delete what they
  point at before any stage runs. flows/scratch.py writes the result into a scratch checkout; the user's params.yaml is
  never written.
- `read_graph` asks DVC for the stage graph (the same index `dvc dag` prints), with
  `foreach`/`matrix` stages already expanded (`synthesize@0`, `synthesize@1`, ...).
- `waves` orders it: one stage at a time in dependency order, except that the ready
  items of one `foreach` stage form a single wave and run concurrently.
- `repro` runs `dvc repro --single-item <stage>` and tells "ran" from "restored" (DVC's
  run cache) from "up to date"; its output goes straight to the stage's log file (so the
  stage and DVC's commit outlive whoever watches them), lines and progress bars are read
  back from it as they come, and a failure carries the one line that says what went wrong.
- `metrics` / `report_files` read what the stages left, for all stages or only a run's own.
"""

from __future__ import annotations

import contextlib
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
    if check_types:  # the whole effective params, overridden or not: a bad value anywhere fails now
        params = data.get(PARAMS_FILE)
        if params is None and (root / PARAMS_FILE).is_file():
            params = yaml.safe_load((root / PARAMS_FILE).read_text()) or {}
        if params is not None:
            check_effective(params, bool(overrides))
    return Overridden(list(overrides), texts, data)


def _check_key(path: str, params: dict, item: str) -> None:
    key = item.split("=", 1)[0].strip()
    node: Any = params
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]  # a list item (`block_ap.steps.0.block-ap.epochs`), as Hydra reads it
            continue
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:depth]) or path
            known = sorted(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
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


def check_effective(params: dict, overridden: bool = True) -> None:
    """Every params section of this project that `params` holds passes its typed config,
    method options included (`tasks.params_check.check_params`, the one check the stages
    and the sweep run), and the recipe is checked whole. Not only the sections the
    overrides touch: a bad value left in params.yaml must fail the run before any stage,
    not after the stages before it ran. ConfigError -> OverrideError. Files without any of
    this project's sections (other DVC projects driven by the flow) are not checked."""
    from tasks.params_check import SECTION_CONFIGS

    if not isinstance(params, dict) or not set(params) & {*SECTION_CONFIGS, "scheme"}:
        return
    from quant.config import ConfigError
    from tasks.common import load_params
    from tasks.params_check import check_params

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / PARAMS_FILE
        f.write_text(yaml.safe_dump(params, sort_keys=False))
        try:
            loaded = load_params(f, check_sections=False)  # keys were checked one by one above
            check_params(loaded, set(params))
        except ConfigError as exc:
            what = "overrides rejected by the params checks" if overridden else f"{PARAMS_FILE} rejected"
            raise OverrideError(f"{what}: {exc}") from None


def apply_overrides(root: Path, overrides: list[str]) -> list[str]:
    """Write the overridden params files into `root` (a scratch checkout, never the user's:
    see `scratch_checkout`). Returns the overrides applied."""
    resolved = resolve_overrides(root, overrides)
    for path, text in resolved.texts.items():
        (root / path).write_text(text)
    return resolved.overrides


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


RAN, RESTORED, UP_TO_DATE = "ran", "restored", "up to date"
RUN_CACHE_HIT = "is cached - skipping run"  # DVC: "Stage 'x' is cached - skipping run, checking out outputs"


@dataclass(frozen=True)
class ReproResult:
    stage: str
    outcome: str  # RAN | RESTORED (from DVC's run cache) | UP_TO_DATE (nothing to do)
    seconds: float
    log: Path

    @property
    def ran(self) -> bool:
        return self.outcome == RAN


def repro(stage: str, root: Path, env: dict[str, str], log: Path, force: bool = False,
          echo: Callable[[str], None] | None = None,
          progress: Callable[[float, str], None] | None = None) -> ReproResult:
    """`dvc repro --single-item <stage>` in `root`; output to `log` as it comes (and to
    `echo`, line by line; progress-bar updates go to `progress(percent, line)` instead).
    The outcome tells a stage that ran from one restored from DVC's run cache (its deps
    and params ran before: outputs checked out) and one that was up to date."""
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
    outcome = (RAN if f"Running stage '{stage}'" in text else RESTORED if RUN_CACHE_HIT in text
               else UP_TO_DATE)
    return ReproResult(stage, outcome, round(time.time() - t0, 2), log)


# a tqdm bar: "desc:  42%|####      | 21/50 [00:10<00:14,  2.0it/s]"
PROGRESS = re.compile(r"(\d+)%\|[^|]*\|\s*(\d+)/(\d+)")
# a long stage's own count in a log line: "block-ap: block 12/30 val mse ..." (also a plain line)
COUNTER = re.compile(r"\b(block|step|epoch|shard|record|sequence|window|task)s? (\d+)/(\d+)\b")


def progress_of(line: str) -> tuple[int, int, str] | None:
    """(done, total, what) of a tqdm bar or a counting log line; None for any other line.
    `what`: `block 4/10 [00:10<00:14]` for a bar, `block 12/30` for a count."""
    m = PROGRESS.search(line)
    if m is not None:
        desc = line[: m.start()].strip().rstrip(":").strip()
        eta = line[m.end():].strip()
        eta = eta.split(",", 1)[0].rstrip("]") + "]" if eta.startswith("[") else ""
        return int(m.group(2)), int(m.group(3)), " ".join(p for p in (desc, f"{m.group(2)}/{m.group(3)}", eta) if p)
    m = COUNTER.search(line)
    if m is not None and 0 < int(m.group(2)) <= int(m.group(3)):
        return int(m.group(2)), int(m.group(3)), m.group(0)
    return None
PROGRESS_EVERY = 5.0  # seconds between progress callbacks
FOLLOW_SECONDS = 0.25  # how often the log file is read while the stage runs


def _run(cmd: list[str], root: Path, env: dict[str, str], log: Path, echo: Callable[[str], None] | None,
         progress: Callable[[float, str], None] | None = None) -> tuple[int, str]:
    """Run `cmd` with its output going straight into `log`, and follow that file.

    Why not a pipe to this process: DVC writes dvc.lock and the run cache only after the
    stage's command ends, and a stage prints to the end. Through a pipe, a watcher that
    dies (the flow process, after its worker was killed) takes the stage with it at its
    next line (EPIPE), so a finished stage never reaches dvc.lock. Written to a file, the
    stage and DVC finish and commit whatever happens to the process that started them.
    Lines go to `echo` and tqdm updates (carriage returns) to `progress` as they come; a
    failing callback is logged away, never a reason to leave the stage unwatched."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd[1:])}\n")
    follower = _Follower(log, log.stat().st_size, echo, progress)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    while proc.poll() is None:
        follower.read()
        time.sleep(FOLLOW_SECONDS)
    follower.read(final=True)
    return proc.returncode, "".join(follower.lines)


class _Follower:
    """Reads what a stage appended to its log since `offset`: whole lines to `lines` and
    `echo`, tqdm bars to `progress` (every PROGRESS_EVERY s and at 100%; without a
    `progress`, to `echo` every 10%)."""

    def __init__(self, log: Path, offset: int, echo, progress):
        self.log, self.offset, self.echo, self.progress = log, offset, echo, progress
        self.partial, self.lines = "", []
        self.last_echo, self.last_call = -10.0, 0.0

    def read(self, final: bool = False) -> None:
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        text = self.partial + data.decode("utf-8", errors="replace")
        parts = re.split(r"\r\n|\r|\n", text)
        tail = parts.pop()  # after the last line break: a line still being written
        if final and tail:
            parts.append(tail)
        self.partial = "" if final else tail
        for line in parts:
            self._line(line + "\n")

    def _line(self, line: str) -> None:
        bar = PROGRESS.search(line) is not None
        if not bar:  # a plain line (a counting one too: it is also progress)
            self.lines.append(line)
            self._call(self.echo, line.rstrip())
        counted = progress_of(line)
        if counted is None:
            return
        done, total, _ = counted
        pct = 100.0 * done / total if total else 0.0
        now = time.time()
        if self.progress and (now - self.last_call >= PROGRESS_EVERY or done == total):
            self.last_call = now
            self._call(self.progress, pct, line.strip())
        elif bar and self.progress is None and self.echo and (pct - self.last_echo >= 10 or done == total):
            self.last_echo = pct  # nobody takes the bars: every 10% as a line
            self._call(self.echo, line.rstrip())

    @staticmethod
    def _call(fn, *args) -> None:
        if fn is None:
            return
        with contextlib.suppress(Exception):  # reporting never stops the following of a stage
            fn(*args)


def stage_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of a stage process: `base` + `extra`, with this interpreter's bin
    directory first on PATH (dvc.yaml says `python -m tasks.<stage>`)."""
    env = {**base, **extra, "PYTHONUNBUFFERED": "1"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    return env


# ---------------------------------------------------------------------------
# What the stages left behind


def metrics(root: Path, stages: set[str] | None = None) -> dict[str, Any]:
    """`dvc metrics show` as {metrics file: data}, workspace only; with `stages`, only the
    metrics files of those stages (a run reports what its own stages produced or restored,
    not what other stages left in the checkout under other params)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        if stages is None:
            shown = repo.metrics.show()
        else:
            targets = [os.path.relpath(o.fs_path, root) for o in stage_outs(repo, stages) if o.metric]
            if not targets:
                return {}
            shown = repo.metrics.show(targets=targets)
    files = shown.get("", {}).get("data", {})
    return {path: entry["data"] for path, entry in files.items() if "data" in entry}


def report_files(root: Path, max_bytes: int = 5 << 20, stages: set[str] | None = None) -> list[Path]:
    """Small outputs that people read: metrics, plots and uncached outputs (tables such as
    artifacts/evaluate/results.md, plot directories); files or directories of <= max_bytes;
    with `stages`, only those stages' outputs."""
    from dvc.repo import Repo

    out = []
    with Repo(str(root)) as repo:
        for o in stage_outs(repo, stages):
            path = Path(o.fs_path)
            if (o.metric or o.plot or not o.use_cache) and path.exists() and _size(path) <= max_bytes:
                out.append(path)
    return sorted(set(out))


def stage_outs(repo, stages: set[str] | None) -> list:
    """The outputs of `stages` (addresses as `read_graph` gives them), or of every stage."""
    return [o for s in repo.index.stages if stages is None or _address(s) in stages for o in s.outs]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
