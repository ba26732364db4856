"""TesseraQ on a tiny Llama (CPU): the hardening follows the schedule, the result lies exactly
on the integer grid with the tuned scales, PAR beats the RTN init on held-out samples, a run
interrupted inside a block resumes bitwise, and bad options fail before any block is touched.

The tests use a short schedule and lr 1e-2 (published: 20 steps x 250 iterations at 1e-3) so
that a few dozen iterations move the rounding variables on a 64-wide model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from conftest import make_tiny_llama
from quant.blockwise.engine import BlockwiseContext
from quant.blockwise.tesseraq import RoundingLinear, TesseraQ, TesseraQOptions, TesseraQStep
from quant.calibrate.rtn import quantize_linears
from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.methods import method
from quant.models.arch import decoder_layers, get_module
from quant.modules.linear import QuantLinear
from quant.numerics import grid as P
from quant.numerics.rounding import rectified_sigmoid

SCHEME = QuantScheme.from_name("W2A16KV16", preset="efficientqat", group_size=32)
OPTIONS = {"thresholds": [0.6, 0.3, 0.1], "iterations": 12, "lr": 1e-2, "scale_lr": 1e-2}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _ids(n: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _options(**kw) -> TesseraQOptions:
    return method("tesseraq", "blockwise").options.from_dict({**OPTIONS, **kw}, "block_ap.options")


def _runner(model, work, train, val, **kw) -> TesseraQ:
    ctx = BlockwiseContext(torch.device("cpu"), work, seed=0, fingerprint="tq")
    return TesseraQ(model, train, val, _options(**kw), ctx)


def _model():
    model = make_tiny_llama()
    quantize_linears(model, SCHEME)
    return model


def test_rectified_sigmoid_and_hardening_follow_the_schedule():
    torch.manual_seed(0)
    ql = QuantLinear.from_linear(torch.nn.Linear(64, 48), SCHEME.weight)
    layer = RoundingLinear(ql, tune_scale=True)
    layer.load(ql, "init")
    w, s, z = ql.weight.detach(), ql.scale.detach(), ql.zero_point.detach()
    frac = (w.view(48, 2, 32) / s[..., None]) - torch.floor(w.view(48, 2, 32) / s[..., None])
    torch.testing.assert_close(rectified_sigmoid(layer.alpha), frac, atol=1e-6, rtol=0)  # h(alpha) = frac
    n, before = layer.alpha.numel(), torch.zeros(48, 2, 32, dtype=torch.bool)
    for t in (PUBLISHED := (0.8, 0.65, 0.5, 0.43, 0.38, 0.34, 0.3, 0.27, 0.24, 0.21, 0.18, 0.15, 0.12,
                            0.10, 0.08, 0.06, 0.04, 0.02, 0.01, 0.005)):
        with torch.no_grad():  # perturb the soft ones, as training would
            layer.alpha.add_(torch.randn_like(layer.alpha) * 0.3 * ~layer.hardened())
        h_before = rectified_sigmoid(layer.alpha).detach().clone()
        layer.harden(t)
        hard = layer.hardened()
        assert int(hard.sum()) == n - round(t * n), t  # exactly 1 - t of this layer is hard
        assert bool((hard | ~before).all())  # hardened stays hardened
        new = hard & ~before
        score = (h_before - 0.5).abs()
        if new.any() and (~hard).any():
            assert score[new].min() >= score[~hard].max()  # the farthest from 0.5 go first
        h = rectified_sigmoid(layer.alpha).detach()
        assert torch.equal(h[new], (h_before[new] > 0.5).float())  # towards their nearer end
        before = hard
    assert TesseraQOptions().thresholds == PUBLISHED
    layer.harden(0.0)
    assert bool(layer.hardened().all())
    assert set(rectified_sigmoid(layer.alpha).unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(layer.zero_point, z)


def test_after_the_last_step_everything_is_hard_and_on_the_grid(tmp_path):
    model = _model()
    init = {n: (m.weight.detach().clone(), m.scale.detach().clone(), m.zero_point.detach().clone())
            for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    train, val = _ids(16), _ids(4, seed=1)
    runner = _runner(model, tmp_path / "w", train, val)
    runner.capture()
    for i, layer in enumerate(decoder_layers(model)):
        info = runner.train_block(i)
        assert info["kept"] == "trained" and info["hardened_final"] == 1.0
        assert [s["threshold"] for s in info["steps"]] == OPTIONS["thresholds"]
        soft = runner.method.soft
        for name, ql in layer.named_modules():
            if not isinstance(ql, QuantLinear):
                continue
            rl = get_module(soft, name)
            h = rectified_sigmoid(rl.alpha).detach()
            assert bool(rl.hardened().all()) and bool(((h == 0) | (h == 1)).all()), name
            w0, s0, z0 = init[f"model.layers.{i}.{name}"]
            # independent float64 reference of the codes: floor(W/s) + decision + z, clamped
            up = (rl.alpha > 0).double()
            q_ref = (torch.floor(w0.double().view(w0.shape[0], -1, 32) / s0.double()[..., None]) + up
                     + z0.double()[..., None]).clamp(0, 3).view_as(w0)
            s_tuned = s0 * (2 * torch.sigmoid(rl.v.detach()))
            assert torch.equal(ql.scale.detach(), s_tuned) and torch.equal(ql.zero_point.detach(), z0)
            q = P.quantize(ql.weight.detach(), ql.scale.detach(), ql.zero_point.detach(), SCHEME.weight.format, 32)
            assert torch.equal(q.double(), q_ref), name
            deq = P.dequantize(q, ql.scale.detach(), ql.zero_point.detach(), SCHEME.weight.format, 32)
            assert torch.equal(ql.weight.detach(), deq), name  # the weight is its own grid point
            assert torch.equal(ql.dequantized_weight().detach(), deq)
            # the soft layer (all hard) computes the same weight as the baked QuantLinear
            assert torch.equal(rl.weight().detach(), deq)
    ids = _ids(2, seed=9)
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    runner.finish()
    assert all(m.frozen for m in model.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fake)


@torch.no_grad()
def _block_mse(model, fp_model, ids) -> list[float]:
    seen = []
    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"], kwargs)),
        with_kwargs=True) for layer in decoder_layers(fp_model)]
    fp_model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    out = []
    for (x, kwargs), fp_layer, q_layer in zip(seen, decoder_layers(fp_model), decoder_layers(model), strict=True):
        target, got = fp_layer(x, **kwargs), q_layer(x, **kwargs)
        target, got = (t[0] if isinstance(t, tuple) else t for t in (target, got))
        out.append(F.mse_loss(got, target).item())
    return out


def test_par_beats_the_rtn_init_on_held_out_samples(tmp_path):
    fp = make_tiny_llama()
    model = _model()
    rtn = copy.deepcopy(model)
    _runner(model, tmp_path / "w", _ids(32), _ids(8, seed=1), iterations=40).run()
    held_out = _ids(8, seed=123)
    for i, (m_rtn, m_tq) in enumerate(zip(_block_mse(rtn, fp, held_out), _block_mse(model, fp, held_out),
                                          strict=True)):
        assert m_tq < 0.9 * m_rtn, f"block {i}: TesseraQ {m_tq:.3g} vs RTN {m_rtn:.3g}"


def test_resume_inside_a_block_is_bitwise_identical(tmp_path, monkeypatch):
    train, val = _ids(16), _ids(4, seed=1)
    ref = _model()
    _runner(ref, tmp_path / "ref", train, val).run()

    real = TesseraQStep._train_step
    calls: list[tuple[int, int]] = []

    def killed_at_block1_step2(self, data, block, k):
        if (block, k) == (1, 2):
            raise KeyboardInterrupt("killed")
        return real(self, data, block, k)

    monkeypatch.setattr(TesseraQStep, "_train_step", killed_at_block1_step2)
    with pytest.raises(KeyboardInterrupt):
        _runner(_model(), tmp_path / "work", train, val).run()
    assert (tmp_path / "work" / "block_001.partial.safetensors").exists()

    def counted(self, data, block, k):
        calls.append((block, k))
        return real(self, data, block, k)

    monkeypatch.setattr(TesseraQStep, "_train_step", counted)
    resumed = _model()
    result = _runner(resumed, tmp_path / "work", train, val).run()
    assert result.resumed_at == 1 and calls == [(1, 2)]  # only the missing step of block 1 ran
    assert not (tmp_path / "work" / "block_001.partial.safetensors").exists()
    a, b = ref.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("options", "match"), [
    ({"thresholds": [0.5, 0.6]}, r"block_ap\.options\.thresholds=\[0\.5, 0\.6\].*strictly decreasing"),
    ({"thresholds": [0.5, 0.5]}, r"block_ap\.options\.thresholds"),
    ({"thresholds": [1.0, 0.5]}, r"block_ap\.options\.thresholds.*in \(0, 1\)"),
    ({"thresholds": [0.5, 0.0]}, r"block_ap\.options\.thresholds"),
    ({"thresholds": []}, r"block_ap\.options\.thresholds"),
    ({"iterations": 0}, r"block_ap\.options\.iterations=0 must be >= 1"),
    ({"lr": 0.0}, r"block_ap\.options\.lr=0\.0 must be a positive learning rate"),
    ({"scale_lr": -1e-3}, r"block_ap\.options\.scale_lr"),
    ({"qparams": "awq"}, r"block_ap\.options\.qparams"),
    ({"threshold": [0.5]}, r"unknown key.*block_ap\.options\.threshold"),
])
def test_bad_options_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        method("tesseraq", "blockwise").options.from_dict({**OPTIONS, **options}, "block_ap.options")


def test_bad_inputs_fail_before_any_block_is_touched(tmp_path):
    dyn = make_tiny_llama()
    quantize_linears(dyn, QuantScheme.from_dict({"weight": {"format": "int4", "group_size": 32,
                                                            "dynamic_minmax": True}}))
    with pytest.raises(ConfigError, match=r"dynamic_minmax"):
        _runner(dyn, tmp_path / "a", _ids(8), _ids(2))
    with pytest.raises(ConfigError, match=r"block_ap\.steps\[0\]\.tesseraq\.batch_size=4 is larger than the 2"):
        _runner(_model(), tmp_path / "b", _ids(2), _ids(2), batch_size=4)
    bad = _model()
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.scale[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"qparams='init'.*layers\.1\.mlp\.down_proj"):
        _runner(bad, tmp_path / "c", _ids(8), _ids(2))
    assert not any((tmp_path / d).exists() for d in "abc")
