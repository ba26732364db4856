"""Activation caches of the block-wise engine: the cache planner's decisions and
errors under faked free memory, disk caches with read-ahead and write-behind returning exactly
what the in-memory cache returns, the pipelined forward pass against the old sequential loop,
the bf16 full-precision block against the autocast path, and a whole engine run with its
caches on disk equal to one in host memory (CPU; the GPU paths are marked `gpu`).

Tolerances: everything on CPU is bitwise. The bf16 target block (linear weights cast once)
against the fp32 block under bf16 autocast is bitwise too, on CPU (explicit torch.autocast)
and on GPU (eager): autocast rounds the same weights to the same bf16 values before the same
kernels. Compiled against eager on GPU: 1e-2 relative (inductor fuses the norms differently,
a few bf16 ulps).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from quant.blockwise import planner
from quant.blockwise.cache import ActivationCache, Prefetcher
from quant.blockwise.engine import BlockwiseContext
from quant.blockwise.passes import (
    call_block,
    capture_block_inputs,
    cast_linears,
    float_block,
    forward_pass,
    load_float_weights,
    make_forward_fn,
    run_block,
)
from quant.calibrate.rtn import quantize_linears
from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.methods import method
from quant.models.arch import decoder_layers
from tests.conftest import make_tiny_llama

GIB = planner.GIB
CPU = torch.device("cpu")
SCHEME = QuantScheme.from_name("W3A16KV16", preset="efficientqat", group_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _ids(n: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# The planner, under faked free memory


def _paper_requests(train: int = 4096, val: int = 64) -> list[planner.CacheRequest]:
    """The four caches of a Llama-2-7B run: [N, 2048, 4096] bf16, 16 MiB a row."""
    row = (2048, 4096)
    return [planner.CacheRequest("fp_train", train, row, torch.bfloat16, True),
            planner.CacheRequest("q_train", train, row, torch.bfloat16, True),
            planner.CacheRequest("fp_val", val, row, torch.bfloat16, False),
            planner.CacheRequest("q_val", val, row, torch.bfloat16, False)]


def _where(plan) -> dict[str, str]:
    return {p.name: p.where for p in plan}


def test_planner_prefers_gpu_then_host_then_disk():
    reqs = _paper_requests()
    assert reqs[0].nbytes == 64 * GIB and reqs[2].nbytes == GIB
    reserve = 9 * GIB
    # room for everything on the GPU
    plan = planner.plan_caches(reqs, "auto", planner.Capacity(140 * GIB, 120 * GIB, 128 * GIB, 500 * GIB), reserve)
    assert _where(plan) == dict.fromkeys(("fp_train", "q_train", "fp_val", "q_val"), "gpu")
    # one training cache on the GPU: the other goes to host memory, the small ones fill the GPU
    plan = planner.plan_caches(reqs, "auto", planner.Capacity(100 * GIB, 120 * GIB, 128 * GIB, 500 * GIB), reserve)
    assert _where(plan) == {"fp_train": "gpu", "q_train": "cpu", "fp_val": "gpu", "q_val": "gpu"}
    q = plan[1]
    assert q.nbytes == 64 * GIB and "GPU memory has 27.00 GiB left" in q.reason and "host memory" in q.reason
    # host memory too small as well (50 GiB less 2 GiB + 5% of 128 GiB): disk
    plan = planner.plan_caches(reqs, "auto", planner.Capacity(100 * GIB, 50 * GIB, 128 * GIB, 500 * GIB), reserve)
    assert _where(plan) == {"fp_train": "gpu", "q_train": "disk", "fp_val": "gpu", "q_val": "gpu"}
    # a CPU device has no GPU tier: host memory first
    plan = planner.plan_caches(reqs, "auto", planner.Capacity(None, 200 * GIB, 256 * GIB, 500 * GIB), reserve)
    assert _where(plan) == dict.fromkeys(("fp_train", "q_train", "fp_val", "q_val"), "cpu")
    # the reserve for a training step counts: 131 GiB free less 9 GiB does not hold 130 GiB
    plan = planner.plan_caches(reqs, "auto", planner.Capacity(131 * GIB, 120 * GIB, 128 * GIB, 500 * GIB), reserve)
    assert _where(plan)["q_train"] == "cpu"


def test_explicit_location_without_room_is_a_clear_error():
    reqs = _paper_requests()
    cap = planner.Capacity(100 * GIB, 120 * GIB, 128 * GIB, 60 * GIB)
    with pytest.raises(ConfigError, match=r"block_ap\.steps\[0\]\.block-ap\.cache='gpu': the 4 activation caches need "
                                          r"130\.00 GiB \(139586437120 bytes\) but GPU memory has 91\.00 GiB"):
        planner.plan_caches(reqs, "gpu", cap, 9 * GIB)
    with pytest.raises(ConfigError, match=r"block_ap\.steps\[0\]\.block-ap\.cache='disk'.*disk has 59\.00 GiB"):
        planner.plan_caches(reqs, "disk", cap, 9 * GIB)
    plan = planner.plan_caches(_paper_requests(256), "disk", cap, 9 * GIB)  # 8 GiB a cache: fits
    assert _where(plan) == dict.fromkeys(("fp_train", "q_train", "fp_val", "q_val"), "disk")


def test_a_sample_count_that_fits_nowhere_names_train_samples_and_the_maximum():
    cap = planner.Capacity(None, 20 * GIB, 32 * GIB, 30 * GIB)
    budgets = {"cpu": 20 * GIB - planner.host_reserve(32 * GIB), "disk": 29 * GIB}
    best = planner.max_train_rows(_paper_requests(), ["cpu", "disk"], budgets)
    assert 0 < best < 4096
    fits = planner.plan_caches(_paper_requests(best), "auto", cap, 0)  # the maximum fits ...
    assert {p.where for p in fits} <= {"cpu", "disk"}
    with pytest.raises(ConfigError, match=rf"block_ap\.data\.train_samples={best + 1}: .*fit nowhere.*"
                                          rf"at most {best} training samples fit"):
        planner.plan_caches(_paper_requests(best + 1), "auto", cap, 0)  # ... one more does not
    with pytest.raises(ConfigError, match=r"block_ap\.data\.train_samples=4096: .*at most \d+ training"):
        planner.plan_caches(_paper_requests(), "auto", cap, 0)


def test_measure_reports_host_and_disk(tmp_path):
    cap = planner.measure(CPU, tmp_path / "not" / "yet")
    assert cap.gpu is None and 0 < cap.host <= cap.host_total and cap.disk > 0


# ---------------------------------------------------------------------------
# Disk caches: read-ahead and write-behind return exactly the in-memory rows


def _pair(tmp_path, n: int = 11, shape=(6, 8), dtype=torch.bfloat16):
    """The same random rows in a host cache and in a disk cache (written through its writer)."""
    ref = ActivationCache((n, *shape), dtype, "cpu", CPU)
    ref.data.copy_(torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)))
    disk = ActivationCache((n, *shape), dtype, "disk", CPU, tmp_path / "c.bin")
    with disk.writer() as w:
        for i in range(0, n, 3):
            w.put(i, ref.data[i : i + 3].clone())
    return ref, disk


def _read_ahead_threads() -> int:
    return sum(t.name == "cache-read-ahead" for t in threading.enumerate())


def test_disk_cache_with_read_ahead_returns_the_in_memory_batches(tmp_path):
    ref, disk = _pair(tmp_path)
    readers = []
    read_host = disk.read_host

    def spy(rows):
        readers.append(threading.current_thread().name)
        return read_host(rows)

    disk.read_host = spy
    assert torch.equal(disk.data, ref.data)  # write-behind: everything on disk once the writer closed
    order = torch.randperm(11, generator=torch.Generator().manual_seed(1)).tolist()
    g = torch.Generator().manual_seed(2)
    plans = {"sequential": [slice(i, i + 4) for i in range(0, 11, 4)],
             "shuffled slices": [slice(o, o + 1) for o in order],
             "random rows": [torch.randperm(11, generator=g)[:3] for _ in range(7)]}
    prefetch = Prefetcher(CPU)
    for name, plan in plans.items():
        seen, readers[:] = 0, []
        for k, (a, b) in enumerate(prefetch.batches([ref, disk], plan)):
            want = ref.data[plan[k]]
            assert torch.equal(a, want) and torch.equal(b, want), (name, k)
            assert b.data_ptr() != disk.data.data_ptr()  # a buffer of its own, not the map
            seen += 1
        assert seen == len(plan) and readers == ["cache-read-ahead"] * len(plan), name  # read on its thread
        assert _read_ahead_threads() == 0, name
    idx = torch.tensor([9, 0, 4])
    assert torch.equal(disk.get(2, 7), ref.data[2:7]) and torch.equal(disk.gather(idx), ref.data[idx])


def test_read_ahead_stops_with_its_consumer_and_reports_read_errors(tmp_path):
    ref, disk = _pair(tmp_path)
    batches = Prefetcher(CPU).batches([disk], [slice(i, i + 1) for i in range(11)])
    next(batches)
    assert _read_ahead_threads() >= 1  # 11 batches, at most ~6 read: the readers wait
    batches.close()  # a consumer that stops early (an exception in a step) ends the thread
    assert _read_ahead_threads() == 0
    with open(disk.path, "r+b") as f:
        f.truncate(2 * disk.row_bytes)  # rows 2.. are gone
    with pytest.raises(RuntimeError, match="reading the disk cache") as err:
        for _ in Prefetcher(CPU).batches([disk], [slice(0, 2), slice(2, 4)]):
            pass
    assert isinstance(err.value.__cause__, EOFError)


def test_copy_from_into_a_disk_cache(tmp_path):
    ref, _ = _pair(tmp_path)
    other = ActivationCache(tuple(ref.data.shape), ref.data.dtype, "disk", CPU, tmp_path / "d.bin")
    other.copy_from(ref, chunk_rows=4)
    assert torch.equal(other.data, ref.data)
    assert (tmp_path / "d.bin").stat().st_size == ref.nbytes


# ---------------------------------------------------------------------------
# Forward passes and the full-precision block


def _captured(n: int = 7):
    model = make_tiny_llama()
    quantize_linears(model, SCHEME)
    cache = ActivationCache((n, 32, 64), torch.float32, "cpu", CPU)
    kwargs = capture_block_inputs(model, _ids(n), cache, 3, CPU)
    return model, cache, kwargs


def _old_run_block(block, src, dst, kwargs, batch_size):
    """The loop before the pipelined passes: one batch at a time, a synchronous copy back."""
    with torch.no_grad():
        for i in range(0, len(src), batch_size):
            dst.data[i : i + batch_size].copy_(call_block(block, src.data[i : i + batch_size], kwargs))


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_pipelined_run_block_equals_the_old_loop(tmp_path, where):
    model, cache, kwargs = _captured()
    block = decoder_layers(model)[0]
    old = ActivationCache(tuple(cache.data.shape), torch.float32, "cpu", CPU)
    old.copy_from(cache)
    _old_run_block(block, old, old, kwargs, 3)  # 7 rows in batches of 3: a short last batch
    new = ActivationCache(tuple(cache.data.shape), torch.float32, where, CPU, tmp_path / "x.bin")
    new.copy_from(cache)
    run_block(block, new, new, kwargs, 3, amp=False)  # in place, as the engine runs it
    assert torch.equal(new.data, old.data)
    other = ActivationCache(tuple(cache.data.shape), torch.float32, where, CPU, tmp_path / "y.bin")
    fn = make_forward_fn(block, kwargs, CPU, amp=False, compile=False)
    forward_pass(fn, cache, other, 3, Prefetcher(CPU))  # into another cache
    assert torch.equal(other.data, old.data)


def test_bf16_target_block_equals_fp32_weights_under_autocast():
    model, cache, kwargs = _captured(4)
    layers = decoder_layers(model)
    fp32 = float_block(layers[0])
    cast = cast_linears(copy.deepcopy(fp32), torch.bfloat16)
    assert all(m.weight.dtype == torch.bfloat16 for m in cast.modules() if type(m) is torch.nn.Linear)
    assert all(p.dtype == torch.float32 for n, p in cast.named_parameters() if "norm" in n)
    x = cache.data.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = call_block(fp32, x, kwargs), call_block(cast, x, kwargs)
    assert got.dtype == want.dtype and torch.equal(got, want)
    # the workspace reloaded with block 1's float weights is block 1's float block
    load_float_weights(fp32, layers[1])
    with torch.no_grad():
        assert torch.equal(call_block(fp32, cache.data, kwargs), call_block(float_block(layers[1]), cache.data, kwargs))
    layers[1].self_attn.q_proj.freeze()
    with pytest.raises(RuntimeError, match="frozen: its float weight is gone"):
        load_float_weights(fp32, layers[1])


# ---------------------------------------------------------------------------
# The engine


OPTIONS = {"epochs": 1, "batch_size": 3, "weight_lr": 1e-3, "qparam_lr": 1e-3}


def _engine(tmp_path, cache: str, measure=planner.measure, **kw):
    from quant.blockwise.block_ap import BlockAP

    model = make_tiny_llama()
    quantize_linears(model, SCHEME)
    ids = _ids(14)
    entry = method("block-ap", "blockwise")
    options = entry.options.from_dict({**OPTIONS, "cache": cache, **kw}, "block_ap.options")
    ctx = BlockwiseContext(CPU, tmp_path, seed=0, fingerprint="t", measure=measure)
    return model, BlockAP(model, ids[:10], ids[10:], options, ctx, SCHEME.weight.bits)


def test_engine_with_caches_on_disk_equals_host_memory(tmp_path, caplog):
    model_cpu, engine = _engine(tmp_path / "cpu", "cpu")
    result_cpu = engine.run()
    assert {c["where"] for c in result_cpu.caches.values()} == {"cpu"}

    def small_host(device, cache_dir, names=()):  # room in host memory for the two val caches only
        total = 64 * GIB
        return planner.Capacity(None, planner.host_reserve(total) + 70_000, total, 10 * GIB)

    with caplog.at_level("INFO", logger="quant.blockwise"):  # the plan is made and logged up front
        model_disk, engine = _engine(tmp_path / "auto", "auto", small_host)
    result = engine.run()
    assert {k: v["where"] for k, v in result.caches.items()} == \
        {"fp_train": "disk", "q_train": "disk", "fp_val": "cpu", "q_val": "cpu"}
    assert result.caches["fp_train"]["bytes"] == 10 * 32 * 64 * 4
    assert (tmp_path / "auto" / "cache" / "q_train.bin").stat().st_size == 10 * 32 * 64 * 4
    logged = [r.getMessage() for r in caplog.records if "block-ap: cache" in r.getMessage()]
    assert len(logged) == 4 and "q_train -> disk" in logged[1] and "host memory has" in logged[1]
    a, b = model_cpu.state_dict(), model_disk.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x["val_loss_final"] for x in result.per_block] == [x["val_loss_final"] for x in result_cpu.per_block]


def test_engine_checks_the_room_before_any_work(tmp_path):
    def tiny_disk(device, cache_dir, names=()):
        return planner.Capacity(None, 0, 64 * GIB, GIB + 1000)  # 1000 bytes of room on disk

    with pytest.raises(ConfigError, match=r"block_ap\.steps\[0\]\.block-ap\.cache='disk': the 4 activation caches need "
                                          r".*\(229376 bytes\).*\(1000 bytes\) of room"):
        _engine(tmp_path, "disk", tiny_disk)
    with pytest.raises(ConfigError, match=r"block_ap\.data\.train_samples=10: .*at most 0 training samples"):
        _engine(tmp_path, "auto", tiny_disk)
    assert not tmp_path.joinpath("cache").exists()


# ---------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_gpu_forward_passes_equal_the_sequential_loop(tmp_path):
    cuda = torch.device("cuda")
    model = make_tiny_llama()
    quantize_linears(model, SCHEME)
    ref = ActivationCache((7, 32, 64), torch.bfloat16, "gpu", cuda)
    kwargs = capture_block_inputs(model, _ids(7), ref, 3, cuda, amp=True)
    block = copy.deepcopy(decoder_layers(model)[0]).to(cuda)
    fp32 = float_block(block)
    want = ActivationCache((7, 32, 64), torch.bfloat16, "gpu", cuda)
    with torch.no_grad():
        for i in range(0, 7, 3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                want.data[i : i + 3] = call_block(fp32, ref.data[i : i + 3], kwargs)
    cast = cast_linears(float_block(block), torch.bfloat16)
    for where in ("gpu", "cpu", "disk"):
        c = ActivationCache((7, 32, 64), torch.bfloat16, where, cuda, tmp_path / f"{where}.bin")
        c.copy_from(ref)
        assert where != "cpu" or c.data.is_pinned()
        forward_pass(make_forward_fn(cast, kwargs, cuda, True, False), c, c, 3, Prefetcher(cuda))
        assert torch.equal(c.data.to(cuda), want.data), where  # bf16 once == autocast, exactly
    c = ActivationCache((7, 32, 64), torch.bfloat16, "gpu", cuda)
    c.copy_from(ref)
    forward_pass(make_forward_fn(cast, kwargs, cuda, True, True), c, c, 3, Prefetcher(cuda))
    rel = ((c.data.float() - want.data.float()).norm() / want.data.float().norm()).item()
    assert rel < 1e-2


@pytest.mark.gpu
def test_gpu_disk_read_ahead_returns_the_pinned_batches(tmp_path):
    cuda = torch.device("cuda")
    host = ActivationCache((9, 16, 32), torch.bfloat16, "cpu", cuda)
    host.data.copy_(torch.randn(9, 16, 32))
    disk = ActivationCache((9, 16, 32), torch.bfloat16, "disk", cuda, tmp_path / "d.bin")
    disk.copy_from(host, chunk_rows=2)
    g = torch.Generator().manual_seed(0)
    for plan in ([slice(i, i + 2) for i in range(0, 9, 2)], [torch.randperm(9, generator=g)[:4] for _ in range(5)]):
        for k, (a, b) in enumerate(Prefetcher(cuda).batches([host, disk], plan)):
            assert a.is_cuda and torch.equal(a, b) and torch.equal(a.cpu(), host.data[plan[k]])
    cap = planner.measure(cuda, tmp_path)
    assert 0 < cap.gpu <= torch.cuda.mem_get_info()[1]
