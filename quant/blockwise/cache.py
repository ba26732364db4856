"""Where the block-wise engine keeps activations, and how batches reach the device.

Cached activations ([N, L, D]) live on the device, in pinned host memory, or in
memory-mapped files on disk; the next batch is copied on a side CUDA stream
while the current one computes (non_blocking copies from pinned memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch


class ActivationCache:
    """[N, L, D] activations on the device, in pinned host memory, or memory-mapped on disk."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, where: str, device: torch.device,
                 path: Path | None = None) -> None:
        self.device, self.where = device, where
        if where == "gpu":
            self.data = torch.empty(shape, dtype=dtype, device=device)
        elif where == "disk":
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            numel = math.prod(shape)
            with open(path, "wb") as f:
                f.truncate(numel * torch.empty((), dtype=dtype).element_size())
            self.data = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        else:
            pin = device.type == "cuda"
            self.data = torch.empty(shape, dtype=dtype, pin_memory=pin)

    def __len__(self) -> int:
        return self.data.shape[0]

    def get(self, i: int, j: int) -> torch.Tensor:
        """Rows [i, j) on the device (non_blocking from pinned memory)."""
        x = self.data[i:j]
        return x.to(self.device, non_blocking=x.is_pinned())

    def gather(self, idx: torch.Tensor, idx_device: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `idx` (a CPU index tensor) on the device. On the device: an index_select with
        `idx_device`; from the host: gathered into fresh pinned memory (the caching host
        allocator keeps it alive until its copy is done), then copied non_blocking."""
        if self.data.device.type != "cpu":
            return self.data.index_select(0, idx_device if idx_device is not None else idx.to(self.device))
        pin = self.device.type == "cuda"
        out = torch.empty((len(idx), *self.data.shape[1:]), dtype=self.data.dtype, pin_memory=pin)
        torch.index_select(self.data, 0, idx, out=out)
        return out.to(self.device, non_blocking=pin)

    def put(self, i: int, x: torch.Tensor) -> None:
        self.data[i : i + x.shape[0]].copy_(x, non_blocking=False)

    def copy_from(self, other: ActivationCache) -> None:
        self.data.copy_(other.data)


class Prefetcher:
    """Issues the next batch's copies on a side CUDA stream while the current one computes."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

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
