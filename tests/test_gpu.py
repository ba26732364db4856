"""GPU paths the CPU tests cannot reach (marker `gpu`; skipped without CUDA).

Needs only torch, transformers, safetensors and accelerate: nothing here imports
MLflow, Prefect or DVC, so the file runs on a bare GPU machine:

    python -m pytest -q -m gpu tests/test_gpu.py

Tolerances, and why:
- CUDA-graph decode vs eager decode: the same kernels replayed, so the sampled
  ids must be equal and the logits equal to 1e-5 (fp32).
- compiled vs eager Block-AP step: inductor fuses and reorders reductions, and a
  reordered w / s can flip a rounding tie of the fake-quant grid, so loss and
  gradients agree to a relative error of 1e-3 in fp32 and 3e-2 under bf16 autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch

from quant.blockwise.cache import ActivationCache, Prefetcher
from quant.blockwise.passes import capture_block_inputs, make_loss_fn
from quant.calibrate.rtn import quantize_linears
from quant.config.scheme import QuantScheme
from quant.e2e.distributed import make_accelerator
from quant.e2e.trainer import E2EContext, TrainConfig, Trainer
from quant.methods import method
from quant.models.arch import decoder_layers
from quant.synth.decode import KVDecoder
from tests.conftest import make_tiny_llama
from tests.quant.e2e.test_train import _norm_objective

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
SCHEME = QuantScheme.from_name("W4A16KV16", preset="efficientqat", group_size=32)  # learned step sizes
VOCAB = 256


def _ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


# ---------------------------------------------------------------------------
# Synthesis decode


def _decode(model, ids: torch.Tensor, graphs: bool):
    """Teacher-forced decode of `ids` [4, L]; rows 0 and 2 dropped halfway. Returns the
    logits of every step and whether CUDA graphs were replayed."""
    state = {"ids": ids, "buf": torch.empty(ids.shape[0], VOCAB, device=CUDA)}

    def head(logits, pos):  # graph-safe: writes a static buffer, reads the position on the device
        state["buf"].copy_(logits)
        nxt = (pos + 1).clamp(max=ids.shape[1] - 1)
        return state["ids"].index_select(1, nxt).squeeze(1)

    seen, used_graphs = [], False
    with torch.no_grad():
        dec = KVDecoder(model, ids.shape[0], ids.shape[1], head, graphs=graphs)
        dec.inp.copy_(ids[:, 0])
        half = ids.shape[1] // 2
        for t in range(ids.shape[1]):
            if t == half:
                dec.keep(torch.tensor([3, 1], device=CUDA))
                state["ids"], state["buf"] = ids[[3, 1]], torch.empty(2, VOCAB, device=CUDA)
            dec.step()
            used_graphs |= dec._graphs is not None
            seen.append(state["buf"].clone())
    return seen, used_graphs


def test_cuda_graph_decode_equals_eager_decode():
    model = make_tiny_llama().to(CUDA)
    ids = _ids(4, 24).to(CUDA)
    eager, used_eager = _decode(model, ids, graphs=False)
    graph, used_graph = _decode(model, ids, graphs=True)
    assert used_graph and not used_eager
    for t, (a, b) in enumerate(zip(graph, eager, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {t}")
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {t}"
    with torch.no_grad():
        ref = model(ids).logits  # [4, L, V]: the model's own forward
    assert (torch.stack(eager[:12], 1) - ref[:, :12]).abs().max() < 1e-4
    assert (torch.stack(eager[12:], 1) - ref[[3, 1], 12:]).abs().max() < 1e-4


# ---------------------------------------------------------------------------
# Block-AP


@pytest.mark.parametrize(("amp", "tol"), [(False, 1e-3), (True, 3e-2)])
def test_compiled_block_ap_step_equals_eager(amp, tol):
    model = make_tiny_llama()
    quantize_linears(model, SCHEME)
    cache = ActivationCache((4, 32, 64), torch.float32, "gpu", CUDA)
    kwargs = capture_block_inputs(model, _ids(4, 32), cache, 2, CUDA)
    block = decoder_layers(model)[0]
    x = cache.get(0, 4)
    y = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(CUDA)
    results = []
    for compiled in (False, True):
        b = copy.deepcopy(block).to(CUDA).train()
        loss = make_loss_fn(b, kwargs, CUDA, amp, compiled)(x, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in b.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (le, ge), (lc, gc) = results
    assert _rel(lc, le) < tol
    assert set(ge) == set(gc) and ge
    for n in ge:
        assert _rel(gc[n], ge[n]) < tol, n


def test_pinned_prefetch_delivers_the_rows_on_a_side_stream():
    host = ActivationCache((8, 4, 16), torch.float32, "cpu", CUDA)
    assert host.data.is_pinned()
    host.put(0, torch.arange(8 * 4 * 16, dtype=torch.float32).view(8, 4, 16))
    prefetch = Prefetcher(CUDA)
    assert prefetch.stream is not None and prefetch.stream != torch.cuda.current_stream()
    pending = prefetch.issue([host, host], 2, 6)
    nxt = prefetch.issue([host], 6, 8)  # issued before the first batch is consumed
    a, b = Prefetcher.wait(pending)
    (c,) = Prefetcher.wait(nxt)
    assert a.device.type == "cuda" and a.data_ptr() != b.data_ptr()
    assert torch.equal((a * 2).cpu(), host.data[2:6] * 2) and torch.equal(b.cpu(), host.data[2:6])
    assert torch.equal(c.cpu(), host.data[6:8])


# ---------------------------------------------------------------------------
# End-to-end trainer


def test_bf16_autocast_training_lowers_the_loss(tmp_path):
    model = make_tiny_llama().to(torch.bfloat16)
    quantize_linears(model, SCHEME)
    entry = method("e2e-qp", "e2e")
    objective = entry.fn(model, entry.options.from_dict({"lr": 1e-2}),
                         E2EContext(SCHEME, CUDA, torch.bfloat16))
    cfg = TrainConfig(epochs=4, batch_size=4, warmup_ratio=0.0, save_every=0, log_every=1,
                      grad_checkpointing=True)
    trainer = Trainer(model, objective, cfg, tmp_path, make_accelerator("cuda"), seed=0)
    assert trainer.amp_dtype == torch.bfloat16 and trainer.acc.device.type == "cuda"
    data = {"input_ids": _ids(16, 64)}
    result = trainer.fit(data, data)
    assert result.val_loss_after < result.val_loss_before - 0.05
    assert all(p.dtype == torch.float32 for p in trainer.trainable.values())


def test_fp32_master_weights_change_under_small_lr(tmp_path):
    """bf16-loaded model, lr 2e-5: the RMSNorm weights (1.0) move in their fp32 masters by
    less than a bf16 rounding step, so a bf16 parameter would not have moved at all."""
    model = make_tiny_llama().to(torch.bfloat16)
    objective = _norm_objective(model, 2e-5)
    norms = objective.param_groups[0]["params"]
    cfg = TrainConfig(epochs=1, batch_size=2, warmup_ratio=0.0, save_every=0, log_every=1,
                      max_grad_norm=0.0, grad_checkpointing=False)
    Trainer(model, objective, cfg, tmp_path, make_accelerator("cuda"), seed=0).fit({"input_ids": _ids(4, 32)})
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in norms)
    moved = torch.cat([(p.detach() - 1).abs().flatten() for p in norms])
    assert 1e-5 < moved.max().item() < 1e-3
    assert all(torch.equal(p.detach().bfloat16(), torch.ones_like(p, dtype=torch.bfloat16)) for p in norms)
