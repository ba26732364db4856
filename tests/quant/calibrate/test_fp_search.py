"""fp-search (LLM-FP4): pre-shift folding, search quality on a toy layer, the model-level
search with its cache, save/load of searched biases and formats, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.nn import functional as F

from conftest import calibrate_step, make_tiny_llama
from quant.calibrate import calibrate
from quant.calibrate.fp_search import FPSearchOptions, LayerSearch, _fold
from quant.checkpoint import save_quantized
from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.load import load_model
from quant.methods import names
from quant.modules.activation import CalibratedFPQuantizer
from quant.modules.linear import QuantLinear
from quant.modules.runtime import apply_runtime_quantizers
from quant.numerics import fp as FP
from quant.numerics.formats import FPFormat
from quant.recipe import Step

E2M1 = FPFormat(2, 1)
W4A4 = {"weight": {"format": "fp4-e2m1", "group_size": -1},
        "activation": {"format": "fp4-e2m1", "granularity": "per_tensor"}}
FAST = {"rounds": 1, "candidates": 8, "device": "cpu", "batch_size": 2, "search_format": False,
        "fold": "weight"}


@pytest.fixture
def tiny_tokenizer():
    """A word-level tokenizer (save_pretrained / AutoTokenizer round trip, no model needed)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   unk_token="[UNK]")


