"""Bring back a workspace's DVC outputs after a failed or killed run, never deleting one.

    python scripts/recover.py            # restore what can be restored, say what cannot
    python scripts/recover.py --check    # only say it (exit 1 when something needs a decision)

Why not plain `dvc checkout`: it puts back the copy dvc.lock names, and when that copy is
not in the cache (a wrong or hand-merged dvc.lock entry, a cache pruned by `dvc gc`, an
object never pulled) DVC 3 deletes the workspace copy first and then fails ("Is your cache
up to date?"): a good model is gone and nothing replaced it. This script decides per output,
from dvc.lock and the cache, and only ever adds files:

| workspace copy | dvc.lock's copy in the cache | action |
|---|---|---|
| matches dvc.lock | - | nothing (`ok`) |
| missing | complete | `dvc checkout <path>` restores it (`restored`) |
| missing | missing or incomplete | nothing to restore from: `dvc pull <path>` or `dvc repro <stage>` (`missing`) |
| differs from dvc.lock | any | kept as it is (`kept`); `dvc commit <stage>` records it, or, when dvc.lock's copy is in the cache, `dvc checkout --force <path>` takes that one instead |

Outputs that DVC does not cache (`cache: false`) and stages that never ran are skipped.
Exit status: 0 when every output is `ok` or `restored`, 1 when one needs a decision or a
rerun (the lines say which and how), 2 outside a DVC repository.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Verdict:
    stage: str
    path: str
    action: str  # ok | restored | missing | kept | restore (--check)
    detail: str

    def line(self) -> str:
        return f"{self.action:8s} {self.path} ({self.stage}): {self.detail}"


def cached_completely(out) -> bool:
    """Whether every object of the copy dvc.lock names for `out` is in the local cache."""
    from dvc_data.hashfile.tree import Tree

    hash_value = out.hash_info.value
    if not out.cache.exists(hash_value):
        return False
    if not out.hash_info.isdir:
        return True
    obj = out.get_obj()
    return isinstance(obj, Tree) and all(out.cache.exists(oid.value) for _, _, oid in obj)


def judge(out, stage: str) -> Verdict:
    """What to do with one output (see the module docstring)."""
    path = str(out.def_path)
    in_cache = cached_completely(out)
    if not out.exists:
        if in_cache:
            return Verdict(stage, path, "restore", f"missing; dvc.lock's copy {out.hash_info.value} is in the cache")
        return Verdict(stage, path, "missing", f"missing, and dvc.lock's copy {out.hash_info.value} is not in the "
                                               f"cache: `dvc pull {path}` if a remote has it, else `dvc repro {stage}`")
    if not out.changed_checksum():
        return Verdict(stage, path, "ok", "matches dvc.lock")
    take = (f"`dvc checkout --force {path}` takes dvc.lock's copy instead (it is in the cache)" if in_cache else
            f"dvc.lock's copy {out.hash_info.value} is not in the cache, so `dvc checkout` would delete this one "
            "and fail")
    return Verdict(stage, path, "kept", f"differs from dvc.lock; kept as it is. `dvc commit {stage}` records it; "
                                        f"{take}")


def survey(root: Path) -> list[Verdict]:
    from dvc.repo import Repo

    verdicts = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                if not out.use_cache or not out.hash_info:  # uncached, or the stage never ran
                    continue
                verdicts.append(judge(out, stage.addressing))
    return verdicts


def restore(root: Path, v: Verdict) -> Verdict:
    """`dvc checkout <path>` for an output whose workspace copy is missing (nothing to delete)."""
    r = subprocess.run([sys.executable, "-m", "dvc", "checkout", v.path], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if r.returncode == 0 and (root / v.path).exists():
        return Verdict(v.stage, v.path, "restored", "from the cache, as dvc.lock names it")
    reason = (r.stderr or r.stdout).strip().splitlines()
    return Verdict(v.stage, v.path, "missing", f"dvc checkout failed: {reason[-1] if reason else r.returncode}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; say what would be done")
    ap.add_argument("--root", type=Path, default=Path.cwd(), help="the DVC repository (default: here)")
    args = ap.parse_args(argv)
    if not (args.root / "dvc.yaml").is_file():
        print(f"error: {args.root} holds no dvc.yaml; run this in the pipeline's checkout", file=sys.stderr)
        return 2
    verdicts = survey(args.root)
    if not args.check:
        verdicts = [restore(args.root, v) if v.action == "restore" else v for v in verdicts]
    for v in verdicts:
        print(v.line())
    return 0 if all(v.action in ("ok", "restored") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
