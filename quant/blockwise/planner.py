"""The cache planner: where each activation cache of the block-wise engine lives.

Block-wise training keeps four caches of [N, L, D] activations: full-precision
targets and quantized-chain inputs, for the training and the validation samples
(fp_train, q_train, fp_val, q_val). At paper scale (4096 x 2048 tokens, hidden
4096, bf16) one training cache is 64 GiB, so where they go decides whether a run
fits a machine at all. `cache: auto` measures the room and puts each cache in
the fastest place that still holds it:

1. `gpu`, device memory: a batch is a view, no copy at all. Room: free device
   memory (torch.cuda.mem_get_info, plus what torch's caching allocator holds
   unused) minus `step_reserve`, what a training step needs besides the caches.
2. `cpu`, host memory (pinned on a GPU machine: one non_blocking copy per batch).
   Room: available host memory (psutil), capped by the cgroup's limit (pinned
   pages count against it and can never be swapped out), minus `host_reserve`.
3. `disk`, files read ahead on a thread into pinned buffers. Room: free space
   where the cache files go (shutil.disk_usage), minus 1 GiB.

Caches are placed one by one in the order fp_train, q_train, fp_val, q_val (the
training caches are read every step, the validation ones once per epoch), each
in the first place with room left: first fit, because there are four items and
the two big ones are the same size, so nothing smarter would place them better.
On a CPU device there is no GPU tier (`auto` picks host memory, then disk).

An explicit `cache: gpu | cpu | disk` puts all four caches there after checking
the room: too little is a ConfigError naming the block-wise step's `cache` option with the
bytes needed and free. Under `auto`, a cache that fits nowhere is a ConfigError
naming data.train_samples and the largest count that would fit. Both come
before any training (the engine plans in its constructor). The capacity is
measured by `measure`; tests pass a `Capacity` of their own.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.config import ConfigError
from quant.data import host_memory_room

GIB = 2**30
DISK_RESERVE = 1 * GIB
WHERE_NAMES = {"gpu": "GPU memory", "cpu": "host memory", "disk": "disk"}


def gib(n: float) -> str:
    """Bytes for a person: GiB with two decimals, MiB below 1 GiB."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.2f} MiB"


@dataclass(frozen=True)
class CacheRequest:
    """One cache to place: `rows` samples of `row_shape` ([L, D]) in `dtype`."""

    name: str
    rows: int
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    train: bool  # its row count is data.train_samples (else the validation samples)

    @property
    def nbytes(self) -> int:
        return self.rows * math.prod(self.row_shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Placement:
    name: str
    where: str  # gpu | cpu | disk
    nbytes: int
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"where": self.where, "bytes": self.nbytes, "reason": self.reason}


@dataclass(frozen=True)
class Capacity:
    """Room measured for caches, in bytes, before any reserve is taken off."""

    gpu: int | None  # free device memory; None when the device is not a GPU
    host: int  # host memory this process can still take (and pin)
    host_total: int
    disk: int  # free space where disk caches go


def step_reserve(block_params: int, batch: int, seq: int, hidden: int, mlp: int) -> int:
    """Device bytes a block-wise step needs besides the caches (GPU tier only).

    28 bytes per block parameter: fp32 master weights (4), gradients (4), AdamW
    moments (8), the bf16 full-precision target block (2) and transient weights
    (10: fake-quant's bf16 copies, or TesseraQ's floor and rounding variables);
    activations saved for the backward, batch x seq x (16 hidden + 6 mlp) fp32
    values; and 2 GiB for allocator fragmentation and compile workspaces.
    Against peaks measured on an H200 (Llama-2-7B block; the Block-AP bench's JSON in
    docs/history/ and docs/results/tesseraq_7b_gpu.json): Block-AP batch 2, 7.2 GiB reserved vs
    9.3 GiB here; TesseraQ batch 4, 9.7 GiB reserved vs 11.3 GiB here.
    """
    return 28 * block_params + batch * seq * (16 * hidden + 6 * mlp) * 4 + 2 * GIB


