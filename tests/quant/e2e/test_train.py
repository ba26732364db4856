"""The shared end-to-end trainer and the E2E-QP method on a tiny Llama (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from quant.calibrate.rtn import quantize_linears
from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.data import split_samples
from quant.e2e.trainer import E2EContext, TrainConfig, Trainer
from quant.methods import method
from quant.modules.linear import QuantLinear

SCHEME = QuantScheme.from_name("W2A16KV16", preset="efficientqat", group_size=32)


def _quantized(tiny_llama):
    quantize_linears(tiny_llama, SCHEME)
    return tiny_llama


def _data(n=12, length=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n, length), generator=g)


def _setup(model):
    entry = method("e2e-qp", "e2e")
    ctx = E2EContext(SCHEME, torch.device("cpu"), torch.float32)
    return entry.fn(model, entry.options.from_dict({"lr": 1e-2}), ctx)


def _cfg(**kw):
    base = {"epochs": 2, "batch_size": 2, "grad_accum": 2, "save_every": 1, "log_every": 1,
            "grad_checkpointing": True, "warmup_ratio": 0.25}
    return TrainConfig.from_dict({**base, **kw}, "e2e.train")


def _int_state(model):
    return {n: (m.integer_weight()[0].clone(), None if m.zero_point is None else m.zero_point.clone(),
                m.scale.detach().clone())
            for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_e2e_qp_trains_only_step_sizes(tiny_llama, tmp_path):
    model = _quantized(tiny_llama)
    before = _int_state(model)
    objective = _setup(model)
    assert all(m.frozen for m in model.modules() if isinstance(m, QuantLinear))
    after_freeze = _int_state(model)
    train, val = split_samples(_data(), 8, 4, seed=0)
    result = Trainer(model, objective, _cfg(), tmp_path, seed=0).fit({"input_ids": train}, {"input_ids": val})
    after = _int_state(model)
    for n, (q, zp, s) in before.items():
        assert torch.equal(after_freeze[n][0], q) and torch.equal(after_freeze[n][1], zp)
        assert torch.equal(after[n][0], q), f"{n}: integer weights changed"
        assert torch.equal(after[n][1], zp), f"{n}: zero points changed"
        assert not torch.equal(after[n][2], s), f"{n}: step sizes did not train"
    assert result.steps == 4
    assert result.val_loss_after < result.val_loss_before


class _Stop(Exception):
    pass


def test_trainer_resume_is_bitwise(tiny_llama, tmp_path):
    base = _quantized(tiny_llama)
    train = {"input_ids": _data(n=8)}

    ref = copy.deepcopy(base)
    Trainer(ref, _setup(ref), _cfg(), tmp_path / "a", seed=3, fingerprint="x").fit(train)

    def stop_at_3(step, _):
        if step == 3:
            raise _Stop

    killed = copy.deepcopy(base)
    with pytest.raises(_Stop):
        Trainer(killed, _setup(killed), _cfg(), tmp_path / "b", seed=3, fingerprint="x",
                log_fn=stop_at_3).fit(train)
    resumed = copy.deepcopy(base)
    trainer = Trainer(resumed, _setup(resumed), _cfg(), tmp_path / "b", seed=3, fingerprint="x")
    result = trainer.fit(train)
    assert result.resumed_from == 2 and result.steps == 4
    for (n, a), (_, b) in zip(ref.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_bad_train_params_fail_early():
    with pytest.raises(ConfigError, match="e2e.train.batch_size"):
        TrainConfig.from_dict({"batch_size": 0}, "e2e.train")
    entry = method("e2e-qp", "e2e")
    with pytest.raises(ConfigError, match="e2e.options.lr"):
        entry.options.from_dict({"lr": 0.0}, "e2e.options")
    with pytest.raises(ConfigError, match="val_samples"):
        split_samples(_data(n=4), 3, 2, seed=0)
    with pytest.raises(ConfigError, match=r"e2e.steps: 'nope' is not a known e2e method; known: \['e2e-qp', 'kd'\]"):
        method("nope", "e2e", "e2e.steps")


def _norm_objective(model, lr):
    """Train only the RMSNorm weights (all exactly 1.0 at init) with the causal-LM loss."""
    from quant.e2e.losses import causal_lm_loss
    from quant.e2e.trainer import Objective

    model.requires_grad_(False)
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    for p in norms:
        p.requires_grad_(True)

    def loss(m, batch):
        ce = causal_lm_loss(m, batch)
        return ce, {"ce": ce.detach()}

    return Objective([{"params": norms, "lr": lr, "name": "norm"}], loss)


def test_fp32_master_weights_keep_small_updates_of_a_bf16_model(tiny_llama, tmp_path):
    """At lr 2e-5 an AdamW step (~2e-5) is below half a bf16 rounding step of 1.0 (2^-9):
    a bf16 parameter would stay exactly 1.0; the fp32 master moves."""
    model = tiny_llama.to(torch.bfloat16)
    objective = _norm_objective(model, 2e-5)
    cfg = _cfg(epochs=1, grad_accum=1, warmup_ratio=0.0, save_every=0, grad_checkpointing=False,
               max_grad_norm=0.0)
    Trainer(model, objective, cfg, tmp_path, seed=0).fit({"input_ids": _data(n=4)})
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert all(p.dtype == torch.float32 for p in norms)  # the masters
    moved = torch.cat([(p.detach() - 1).abs().flatten() for p in norms])
    assert moved.max() > 1e-5 and moved.max() < 1e-3
    assert all(torch.equal(p.detach().bfloat16(), torch.ones_like(p, dtype=torch.bfloat16)) for p in norms)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # frozen: unchanged


def test_adam_betas_are_a_param(tiny_llama, tmp_path):
    model = _quantized(tiny_llama)
    trainer = Trainer(model, _setup(model), _cfg(adam_betas=[0.8, 0.99]), tmp_path)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    assert TrainConfig().adam_betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match=r"e2e\.train\.adam_betas=\[0\.9, 1\.0\] must be two numbers"):
        _cfg(adam_betas=[0.9, 1.0])


@pytest.mark.parametrize("log_every", [1, 3])
def test_diverging_training_stops_before_saving(tiny_llama, tmp_path, log_every):
    """lr 1e30 on the RMSNorm weights: step 1 is finite, step 2's attention overflows."""
    from quant.e2e.trainer import NonFiniteLossError

    objective = _norm_objective(tiny_llama, 1e30)
    cfg = _cfg(epochs=1, grad_accum=1, warmup_ratio=0.0, save_every=2, log_every=log_every,
               max_grad_norm=0.0, grad_checkpointing=False)
    with pytest.raises(NonFiniteLossError, match=r"^e2e: training diverged (at|by) step 2: "):
        Trainer(tiny_llama, objective, cfg, tmp_path, seed=0).fit({"input_ids": _data(n=8)})
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no pointer
