"""Architecture mapping, RTN over a model, quantized checkpoint save/load, perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import calibrate_step, make_tiny_llama
from quant.checkpoint import read_scheme, save_quantized
from quant.config import ConfigError
from quant.config.scheme import QuantScheme, WeightSpec
from quant.eval.ppl import perplexity
from quant.load import load_model
from quant.models.arch import iter_block_linears, mapping_for
from quant.modules.linear import QuantLinear
from quant.numerics.formats import IntFormat


def test_mapping_finds_every_decoder_linear(tiny_llama):
    m = mapping_for(tiny_llama)
    names = [n for n, *_ in iter_block_linears(tiny_llama, m)]
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj"
    assert all(isinstance(mod, nn.Linear) for *_, mod in iter_block_linears(tiny_llama, m))


def test_mapping_unknown_family():
    model = nn.Module()
    model.config = type("C", (), {"model_type": "gpt2"})()
    with pytest.raises(ValueError, match=r"model_type='gpt2' has no architecture mapping; known: \["):
        mapping_for(model)


def test_rtn_quantizes_decoder_linears_only(tiny_llama):
    scheme = QuantScheme(weight=WeightSpec(IntFormat(4), 32))
    calibrate_step(tiny_llama, scheme, "rtn")
    qls = [n for n, mod in tiny_llama.named_modules() if isinstance(mod, QuantLinear)]
    assert len(qls) == 14
    assert isinstance(tiny_llama.lm_head, nn.Linear) and not isinstance(tiny_llama.lm_head, QuantLinear)
    scheme = QuantScheme(weight=WeightSpec(IntFormat(4), 32), quantize_lm_head=True)
    model = make_tiny_llama()
    calibrate_step(model, scheme, "rtn")
    assert isinstance(model.lm_head, QuantLinear)


def test_rtn_rejects_bad_group_before_touching_the_model(tiny_llama):
    scheme = QuantScheme(weight=WeightSpec(IntFormat(4), 48))  # 48 does not divide 64
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide in_features=64"):
        calibrate_step(tiny_llama, scheme, "rtn")
    assert not any(isinstance(m, QuantLinear) for m in tiny_llama.modules())


def test_save_and_load_quantized_is_exact(tiny_llama, tmp_path, embedded_tokenizer):
    scheme = QuantScheme(weight=WeightSpec(IntFormat(3), 32))
    calibrate_step(tiny_llama, scheme, "rtn")
    x = torch.randint(0, 256, (2, 16))
    ref = tiny_llama(input_ids=x).logits
    save_quantized(tiny_llama, embedded_tokenizer, scheme, tmp_path / "q")
    assert read_scheme(tmp_path / "q") == scheme
    loaded, _ = load_model(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    assert torch.equal(loaded(input_ids=x).logits, ref)
    for (n1, a), (n2, b) in zip(
        ((n, m) for n, m in tiny_llama.named_modules() if isinstance(m, QuantLinear)),
        ((n, m) for n, m in loaded.named_modules() if isinstance(m, QuantLinear)),
        strict=True,
    ):
        assert n1 == n2
        qa, sa, za = a.integer_weight()
        qb, sb, zb = b.integer_weight()
        assert torch.equal(qa, qb) and torch.equal(sa, sb) and torch.equal(za, zb)


def test_perplexity_equals_exp_mean_nll(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (3 * 32 + 7,))  # a trailing partial window is dropped
    r = perplexity(tiny_llama, ids, seq_len=32, batch_size=2)
    nlls = []
    with torch.no_grad():
        for w in range(3):
            x = ids[w * 32 : (w + 1) * 32].unsqueeze(0)
            logits = tiny_llama(input_ids=x).logits[0]
            nlls.append(F.cross_entropy(logits[:-1], x[0, 1:], reduction="none"))
    mean = torch.cat(nlls).mean().item()
    assert r.tokens == 3 * 31 and r.windows == 3
    assert math.isclose(r.nll, mean, rel_tol=1e-5)
    assert math.isclose(r.ppl, math.exp(mean), rel_tol=1e-5)
    # batching does not change the answer
    r1 = perplexity(tiny_llama, ids, seq_len=32, batch_size=1)
    assert math.isclose(r1.ppl, r.ppl, rel_tol=1e-5)
    with pytest.raises(ValueError, match="shorter than one window"):
        perplexity(tiny_llama, ids[:10], seq_len=32)


def test_calibrate_keeps_the_source_precision_of_float_weights(tmp_path, monkeypatch, embedded_model_dir):
    """With base.dtype bfloat16 (the GPU default) calibrate used to store the float weights
    Block-AP trains and takes targets from in bf16; they stay in the source precision."""
    import yaml
    from safetensors import safe_open

    from tasks import calibrate
    from tasks.common import load_params

    root = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"]["dtype"] = "bfloat16"
    params["calibrate"].update(samples=2, seq_len=32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prep = tmp_path / "artifacts" / "prepare"
    (prep / "data").mkdir(parents=True)
    (prep / "model").symlink_to(embedded_model_dir)
    (prep / "data" / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    monkeypatch.chdir(tmp_path)
    calibrate.run(load_params())
    out = tmp_path / "artifacts" / "calibrate" / "model"
    with safe_open(str(out / "float_weights.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F32"}
