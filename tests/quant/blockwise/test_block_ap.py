"""Block-AP on a tiny Llama (CPU): it beats RTN per block on held-out samples, the frozen
result is exactly its integer representation, and bad params fail before any training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from conftest import StubTokenizer
from quant.blockwise.block_ap import BlockAP
from quant.blockwise.engine import BlockwiseContext
from quant.calibrate.rtn import quantize_linears
from quant.checkpoint import save_quantized
from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.data import split_samples
from quant.load import load_model
from quant.methods import method
from quant.models.arch import decoder_layers
from quant.modules.linear import QuantLinear

SCHEME = QuantScheme.from_name("W2A16KV16", preset="efficientqat", group_size=32)
OPTIONS = {"epochs": 3, "batch_size": 4, "weight_lr": 1e-3, "qparam_lr": 1e-3}


def _ids(n: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _block_ap(model, tmp_path, train, val, max_val_mse_ratio=2.0, **kw) -> BlockAP:
    entry = method("block-ap", "blockwise")
    options = entry.options.from_dict({**OPTIONS, **kw}, "block_ap.options")
    ctx = BlockwiseContext(torch.device("cpu"), tmp_path / "work", seed=0, fingerprint="t",
                           max_val_mse_ratio=max_val_mse_ratio)
    return BlockAP(model, train, val, options, ctx, SCHEME.weight.bits)


@torch.no_grad()
def _block_inputs(model, ids):
    """(hidden states, kwargs) entering each decoder block of `model` for `ids`."""
    seen = []
    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"], kwargs)),
        with_kwargs=True) for layer in decoder_layers(model)]
    model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def _mse(block, x, kwargs, target) -> float:
    out = block(x, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return F.mse_loss(out, target).item()


def test_block_ap_beats_rtn_on_every_block_held_out(tiny_llama, tmp_path):
    fp = copy.deepcopy(tiny_llama)
    quantize_linears(tiny_llama, SCHEME)
    rtn = copy.deepcopy(tiny_llama)
    train, val = split_samples(_ids(40), 32, 8, seed=0)
    runner = _block_ap(tiny_llama, tmp_path, train, val)
    result = runner.run()
    assert runner.state() == {"phase": "finished", "blocks": 2, "done": 2, "next": None,
                              "work_dir": str(tmp_path / "work")}
    assert all(b["val_loss"][-1] < b["val_loss_init"] for b in result.per_block)
    held_out = _ids(8, seed=123)  # never seen in training or validation
    fp_layers, rtn_layers, bap_layers = (decoder_layers(m) for m in (fp, rtn, tiny_llama))
    with torch.no_grad():
        for i, (x, kwargs) in enumerate(_block_inputs(fp, held_out)):
            target = fp_layers[i](x, **kwargs)
            target = target[0] if isinstance(target, tuple) else target
            mse_rtn = _mse(rtn_layers[i], x, kwargs, target)
            mse_bap = _mse(bap_layers[i], x, kwargs, target)
            assert mse_bap < 0.9 * mse_rtn, f"block {i}: Block-AP {mse_bap:.3g} vs RTN {mse_rtn:.3g}"


def test_frozen_result_equals_its_integer_representation(tiny_llama, tmp_path):
    quantize_linears(tiny_llama, SCHEME)
    train, val = split_samples(_ids(12), 8, 4, seed=0)
    runner = _block_ap(tiny_llama, tmp_path, train, val, epochs=1, cache="disk")  # memory-mapped cache
    runner.capture()
    assert (tmp_path / "work" / "cache" / "q_train.bin").stat().st_size == 8 * 32 * 64 * 4
    with pytest.raises(RuntimeError, match="train_block"):
        runner.train_block(1)  # out of order: block 0 is next
    for i in range(2):
        runner.train_block(i)
    layers = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, QuantLinear)}
    fake = {n: m.dequantized_weight().detach().clone() for n, m in layers.items()}
    ids = _ids(2, seed=7)
    with torch.no_grad():
        logits_fake = tiny_llama(input_ids=ids).logits
    runner.finish()
    for n, m in layers.items():
        assert m.frozen
        q, scale, zp = m.integer_weight()
        lo, hi = SCHEME.weight.format.qrange(False)
        assert q.min() >= lo and q.max() <= hi
        deq = ((q.float().view(*q.shape[:-1], -1, 32) - zp[..., None]) * scale[..., None]).view(q.shape)
        assert torch.equal(deq, fake[n]), n  # fake-quant == (q - zp) * s, bit for bit
    with torch.no_grad():
        assert torch.equal(tiny_llama(input_ids=ids).logits, logits_fake)
    # the frozen state survives save/load exactly (also loaded in another dtype)
    save_quantized(tiny_llama, _Tok(), SCHEME, tmp_path / "out")
    for dtype in (torch.float32, torch.bfloat16):
        loaded, _ = _load(tmp_path / "out", dtype)
        for n, m in loaded.named_modules():
            if isinstance(m, QuantLinear):
                assert m.frozen and torch.equal(m.qweight, layers[n].qweight), n
                assert torch.equal(m.zero_point, layers[n].zero_point) and torch.equal(m.scale, layers[n].scale)
        if dtype == torch.float32:
            with torch.no_grad():
                assert torch.equal(loaded(input_ids=ids).logits, logits_fake)


_Tok = StubTokenizer


def _load(path, dtype):
    from unittest import mock

    with mock.patch("transformers.AutoTokenizer.from_pretrained", return_value=None):
        return load_model(path, dtype)


def test_bad_params_fail_before_training():
    entry = method("block-ap", "blockwise")
    with pytest.raises(ConfigError, match=r"block_ap\.options\.weight_lr"):
        entry.options.from_dict({"weight_lr": 0.0}, "block_ap.options")
    with pytest.raises(ConfigError, match=r"block_ap\.options\.qparam_lr"):
        entry.options.from_dict({"qparam_lr": -1e-4}, "block_ap.options")
    with pytest.raises(ConfigError, match=r"block_ap\.options\.cache"):
        entry.options.from_dict({"cache": "tape"}, "block_ap.options")
    with pytest.raises(ConfigError, match=r"block_ap\.data.*val_samples"):
        split_samples(_ids(10), 8, 4, seed=0, path="block_ap.data")
    from tasks.block_ap import BlockAPStageConfig

    with pytest.raises(ConfigError, match=r"block_ap\.steps\[0\]: 'gptq' is a calibrate step"):
        BlockAPStageConfig.from_dict({"steps": ["gptq"]}, "block_ap")
    with pytest.raises(ConfigError, match=r"block_ap\.data\.val_samples"):
        BlockAPStageConfig.from_dict({"data": {"val_samples": -1}}, "block_ap")


def test_absurd_lr_fails_the_run_before_the_block_is_written(tiny_llama, tmp_path):
    """qparam_lr 1e6 makes block 0 far worse (every number finite): with the default
    max_val_mse_ratio the run fails (TrainingDivergedError, a ConfigError: exit 2) naming
    the block, the losses and the option, and writes nothing of that block. The old engine
    kept the incoming block and finished as if it had trained."""
    from quant.config import TrainingDivergedError

    quantize_linears(tiny_llama, SCHEME)
    train, val = split_samples(_ids(12), 8, 4, seed=0)
    runner = _block_ap(tiny_llama, tmp_path, train, val, epochs=1, qparam_lr=1e6)
    runner.capture()
    with pytest.raises(TrainingDivergedError, match=r"block_ap\.steps\[0\]: block 0 got far worse in training: "
                                                    r"validation MSE .* block_ap\.max_val_mse_ratio=2\.0"):
        runner.train_block(0)
    assert issubclass(TrainingDivergedError, ConfigError)
    assert not (tmp_path / "work" / "block_000.safetensors").exists()


def test_absurd_lr_keeps_the_better_initial_state_and_says_so(tiny_llama, tmp_path, caplog):
    """With the far-worse check off, qparam_lr 1e6 makes every block worse; the engine warns,
    keeps the block as it came in (bit for bit) and reports `kept: init`."""
    quantize_linears(tiny_llama, SCHEME)
    init = copy.deepcopy(tiny_llama.state_dict())
    train, val = split_samples(_ids(12), 8, 4, seed=0)
    runner = _block_ap(tiny_llama, tmp_path, train, val, max_val_mse_ratio=None, epochs=1, qparam_lr=1e6)
    runner.capture()
    with caplog.at_level("WARNING", logger="quant.blockwise"):
        infos = [runner.train_block(i) for i in range(2)]
    for info in infos:
        assert info["val_loss_trained"] > info["val_loss_init"]  # training really made it worse
        assert info["kept"] == "init" and info["val_loss_final"] == info["val_loss_init"]
    assert all(torch.equal(v, init[k]) for k, v in tiny_llama.state_dict().items())
    assert sum("got worse in training" in r.getMessage() for r in caplog.records) == 2
    # a sane learning rate keeps the trained state
    quantize_linears(fresh := _fresh_model(), SCHEME)
    info = _block_ap(fresh, tmp_path / "sane", train, val, epochs=1).run().per_block[0]
    assert info["kept"] == "trained" and info["val_loss_final"] == info["val_loss_trained"] < info["val_loss_init"]


def _fresh_model():
    from conftest import make_tiny_llama

    return make_tiny_llama()


def test_diverging_block_stops_naming_block_and_step(tiny_llama, tmp_path):
    from quant.blockwise.engine import BlockDivergedError

    quantize_linears(tiny_llama, SCHEME)
    train, val = split_samples(_ids(12), 8, 4, seed=0)
    runner = _block_ap(tiny_llama, tmp_path, train, val, epochs=1, weight_lr=1e30, qparam_lr=1e30)
    with pytest.raises(BlockDivergedError, match=r"block 0 diverged: loss nan at step 1 \(epoch 0\)"):
        runner.run()
    work = tmp_path / "work"
    assert not (work / "state.json").exists() and not list(work.glob("block_*.safetensors"))
