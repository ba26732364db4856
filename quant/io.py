"""Atomic file and directory writes: the one place outputs are written safely.

Every writer of a stage output, a resume state or a checkpoint goes through
these helpers, so a killed process leaves either the old file/directory or
the new one, never a half-written file that looks whole. The recipe is the
usual one: write a temporary sibling (same directory, so the rename stays on
one filesystem), then `os.replace` / `rename` it over the target.

Temporaries are hidden and carry the writer's pid (`.<name>.tmp-<pid>-xxxx`,
`.<name>.old-<pid>`), so `remove_stale_temporaries` can delete what a killed writer
left without touching a live one's. Outputs get the process umask's permissions, not
mkdtemp/mkstemp's 0700/0600: `atomic_dir` also resets every file and folder written
inside it (libraries such as transformers write `model.safetensors` through their
own 0600 temporaries), so with the usual umask 022 a checkpoint is 0644 / 0755 and
readable by every user, whoever wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_RE = re.compile(r"^\.(?P<name>.+?)\.(?:tmp|old)-(?P<pid>\d+)?")


def temp_prefix(target: str | Path) -> str:
    """Name prefix of a temporary sibling of `target`: hidden, with the writer's pid."""
    return f".{Path(target).name}.tmp-{os.getpid()}-"


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str | Path, owner: str | None = None, own: bool = False) -> list[Path]:
    """Delete the temporaries (`.<name>.tmp-<pid>-*`, `.<name>.old-<pid>`) in `directory`
    whose writing process is gone (with `own`, this process's too: it is about to exit); a
    temporary without a pid (older format) only if it is `owner`'s own (inside the folder
    named `owner`, or a temporary of `owner` itself)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    for p in d.iterdir():
        m = TEMP_RE.match(p.name)
        if m is None:
            continue
        pid = m["pid"]
        if pid is not None and int(pid) == os.getpid() and own:
            pass
        elif pid is not None and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue
        if pid is None and not (owner and (d.name == owner or m["name"] == owner)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    try:
        tmp.chmod(0o777 & ~umask())
        yield tmp
        share_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def share_tree(root: str | Path) -> None:
    """Give every folder and file under `root` the umask's permissions (0755 / 0644 with umask
    022; files that were executable stay executable). Symbolic links are left alone."""
    mask = umask()
    for d, dirs, files in os.walk(root):
        for name in dirs:
            p = Path(d) / name
            if not p.is_symlink():
                p.chmod(0o777 & ~mask)
        for name in files:
            p = Path(d) / name
            if not p.is_symlink():
                p.chmod((0o777 if p.stat().st_mode & 0o111 else 0o666) & ~mask)


def replace_dir(src: str | Path, target: str | Path) -> Path:
    """Move the finished directory `src` onto `target`, replacing any old `target`.

    Two renames (old target aside, `src` in); the old copy is removed last, so a kill
    in between leaves a complete directory under one of the two names."""
    src, target = Path(src), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    src.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling; rename over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON with sorted keys and a final newline, written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def fingerprint(*parts: Any, files: tuple[Path, ...] = (), tensors: tuple = ()) -> str:
    """Identity of a run's settings and inputs (a resumed run must match it)."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for f in files:
        if f.exists():
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    h.update(chunk)
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
