"""Where a flow run with params overrides runs: a scratch checkout, saved as a DVC experiment.

A run with overrides must not touch the user's workspace (params.yaml, dvc.lock, the
outputs), yet its result must be as easy to find and bring back as any DVC experiment.
`dvc exp run --temp` does both, but it runs the whole pipeline in one process, and the
flow wants stage by stage under Prefect (shards on several GPUs or workers, retries,
progress). So the flow does what `--temp` does, by hand:

- `scratch_checkout`: a git clone of the checkout (`--shared`: no objects copied) at its
  HEAD under `.state/scratch/<flow run id>/`, with the workspace's local edits and
  untracked files laid over it, the overridden params files written last, and the
  checkout's own DVC cache (so stages the overrides do not affect are checked out, not
  rerun, and what the run produces is cached for later runs, `dvc checkout` and
  `dvc exp apply`).
- `save_experiment`: once the stages are done, `dvc exp save` there and the experiment's
  ref fetched into the checkout's repository (`refs/exps/...`, what `dvc exp run` makes),
  so `dvc exp show` lists the run and `dvc exp apply <name>` brings its params, dvc.lock
  and outputs into the workspace. Nothing else in the checkout changes.
- `keep_results`: the run's params files, dvc.lock and its own stages' metrics also stay
  under `.state/flow-runs/<flow run id>/` (for runs outside git, and for the shard
  workers' shared filesystem).

A checkout that is not the top of a git repository (a DVC project with `no_scm`) gets a
plain copy instead, and no experiment: there is no git to keep it in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from flows.dvc_stages import PARAMS_FILE, Overridden, stage_env, stage_outs

SCRATCH_SKIP = {".git", ".venv", ".state", "artifacts", "mlflow/mlflow.db", "mlflow/mlartifacts",
                ".dvc/cache", ".dvc/tmp", ".dvc/config.local", "__pycache__"}
EXPERIMENT_PREFIX = "flow-"  # experiment name: flow-<flow run name>
GIT_IDENTITY = {"user.name": "quant-pipeline flow", "user.email": "quant-pipeline@localhost"}


class ExperimentError(RuntimeError):
    """The scratch run could not be saved as a DVC experiment (its results stay in .state/flow-runs)."""


def is_git_checkout(root: Path) -> bool:
    """`root` is the top of a git work tree (where DVC keeps experiments)."""
    try:
        top = _git(root, "rev-parse", "--show-toplevel").strip()
    except (OSError, subprocess.CalledProcessError):
        return False
    return Path(top).resolve() == root.resolve()


def scratch_checkout(root: Path, dest: Path, resolved: Overridden) -> Path:
    """The checkout as it is (HEAD plus local edits and untracked files), at `dest`, with the
    overridden params files, sharing the checkout's DVC cache; its outputs checked out."""
    from dvc.repo import Repo

    git = is_git_checkout(root)
    if git:
        _git_clone(root, dest)
        overlay, removed = _changed_files(root)
    else:
        dest.mkdir(parents=True)
        overlay, removed = _plain_files(root), []
    for rel in overlay:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    for rel in removed:
        (dest / rel).unlink(missing_ok=True)
    with Repo(str(root)) as repo:
        cache_dir = repo.cache.local_cache_dir
        uncached = [Path(o.fs_path).relative_to(root) for o in stage_outs(repo, None) if not o.use_cache]
    for rel in uncached:  # metrics, tables, plots: DVC has no cached copy of them
        if (root / rel).is_file() and not (dest / rel).exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dest / rel)
    (dest / ".dvc").mkdir(exist_ok=True)
    scm = "" if git else "[core]\n    no_scm = true\n"
    (dest / ".dvc" / "config.local").write_text(
        f"{scm}[cache]\n    dir = {cache_dir}\n    type = reflink,hardlink,copy\n")
    for path, text in resolved.texts.items():
        (dest / path).write_text(text)
    # the outputs of dvc.lock as it stands, linked from the shared cache (missing ones are
    # simply produced by the run)
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--quiet"], cwd=dest, capture_output=True,
                   env=stage_env(dict(os.environ)))
    return dest


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _git_clone(root: Path, dest: Path) -> None:
    """A clone sharing the checkout's objects, detached at its HEAD, with a committer
    identity for `dvc exp save` when git has none configured."""
    head = _git(root, "rev-parse", "HEAD").strip()
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(root), str(dest)], check=True,
                   capture_output=True, text=True)
    _git(dest, "checkout", "-q", "--detach", head)
    for key, value in GIT_IDENTITY.items():
        if subprocess.run(["git", "config", key], cwd=dest, capture_output=True).returncode != 0:
            _git(dest, "config", key, value)


