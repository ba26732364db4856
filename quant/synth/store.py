"""Shard files of the synthesized text: append-only, resumable, published atomically.

A finished shard is a directory with two files:

- `sequences.jsonl`: one JSON object per line, in the shard's work-list order
  (`quant.synth.sampling.shard_items`): `{"index", "start_id", "prefix_len", "finish",
  "logprob", "ids", "text"}`. `ids` are the exact generated token ids (start
  token first; never re-tokenize `text`, which is their decoding, for reading
  only). `finish` is "eos" or "length"; `logprob` is the sum of log p of
  ids[1:] under the generating model.
- `manifest.json`: `{"complete": true, "run": {...}, "records_sha256": ..., ...counts}`.
  `run` is the run key: everything that determines the tokens (params, seed, model
  hash, generator code hash, device, dtype, library versions, shard).
  `records_sha256` is the sha256 of `sequences.jsonl`'s bytes: `read_published`
  (what merge reads) verifies it, so a shard edited after publishing (even into
  valid JSON) is an error naming the file, not silently different training data.

Lifecycle (`ShardWriter`): open a work directory -> it holds a manifest with
`complete: false` and the run key, plus the records written so far -> append
whole batches (flushed and fsynced) -> publish: the manifest becomes complete
and the directory is renamed onto the final path. Re-opening a work directory
with the same run key resumes: every newline-terminated line is a complete
record (a line is written whole or, if the process died while writing it, it
has no newline), so the partial tail is cut off and generation continues after
the last complete record. A different run key (params, model or code changed)
starts over: resuming would mix two different runs.

One writer per shard: `ShardWriter` holds an exclusive lock (`<work dir>.lock`) from
opening to publishing; a second process on the same shard fails at once
(`InputError`) instead of interleaving duplicated records into it. Publishing removes the
lock file (unlinked while still held, then released): a finished shard leaves nothing
behind in the work area; a killed one leaves its lock file, which the next writer reuses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from quant.config import InputError
from quant.io import replace_dir, write_json_atomic

RECORDS = "sequences.jsonl"
MANIFEST = "manifest.json"


def _normal(obj: Any) -> Any:
    """JSON round trip (tuples -> lists), so a run key compares equal to its stored copy."""
    return json.loads(json.dumps(obj, sort_keys=True))


def record_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def file_sha256(paths: list[Path]) -> str:
    """sha256 over the names and contents of `paths` (streamed)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def model_sha256(model_dir: str | Path) -> str:
    """Hash of a model directory's config and weight files (what determines the logits)."""
    d = Path(model_dir)
    files = [p for p in d.iterdir() if p.suffix == ".safetensors" or p.name == "config.json"]
    return file_sha256(files)


def _complete_prefix(path: Path) -> tuple[int, int]:
    """(number of complete records, byte length they span) of a records file."""
    count = offset = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # the partial last record of a killed writer
            try:
                json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"{path}: record {count + 1} is corrupt ({exc}); delete the file") from None
            count += 1
            offset += len(line)
    return count, offset


def read_records(directory: str | Path) -> Iterator[dict[str, Any]]:
    """The complete records of a shard directory (finished or in progress)."""
    with open(Path(directory) / RECORDS, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield json.loads(line)


def read_published(directory: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a published shard, strictly: every line whole and valid JSON, and the
    bytes matching the manifest's `records_sha256` (checked when the last line is read)."""
    d = Path(directory)
    path = d / RECORDS
    expected = (read_manifest(d) or {}).get("records_sha256")
    if not expected:
        raise InputError(f"{d / MANIFEST} has no records_sha256 (written by an older version); re-run synthesize")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            h.update(line)
            if not line.endswith(b"\n"):
                raise InputError(f"{path}: line {n} is truncated (no newline at the end); re-run synthesize")
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"{path}: line {n} is not a JSON record ({exc}); re-run synthesize") from None
    if h.hexdigest() != expected:
        raise InputError(
            f"{path}: the records do not match records_sha256 in {MANIFEST} (changed after the shard "
            f"was published); re-run synthesize"
        )


def records_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); delete the shard and re-run synthesize") from None


def is_complete(directory: str | Path, run: dict[str, Any]) -> bool:
    """True if `directory` is a published shard of exactly this run (with a records checksum)."""
    m = read_manifest(directory)
    return bool(m and m.get("complete") and m.get("run") == _normal(run) and m.get("records_sha256"))


class ShardWriter:
    """A shard under construction in `work_dir`. `done` = complete records on disk."""

    def __init__(self, work_dir: str | Path, run: dict[str, Any]) -> None:
        self.dir = Path(work_dir)
        self.run = _normal(run)
        self.resumed = False
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.dir) + ".lock")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise InputError(
                f"{self.dir} is being written by another process (lock {self._lock.lock_file} is held); "
                f"one process per shard"
            ) from None
        try:
            self.done = self._open()
        except BaseException:
            self.close()
            raise

    def close(self, remove_lock: bool = False) -> None:
        """Release the shard's lock (also done by `publish`; the OS does it if the process dies);
        with `remove_lock`, delete its file first, while it is still held."""
        if self._lock.is_locked:
            if remove_lock:
                Path(self._lock.lock_file).unlink(missing_ok=True)
            self._lock.release(force=True)

    def _open(self) -> int:
        manifest = read_manifest(self.dir) if self.dir.is_dir() else None
        records = self.dir / RECORDS
        if manifest and not manifest.get("complete") and manifest.get("run") == self.run and records.exists():
            count, offset = _complete_prefix(records)
            with open(records, "r+b") as f:
                f.truncate(offset)
            self.resumed = count > 0
            return count
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        records.touch()
        write_json_atomic(self.dir / MANIFEST, {"complete": False, "run": self.run})
        return 0

    def records(self) -> Iterator[dict[str, Any]]:
        return read_records(self.dir)

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append whole records and make them durable before returning."""
        expected = self.done
        for r in records:
            if r["index"] != expected:
                raise RuntimeError(f"record index {r['index']} written out of order (expected {expected})")
            expected += 1
        with open(self.dir / RECORDS, "a", encoding="utf-8") as f:
            f.write("".join(record_line(r) for r in records))
            f.flush()
            os.fsync(f.fileno())
        self.done = expected

    def publish(self, out_dir: str | Path, summary: dict[str, Any]) -> Path:
        """Mark complete and move the work directory onto `out_dir` (replacing it)."""
        checksum = records_sha256(self.dir / RECORDS)
        write_json_atomic(self.dir / MANIFEST, {"complete": True, "run": self.run, **_normal(summary),
                                                "records_sha256": checksum})
        out = replace_dir(self.dir, out_dir)
        self.close(remove_lock=True)
        return out
