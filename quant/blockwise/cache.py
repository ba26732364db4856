"""Where the block-wise engine keeps activations, and how batches reach the device.

Cached activations ([N, L, D]) live on the device (`gpu`), in host memory
(`cpu`, pinned on a GPU machine) or in files on disk (`disk`);
quant.blockwise.planner decides which. Design notes:

- A pass over caches is given its whole batch plan up front
  (`Prefetcher.batches`): contiguous slices (forward passes, Block-AP's shuffled
  batch order) or index rows (TesseraQ's random batches). The next batch is
  copied to the device on a side CUDA stream while the current one computes.
- Host work that would stall a step (reading rows of a disk cache, gathering
  random rows of a host cache into pinned memory) runs on read-ahead threads
  (`READ_WORKERS` per cache, so several reads are in flight) up to
  `READ_AHEAD` batches ahead; torch copies and os.preadv release the GIL. Disk
  rows are read with preadv straight into the (pinned) batch buffer: one large
  read per row, where page faults on a memory map would read 4 KiB at a time.
- Writes go through a `CacheWriter` (one per pass): device-to-pinned copies run
  non_blocking on a write stream (overlapping the next batch's compute) and are
  synchronised once when the pass ends; disk writes are copied that way into
  pinned staging buffers and written by a thread (pwrite), at most
  `WRITE_BEHIND` batches behind, so a forward pass never waits on the disk.
  Rows written by a pass are only read after its writer closed.
- Pinned caches are allocated pageable and registered with cudaHostRegister:
  the caching host allocator (`pin_memory=True`) rounds every block up to a
  power of two, so a 65 GiB cache would pin 128 GiB.
- Disk caches stay memory-mapped as well (`data`, torch.from_file): whole-cache
  reads by other code (AWQ, tests) keep working; reads and writes of the
  passes use the file descriptor, coherent with the map through the page cache.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

READ_AHEAD = 4  # host batches read ahead per cache
READ_WORKERS = 2  # reader threads per cache (reads in flight at once)
WRITE_BEHIND = 4  # disk batches in flight behind a pass
COPY_CHUNK = 256 * 2**20  # bytes per chunk of copy_from into a disk cache (pinned staging)
WHERE = ("gpu", "cpu", "disk")
Rows = slice | torch.Tensor  # a contiguous range, or row indices (a CPU int64 tensor)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory of exactly the tensor's size (cudaHostRegister; unregistered
    when the tensor is freed)."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.untyped_storage().nbytes()
    if nbytes:
        err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 1))  # 1: portable
        if err != 0:
            raise RuntimeError(f"pinning {nbytes} bytes of host memory failed (cudaError {err}); set "
                               "the block-wise step's option cache to auto or disk")
        fin = weakref.finalize(t, torch.cuda.cudart().cudaHostUnregister, t.data_ptr())
        fin.atexit = False  # at exit the process memory goes anyway, maybe after the CUDA context
    return t


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor, writable, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pread_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):  # one call returns at most ~2 GiB
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise EOFError(f"cache file ends at byte {offset + done}")
        done += n


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


class ActivationCache:
    """[N, L, D] activations on the device (`gpu`), in host memory (`cpu`) or on disk."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, where: str, device: torch.device,
                 path: Path | None = None) -> None:
        if where not in WHERE:
            raise ValueError(f"cache location {where!r}: expected one of {', '.join(WHERE)}")
        self.device, self.where, self.path, self.fd = device, where, path, None
        numel = math.prod(shape)
        if where == "gpu":
            self.data = torch.empty(shape, dtype=dtype, device=device)
        elif where == "disk":
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(numel * torch.empty((), dtype=dtype).element_size())
            self.data = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
            self.fd = os.open(path, os.O_RDWR)
            weakref.finalize(self, os.close, self.fd)
        elif device.type == "cuda":
            self.data = pinned_empty(shape, dtype)
        else:
            self.data = torch.empty(shape, dtype=dtype)
        self.row_bytes = math.prod(shape[1:]) * self.data.element_size()

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    # -- reads ---------------------------------------------------------------

    def staged(self, rows: Rows) -> bool:
        """Whether fetching `rows` needs host work first (a read-ahead thread does it)."""
        if self.where == "disk":
            return True
        return self.where == "cpu" and self.device.type == "cuda" and not isinstance(rows, slice)

    def read_host(self, rows: Rows) -> torch.Tensor:
        """`rows` copied into a fresh host buffer (pinned on a GPU machine; the caching host
        allocator keeps it alive until its device copy is done)."""
        n = len(range(len(self))[rows]) if isinstance(rows, slice) else len(rows)
        out = torch.empty((n, *self.data.shape[1:]), dtype=self.data.dtype,
                          pin_memory=self.device.type == "cuda")
        if self.where == "gpu":
            out.copy_(self.data[rows] if isinstance(rows, slice) else self.data.index_select(0, rows.to(self.device)))
        elif self.where == "cpu" and isinstance(rows, slice):
            out.copy_(self.data[rows])
        elif self.where == "cpu":
            torch.index_select(self.data, 0, rows, out=out)
        elif isinstance(rows, slice):
            _pread_all(self.fd, _bytes(out), rows.indices(len(self))[0] * self.row_bytes)
        else:
            buf, rb = _bytes(out), self.row_bytes
            for k, r in enumerate(rows.tolist()):
                _pread_all(self.fd, buf[k * rb : (k + 1) * rb], r * rb)
        return out

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=host.is_pinned())

    def fetch(self, rows: Rows, rows_device: torch.Tensor | None = None) -> torch.Tensor:
        """`rows` on the device: a view of a device cache (slices), an index_select with
        `rows_device` (indices), a non_blocking copy from pinned memory, or read_host."""
        if self.where == "gpu":
            if isinstance(rows, slice):
                return self.data[rows]
            return self.data.index_select(0, rows_device if rows_device is not None else rows.to(self.device))
        if self.where == "cpu" and isinstance(rows, slice):
            x = self.data[rows]
            return x.to(self.device, non_blocking=x.is_pinned())
        if self.where == "cpu" and self.device.type == "cpu":
            return torch.index_select(self.data, 0, rows)
        return self.to_device(self.read_host(rows))

    def get(self, i: int, j: int) -> torch.Tensor:
        """Rows [i, j) on the device."""
        return self.fetch(slice(i, j))

    def gather(self, idx: torch.Tensor, idx_device: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `idx` (a CPU index tensor) on the device (`idx_device`: the same on the device)."""
        return self.fetch(idx, idx_device)

    # -- writes --------------------------------------------------------------

    def write_host(self, i: int, x: torch.Tensor) -> None:
        """Rows [i, i + len(x)) = x, a contiguous host tensor of this cache's dtype."""
        if self.where == "disk":
            _pwrite_all(self.fd, _bytes(x), i * self.row_bytes)
        else:
            self.data[i : i + x.shape[0]].copy_(x)

    def writer(self) -> CacheWriter:
        return CacheWriter(self)

    def put(self, i: int, x: torch.Tensor) -> None:
        """Rows [i, i + len(x)) = x, finished when this returns."""
        with self.writer() as w:
            w.put(i, x)

    def copy_from(self, other: ActivationCache, chunk_rows: int | None = None) -> None:
        if self.where != "disk":
            self.data.copy_(other.data)
            return
        rows = chunk_rows or max(1, COPY_CHUNK // max(self.row_bytes, 1))
        with self.writer() as w:  # chunks through the writer: pwrite, no read-before-write faults
            for i in range(0, len(other), rows):
                w.put(i, other.data[i : i + rows])


class CacheWriter:
    """The writes of one pass into a cache: `put` returns at once; `close()` (the end of a
    with-block) returns when every row is in place. `put` takes ownership of `x`: the
    caller must not modify it afterwards.

    Device-to-host copies run on a stream of their own (after an event on the computing
    stream), so the copy back of batch k overlaps the compute of batch k+1; the source
    is marked as used by that stream so the allocator does not hand it out early."""

    def __init__(self, cache: ActivationCache, depth: int = WRITE_BEHIND) -> None:
        self.cache = cache
        host = cache.where != "gpu"
        self.stream = torch.cuda.Stream(cache.device) if host and cache.device.type == "cuda" else None
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        if cache.where == "disk":
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
            self._thread.start()

    def _to_host(self, dst: torch.Tensor, x: torch.Tensor) -> torch.cuda.Event:
        """dst = x (device to pinned host), non_blocking on the write stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(x, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        x.record_stream(self.stream)
        return done

    def put(self, i: int, x: torch.Tensor) -> None:
        c = self.cache
        if self._queue is None:  # device cache: on the stream; pinned: the write stream, synced at close
            rows = c.data[i : i + x.shape[0]]
            if self.stream is not None and x.is_cuda:
                self._to_host(rows, x)
            else:
                rows.copy_(x)
            return
        if self._error is not None:
            raise RuntimeError(f"writing {c.path} failed") from self._error
        event = None
        if x.is_cuda:
            host = torch.empty(x.shape, dtype=c.data.dtype, pin_memory=True)
            event = self._to_host(host, x)
        else:
            host = x.to(c.data.dtype).contiguous()
        self._queue.put((i, host, event))  # blocks while WRITE_BEHIND batches are in flight

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so put() never blocks; close() raises
            i, host, event = item
            try:
                if event is not None:
                    event.synchronize()
                self.cache.write_host(i, host)
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
                self._error = exc

    def close(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None
        if self.stream is not None:
            self.stream.synchronize()  # the one sync of a pass
        if self._error is not None:
            raise RuntimeError(f"writing {self.cache.path} failed") from self._error

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(RuntimeError):  # the exception in flight says more
            self.close()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class ReadAhead:
    """Host batches of one cache for a whole plan, read ahead on `workers` threads (batch k on
    thread k mod workers, so several reads are in flight at once; handed over in plan order),
    at most about `depth` batches ahead."""

    def __init__(self, cache: ActivationCache, plan: Sequence[Rows], depth: int = READ_AHEAD,
                 workers: int = READ_WORKERS) -> None:
        self.cache, self.plan = cache, plan
        dev = cache.device  # the threads' current device (pinned buffers, CUDA calls)
        self._cuda = None if dev.type != "cuda" else dev.index if dev.index is not None else torch.cuda.current_device()
        n = max(1, min(workers, len(plan)))
        self._queues = [queue.Queue(maxsize=max(1, depth // n)) for _ in range(n)]
        self._next = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,), name="cache-read-ahead", daemon=True)
                         for w in range(n)]
        for t in self._threads:
            t.start()

    def _offer(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, w: int) -> None:
        if self._cuda is not None:
            torch.cuda.set_device(self._cuda)
        q = self._queues[w]
        try:
            for k in range(w, len(self.plan), len(self._queues)):
                if not self._offer(q, self.cache.read_host(self.plan[k])):
                    return
        except BaseException as exc:  # noqa: BLE001  (re-raised by next())
            self._offer(q, _Failed(exc))

    def next(self) -> torch.Tensor:
        item = self._queues[self._next % len(self._queues)].get()
        self._next += 1
        if isinstance(item, _Failed):
            raise RuntimeError(f"reading the {self.cache.where} cache {self.cache.path or ''} failed") \
                from item.error
        return item

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


class Prefetcher:
    """Issues the next batch's copies on a side CUDA stream while the current one computes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def batches(self, caches: Sequence[ActivationCache], plan: Sequence[Rows]) -> Iterator[list[torch.Tensor]]:
        """The rows `plan[k]` of every cache, on the device, for k = 0, 1, ...: batch k+1 is
        issued before batch k is handed over; host work runs on read-ahead threads."""
        plan = list(plan)
        if not plan:
            return
        if self.stream is not None:  # the side stream reads what the current stream wrote
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        ahead = [ReadAhead(c, plan) if any(c.staged(r) for r in plan) else None for c in caches]
        rows_dev = self._index_rows_on_device(caches, plan)

        def fetch(k: int) -> list[torch.Tensor]:
            return [c.to_device(a.next()) if a is not None else c.fetch(plan[k], rows_dev.get(k))
                    for c, a in zip(caches, ahead, strict=True)]

        try:
            pending = self.issue_fetch(lambda: fetch(0))
            for k in range(len(plan)):
                out = self.wait(pending)
                if k + 1 < len(plan):
                    pending = self.issue_fetch(lambda k=k: fetch(k + 1))
                yield out
        finally:
            for a in ahead:
                if a is not None:
                    a.close()

    def _index_rows_on_device(self, caches: Sequence[ActivationCache], plan: list[Rows]) -> dict[int, torch.Tensor]:
        """Index rows of the plan on the device, for device caches: one copy, on the side stream."""
        ks = [k for k, r in enumerate(plan) if not isinstance(r, slice)]
        if not ks or self.stream is None or not any(c.where == "gpu" for c in caches):
            return {}
        with torch.cuda.stream(self.stream):
            flat = torch.cat([plan[k] for k in ks]).to(self.device)
        return dict(zip(ks, flat.split([len(plan[k]) for k in ks]), strict=True))

    def issue(self, caches: list[ActivationCache], i: int, j: int):
        """Rows [i, j) of every cache, copied on the side stream; `wait` hands them over."""
        return self.issue_fetch(lambda: [c.get(i, j) for c in caches])

    def issue_fetch(self, fetch: Callable[[], list[torch.Tensor]]):
        """Any batch: `fetch` runs with the side stream current (e.g. a gather of random rows)."""
        if self.stream is None:
            return fetch(), None
        with torch.cuda.stream(self.stream):
            out = fetch()
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return out, ev

    @staticmethod
    def wait(handle) -> list[torch.Tensor]:
        out, ev = handle
        if ev is not None:
            cur = torch.cuda.current_stream()
            cur.wait_event(ev)
            for t in out:
                t.record_stream(cur)
        return out