def _changed_files(root: Path) -> tuple[list[str], list[str]]:
    """(files the workspace changed against HEAD, staged or not, and its untracked files;
    tracked files it deleted)."""
    diff = [f for f in _git(root, "diff", "-z", "--name-only", "--no-renames", "HEAD").split("\0") if f]
    untracked = [f for f in _git(root, "ls-files", "-z", "-o", "--exclude-standard").split("\0") if f]
    files = [f for f in dict.fromkeys(diff + untracked) if not _skipped(f)]
    return [f for f in files if (root / f).is_file()], [f for f in files if not (root / f).exists()]


def _plain_files(root: Path) -> list[str]:
    files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return [f for f in files if not _skipped(f)]


def _skipped(rel: str) -> bool:
    parts = Path(rel).parts
    return any("/".join(parts[:i]) in SCRATCH_SKIP for i in range(1, len(parts) + 1)) or "__pycache__" in parts


def experiment_name(flow_run_name: str) -> str:
    """A DVC experiment name (a git ref component) for a flow run."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in flow_run_name).strip("-")
    return EXPERIMENT_PREFIX + (safe or "run")


def save_experiment(scratch: Path, root: Path, name: str) -> str:
    """`dvc exp save --name <name>` in the scratch checkout (params files, dvc.lock, the code
    as the workspace had it), and that experiment's ref fetched into `root`'s repository.
    Returns the ref. Raises ExperimentError when either step fails."""
    env = stage_env(dict(os.environ))
    _git(scratch, "add", "-A")  # untracked files the workspace had are part of what ran
    saved = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "--force", "--name", name], cwd=scratch,
                           env=env, capture_output=True, text=True)
    if saved.returncode != 0:
        raise ExperimentError(f"dvc exp save failed: {(saved.stdout + saved.stderr).strip()[-500:]}")
    refs = [r for r in _git(scratch, "for-each-ref", "--format=%(refname)", "refs/exps").split()
            if r.endswith("/" + name)]
    if len(refs) != 1:
        raise ExperimentError(f"dvc exp save left no single ref for {name!r}: {refs}")
    fetched = subprocess.run(["git", "fetch", "-q", "--force", str(scratch), f"{refs[0]}:{refs[0]}"], cwd=root,
                             capture_output=True, text=True)
    if fetched.returncode != 0:
        raise ExperimentError(f"git fetch of {refs[0]} failed: {fetched.stderr.strip()[-500:]}")
    return refs[0]


def keep_results(scratch: Path, dest: Path, stages: set[str] | None = None) -> list[Path]:
    """Copy what a scratch run decided (params files, dvc.lock, and the metrics and uncached
    outputs of `stages`: the run's own) to `dest`, so the run can be brought into a
    workspace later (`dvc checkout` after copying params.yaml and dvc.lock): the outputs
    themselves are in the shared cache."""
    from dvc.repo import Repo

    keep = [scratch / PARAMS_FILE, scratch / "dvc.lock"]
    with Repo(str(scratch)) as repo:
        keep += [Path(o.fs_path) for o in stage_outs(repo, stages) if not o.use_cache or o.metric]
    out = []
    for f in keep:
        if f.is_file():
            target = dest / f.relative_to(scratch)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            out.append(target)
    return out