def host_reserve(host_total: int) -> int:
    """Host memory left free: 2 GiB plus 5% of the machine (the stage's own buffers, one
    block's checkpoint, read-ahead staging, the page cache of disk caches, the OS). The
    model itself is already loaded when the room is measured."""
    return 2 * GIB + host_total // 20


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def measure(device: torch.device, cache_dir: Path, names: tuple[str, ...] = ()) -> Capacity:
    """Free GPU memory, host memory and disk space now. Files `names` (.bin) already in
    `cache_dir` (a killed run's caches, about to be overwritten) count as free."""
    import psutil

    gpu = None
    if device.type == "cuda":  # free memory, plus what torch's allocator holds but does not use
        gpu = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)
    vm = psutil.virtual_memory()
    host = host_memory_room()
    disk = shutil.disk_usage(_existing(cache_dir)).free
    for n in names:
        f = cache_dir / f"{n}.bin"
        if f.exists():
            disk += os.stat(f).st_blocks * 512
    return Capacity(gpu, host, vm.total, disk)


def _budgets(cap: Capacity, gpu_reserve: int) -> dict[str, int]:
    host = cap.host - host_reserve(cap.host_total)
    gpu = cap.gpu - gpu_reserve if cap.gpu is not None else host  # on a CPU device: the same memory
    return {"gpu": gpu, "cpu": host, "disk": cap.disk - DISK_RESERVE}


def _room(where: str, cap: Capacity, gpu_reserve: int) -> str:
    if where == "gpu" and cap.gpu is not None:
        return f"{gib(cap.gpu)} free GPU memory less a {gib(gpu_reserve)} reserve for a training step"
    if where == "disk":
        return f"{gib(cap.disk)} free on disk less {gib(DISK_RESERVE)}"
    return f"{gib(cap.host)} available host memory less a {gib(host_reserve(cap.host_total))} reserve"


def _first_fit(requests: list[CacheRequest], tiers: list[str],
               budgets: dict[str, int]) -> list[Placement] | CacheRequest:
    """Placements, or the first request that fits nowhere."""
    left, out = dict(budgets), []
    for req in requests:
        skipped = []
        for where in tiers:
            if req.nbytes <= left[where] or req.nbytes == 0:
                left[where] -= req.nbytes
                note = "".join(f"{s}; " for s in skipped)
                out.append(Placement(req.name, where, req.nbytes,
                                     f"{note}{gib(req.nbytes)} fits in {WHERE_NAMES[where]}, "
                                     f"{gib(left[where])} left there"))
                break
            skipped.append(f"{WHERE_NAMES[where]} has {gib(max(left[where], 0))} left")
        else:
            return req
    return out


def plan_caches(requests: list[CacheRequest], option: str, cap: Capacity, gpu_reserve: int,
                option_field: str = "block_ap.steps[0].block-ap.cache",
                train_field: str = "block_ap.data.train_samples") -> list[Placement]:
    """Where each request goes under `option` (auto | gpu | cpu | disk); see the module notes."""
    budgets = _budgets(cap, gpu_reserve)
    if option != "auto":
        total = sum(r.nbytes for r in requests)
        if total > budgets[option]:
            raise ConfigError(
                f"{option_field}={option!r}: the {len(requests)} activation caches need {gib(total)} "
                f"({total} bytes) but {WHERE_NAMES[option]} has {gib(max(budgets[option], 0))} "
                f"({max(budgets[option], 0)} bytes) of room ({_room(option, cap, gpu_reserve)}); "
                f"use 'auto' to spread them over GPU, host memory and disk, or lower {train_field}")
        return [Placement(r.name, option, r.nbytes, f"{gib(r.nbytes)} in {WHERE_NAMES[option]}, as "
                          f"{option_field} asks") for r in requests]
    tiers = (["gpu"] if cap.gpu is not None else []) + ["cpu", "disk"]
    plan = _first_fit(requests, tiers, budgets)
    if isinstance(plan, list):
        return plan
    n = next(r.rows for r in requests if r.train)
    fit = max_train_rows(requests, tiers, budgets)
    rooms = "; ".join(_room(w, cap, gpu_reserve) for w in tiers)
    raise ConfigError(
        f"{train_field}={n}: the activation caches ({', '.join(f'{r.name} {gib(r.nbytes)}' for r in requests)}) "
        f"fit nowhere on this machine ({plan.name} does not fit; room: {rooms}); at most {fit} "
        f"training samples fit at this sequence length; lower {train_field} (or the sequence "
        "length), or free memory or disk")


def max_train_rows(requests: list[CacheRequest], tiers: list[str], budgets: dict[str, int]) -> int:
    """The largest training row count whose caches all find a place (binary search)."""

    def fits(n: int) -> bool:
        scaled = [CacheRequest(r.name, n, r.row_shape, r.dtype, True) if r.train else r for r in requests]
        return isinstance(_first_fit(scaled, tiers, budgets), list)

    lo, hi = 0, next(r.rows for r in requests if r.train)
    if not fits(0):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