def outlier_layer(seed: int = 0, n: int = 512, d_in: int = 64, d_out: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    x[:, :4] *= 40  # a few outlier channels, as in LLM activations
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    return x, w


def test_pre_shift_fold_is_exact_in_full_precision():
    x, w = outlier_layer()
    x, w = x.float(), w.float()
    k = torch.randint(0, 4, (x.shape[1],)).float()
    # what runs: activations times 2^k (in the quantizer), weight columns times 2^-k (stored)
    assert torch.equal(F.linear(x * torch.exp2(k), _fold(w, k)), F.linear(x, w))
    # and the per-channel bias rho + k_c is the per-tensor bias rho on the shifted input
    rho = torch.tensor(0.375)  # dyadic, so rho + k is exact and the identity holds bit for bit
    for fmt in (E2M1, FPFormat(4, 3)):
        per_channel = FP.fake_quantize_fp(x, fmt, rho + k)
        assert torch.equal(per_channel, torch.exp2(-k) * FP.fake_quantize_fp(x * torch.exp2(k), fmt, rho))


def _minmax_mse(x, w, fmt_w, fmt_a):
    wq = FP.fake_quantize_grouped(w, fmt_w, FP.choose_bias(w, fmt_w, -1), -1)
    xq = FP.fake_quantize_grouped(x, fmt_a, FP.choose_bias(x, fmt_a, 0), 0)
    return ((xq @ wq.T - x @ w.T) ** 2).mean().item()


def test_search_beats_minmax_and_pre_shift_helps_outliers():
    x, w = outlier_layer()
    base = _minmax_mse(x, w, E2M1, E2M1)
    mse = {}
    for pre_shift in (False, True):
        opts = FPSearchOptions(rounds=2, candidates=40, pre_shift=pre_shift, search_format=False,
                               fold="weight")
        s = LayerSearch(w, x, x, E2M1, E2M1, opts)
        r = s.run()
        mse[pre_shift] = s.loss(r.w_fmt, r.a_fmt)
        assert (r.shift is not None) == pre_shift
    assert mse[False] < 0.8 * base
    assert mse[True] < 0.9 * mse[False]


def test_fold_after_weight_quantization_matches_per_channel_simulation():
    """fold: quantized computes Q_{rho+k}(x) @ Q_w(W)^T (the reference's simulated function)."""
    x, w = outlier_layer(2)
    opts = FPSearchOptions(rounds=1, candidates=20, search_format=False, fold="quantized")
    s = LayerSearch(w, x, x, E2M1, E2M1, opts)
    r = s.run()
    wq = FP.fake_quantize_fp(w, E2M1, r.w_bias)
    xq = FP.fake_quantize_fp(x, E2M1, r.rho + r.shift)
    ref = ((xq @ wq.T - x @ w.T) ** 2).mean().item()
    assert abs(s.loss(r.w_fmt, r.a_fmt) - ref) <= 1e-9 * ref
    assert s.loss(r.w_fmt, r.a_fmt) < _minmax_mse(x, w, E2M1, E2M1)


def test_format_search_picks_a_same_width_format():
    x, w = outlier_layer(1)
    s = LayerSearch(w, x, x, E2M1, E2M1, FPSearchOptions(rounds=1, candidates=20))
    r = s.run()
    assert r.w_fmt.bits == 4 and r.a_fmt.bits == 4
    losses = {f: s.loss(f, r.a_fmt) for f in E2M1.same_bits()}
    assert losses[r.w_fmt] == min(losses.values())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fp_search_model_save_load_and_cache(tmp_path, tiny_tokenizer):
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme.from_dict(W4A4, "scheme")
    opts = FPSearchOptions.from_dict({**FAST, "cache_dir": str(tmp_path / "cache")})
    m1 = copy.deepcopy(model)
    metrics = calibrate(m1, scheme, [Step("fp-search", opts)], ids).metrics
    assert metrics["searched_blocks"] == 2 and metrics["quantized_linears"] == 14
    apply_runtime_quantizers(m1, scheme)  # the searched quantizers stay
    q = m1.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and isinstance(q.input_quantizer, CalibratedFPQuantizer)
    assert q.input_quantizer.shift is not None and q.exp_bias.shape == (q.out_features, 1)
    ref = _logits(m1, ids)

    # a re-run with the same inputs reuses every block and gives the same model
    m2 = copy.deepcopy(model)
    again = calibrate(m2, scheme, [Step("fp-search", opts)], ids).metrics
    assert again["searched_blocks"] == 0 and again["cached_blocks"] == 2
    apply_runtime_quantizers(m2, scheme)
    assert torch.equal(_logits(m2, ids), ref)

    save_quantized(m1, tiny_tokenizer, scheme, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert len(meta["act_formats"]) == 14
    loaded, _ = load_model(tmp_path / "q")
    lq = loaded.model.layers[0].self_attn.q_proj
    assert lq.spec.format == q.spec.format and torch.equal(lq.exp_bias, q.exp_bias)
    assert torch.equal(lq.input_quantizer.shift, q.input_quantizer.shift)
    assert torch.equal(_logits(loaded, ids), ref)


def test_fold_quantized_round_trip(tmp_path, tiny_tokenizer):
    model = make_tiny_llama()
    scheme = QuantScheme.from_dict(W4A4, "scheme")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    calibrate_step(model, scheme, "fp-search", ids, {**FAST, "fold": "quantized"})
    ql = model.model.layers[0].mlp.up_proj
    assert torch.equal(ql.weight, w) and ql.input_quantizer.unshift  # weight stays unfolded
    save_quantized(model, tiny_tokenizer, scheme, tmp_path / "q")
    loaded, _ = load_model(tmp_path / "q")
    assert loaded.model.layers[0].mlp.up_proj.input_quantizer.unshift
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_searched_format_persists(tmp_path, tiny_tokenizer):
    model = make_tiny_llama()
    scheme = QuantScheme.from_dict(W4A4, "scheme")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    calibrate_step(model, scheme, "fp-search", ids, FAST)
    name = "model.layers.1.mlp.down_proj"
    ql = model.get_submodule(name)
    ql.spec = type(ql.spec)(FPFormat(3, 0), -1)  # as if the search had picked E3M0 here
    ql.input_quantizer.fmt = FPFormat(1, 2)
    save_quantized(model, tiny_tokenizer, scheme, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert meta["layer_formats"] == {name: "fp4-e3m0"} and meta["act_formats"][name] == "fp4-e1m2"
    loaded, _ = load_model(tmp_path / "q")
    assert loaded.get_submodule(name).spec.format == FPFormat(3, 0)
    assert loaded.get_submodule(name).input_quantizer.fmt == FPFormat(1, 2)
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("scheme, match", [
    ({"weight": {"format": "int4", "group_size": -1}}, r"scheme.weight.format='int4': .*fp4-e2m1"),
    ({"weight": {"format": "mxfp4", "group_size": 32}}, r"scheme.weight.format='mxfp4'.*use rtn"),
    ({"weight": {"format": "fp4-e2m1", "group_size": 32}}, r"scheme.weight.group_size=32.*use -1"),
    ({**W4A4, "activation": {"format": "fp4-e2m1"}},
     r"scheme.activation.granularity='per_token'.*use per_tensor"),
    ({**W4A4, "activation": {"format": "int8", "granularity": "per_tensor"}},
     r"scheme.activation.format='int8'"),
])
def test_bad_schemes_fail_before_work(scheme, match):
    model = make_tiny_llama()
    with pytest.raises(ConfigError, match=match):
        calibrate(model, QuantScheme.from_dict(scheme, "scheme"), [Step("fp-search")], None)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_bad_options():
    with pytest.raises(ConfigError, match=r"gamma_min=1.5, gamma_max=1.2: need 0 < gamma_min"):
        FPSearchOptions.from_dict({"gamma_min": 1.5}, "calibrate.options")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['calibrate.options.round'\]"):
        FPSearchOptions.from_dict({"round": 3}, "calibrate.options")
    assert "fp-search" in names("calibrate")
