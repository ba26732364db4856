"""QuaRot: Hadamard matrices, function-preserving rotations, online rotations, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import StubTokenizer, calibrate_step, make_tiny_llama
from quant.calibrate.quarot import QuaRotOptions, rotate
from quant.checkpoint import save_quantized
from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.load import load_model
from quant.modules.runtime import apply_runtime_quantizers
from quant.numerics import hadamard as had
from quant.recipe import parse_steps

# Sizes with constructions, non-powers of two like SmolLM2's: hidden 96 = 12 x 8 with 6 heads
# (no Hadamard of order 6, as none of order 9 for SmolLM2), head_dim 16, MLP 192 = 12 x 16.
TINY = dict(hidden=96, intermediate=192, heads=6, kv_heads=2, layers=2, vocab=128)
PRESET = "efficientqat"  # asymmetric min-max weights g16/g64, asymmetric per-token A / KV
FP_TOL = 1e-4  # max |logit difference| after rotation, fp32 model, fp64 fusion
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def tiny(tied: bool = True, seed: int = 0) -> nn.Module:
    model = make_tiny_llama(**TINY, seed=seed)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():  # non-trivial norm scales, so that fusing them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def quarot(model, scheme, **opts):
    """QuaRot's rotation, then RTN on the rotated weights (the recipe quarot+rtn)."""
    return {**calibrate_step(model, scheme, "quarot", options=opts), **calibrate_step(model, scheme, "rtn")}


# -- Hadamard matrices ------------------------------------------------------


@pytest.mark.parametrize("n", [12, 16, 64, 96, 192, 576, 1536])
def test_hadamard_orthogonal(n):
    h = had.hadamard(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=h.dtype))
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(had.hadamard_transform(x, n), x @ h / n**0.5, rtol=0, atol=1e-12)
    q = had.random_hadamard(n, seed=3)
    torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=q.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,k", [(4096, 1), (11008, 172)])
def test_hadamard_llama2_sizes(n, k):
    """Llama-2-7B: 4096, 11008 = 172 x 64. The base matrix exactly Hadamard, the transform
    norm- and inner-product-preserving (a dense n^2 check is too slow for CPU CI)."""
    assert had.factor(n) == (k, n // k)
    b = had.base_matrix(k)
    assert torch.equal(b @ b.t(), k * torch.eye(k, dtype=b.dtype))
    x = torch.randn(16, n, dtype=torch.float64)
    y = had.hadamard_transform(x, n)
    torch.testing.assert_close(y @ y.t(), x @ x.t(), rtol=1e-10, atol=1e-9)
    assert (y - x).abs().max() > 0.1


def test_factors_and_seeds():
    assert had.factor(576) == (36, 16) and had.factor(1536) == (12, 128)
    assert torch.equal(had.random_hadamard(96, 1), had.random_hadamard(96, 1))
    assert not torch.equal(had.random_hadamard(96, 1), had.random_hadamard(96, 2))
    with pytest.raises(ConfigError, match="no Hadamard matrix construction for size 9"):
        had.hadamard(9)


# -- function preserved -----------------------------------------------------


@pytest.mark.parametrize("online", ["off", "on"])
def test_fp_function_unchanged(online):
    model = tiny()
    ref = logits(model)
    metrics = rotate(model, QuantScheme(weight=None), QuaRotOptions(norms="fuse", online=online, seed=5))
    assert metrics["untied_embeddings"] == 1.0
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=FP_TOL)
    # the residual stream really is rotated (not an identity transform)
    assert (model.model.embed_tokens.weight - tiny().model.embed_tokens.weight).abs().max() > 0.01
    if online == "on":
        assert model.model.layers[0].mlp.down_proj.input_rotation.size == 192
        assert model.model.layers[0].self_attn.o_proj.input_rotation.size == 96
        assert model.config._attn_implementation == "quarot_sdpa"


def test_generate_unchanged_with_kv_cache():
    model = tiny()
    ref = model.generate(IDS[:1, :8], max_new_tokens=12, do_sample=False)
    rotate(model, QuantScheme(weight=None), QuaRotOptions(online="on"))
    assert torch.equal(model.generate(IDS[:1, :8], max_new_tokens=12, do_sample=False), ref)


def test_online_rotation_is_needed():
    """Removing the online rotations after their transposes were fused breaks the function:
    the modules really act (and would be missed if save/load dropped them)."""
    model = tiny()
    ref = logits(model)
    rotate(model, QuantScheme(weight=None), QuaRotOptions(online="on"))
    from quant.modules.rotation import set_input_rotation

    set_input_rotation(model.model.layers[0].mlp.down_proj, None)
    assert (logits(model) - ref).abs().max() > 1e-2


def test_float_block_keeps_online_rotation():
    """Block-AP's full-precision target block must apply the online rotations too (and no
    activation or key quantizer)."""
    from quant.blockwise.passes import float_block

    model = tiny(tied=False)
    scheme = QuantScheme.from_name("W4A4KV4", preset=PRESET, group_size=16)
    rotated = copy.deepcopy(model)
    rotate(rotated, scheme, QuaRotOptions())
    quarot(model, scheme)
    apply_runtime_quantizers(model, scheme)  # the target must drop A/KV quantizers, keep rotations
    fp = float_block(model.model.layers[0])
    x = torch.randn(1, 10, 96)
    pos = torch.arange(10)[None]
    emb = rotated.model.rotary_emb(x, pos)
    with torch.no_grad():
        a = fp(x, position_embeddings=emb, attention_mask=None, position_ids=pos)
        b = rotated.model.layers[0](x, position_embeddings=emb, attention_mask=None, position_ids=pos)
    a, b = (t[0] if isinstance(t, tuple) else t for t in (a, b))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# -- quantization -----------------------------------------------------------


def test_key_quantizer_after_rotation():
    model = tiny()
    scheme = QuantScheme.from_name("W16A16KV4", preset=PRESET)
    quarot(model, scheme)
    apply_runtime_quantizers(model, scheme)
    attn = model.model.layers[0].self_attn
    assert getattr(attn.k_proj, "output_quantizer", None) is None  # not pre-RoPE any more
    assert attn.qk_rotation.key_quantizer is not None
    assert attn.v_proj.output_quantizer is not None
    q, k = torch.randn(1, 6, 5, 16), torch.randn(1, 2, 5, 16)
    _, kr = attn.qk_rotation(q, k)
    for t in range(5):  # every key token lies on a 4-bit grid of its own: <= 16 levels
        assert kr[0, :, t].unique().numel() <= 16
    # the quantized keys are the rotation of k, up to rounding
    rot = had.hadamard_transform(k.double(), 16).float()
    assert (kr - rot).abs().max() < 0.25 * rot.abs().max()


def _outlier_model(f: float = 50.0) -> nn.Module:
    """Outlier channels as trained LLMs have them, with the fp function unchanged: a norm
    channel f times larger with the reading linears' column divided by f (attention and MLP
    inputs), and an up_proj row times f with down_proj's column divided by f (down input)."""
    model = tiny(tied=False, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layer.input_layernorm.weight[7] *= f
            for p in (attn.q_proj, attn.k_proj, attn.v_proj):
                p.weight[:, 7] /= f
            layer.post_attention_layernorm.weight[11] *= f
            for p in (mlp.gate_proj, mlp.up_proj):
                p.weight[:, 11] /= f
            mlp.up_proj.weight[5] *= f
            mlp.down_proj.weight[:, 5] /= f
    return model


def _rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_w4a4kv4_error_much_lower_with_quarot():
    """Outliers in the norm scales (the readers' columns divided by the same factor):
    norms: fuse multiplies the scale into those columns, where it cancels, and the rotated
    residual has no outlier left. norms: online keeps the scale in the norm, so its output
    carries the 50x channel; the Hadamard spreads it into a +-50/sqrt(96) pattern on every
    channel, which a 4-bit per-token grid resolves poorly: better than RTN, far from fuse
    (the down_proj outlier is rotated online by both)."""
    fp = _outlier_model()
    ref = logits(fp)
    scheme = QuantScheme.from_name("W4A4KV4", preset=PRESET, group_size=16)
    plain = copy.deepcopy(fp)
    calibrate_step(plain, scheme, "rtn")
    apply_runtime_quantizers(plain, scheme)
    err = {"rtn": _rel_err(logits(plain), ref)}
    for norms in ("fuse", "online"):
        rot = copy.deepcopy(fp)
        quarot(rot, scheme, norms=norms)
        apply_runtime_quantizers(rot, scheme)
        err[norms] = _rel_err(logits(rot), ref)
    # measured: rtn 0.79, fuse 0.19, online 0.62
    assert err["fuse"] < 0.4 * err["rtn"] and err["online"] < 0.85 * err["rtn"], err
    assert err["fuse"] < 0.5 * err["online"], err


# -- save / load ------------------------------------------------------------


_Tok = StubTokenizer


def test_rotations_survive_save_load(tmp_path, monkeypatch):
    model = tiny()
    scheme = QuantScheme.from_name("W4A4KV4", preset=PRESET, group_size=16)
    quarot(model, scheme, norms="fuse", seed=11)
    apply_runtime_quantizers(model, scheme)
    before = logits(model)
    save_quantized(model, _Tok(), scheme, tmp_path / "m", extra={"method": "quarot"})
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.model.layers[1].mlp.down_proj.input_rotation.size == 192
    assert loaded.model.layers[1].self_attn.qk_rotation.key_quantizer is not None
    assert not loaded.config.tie_word_embeddings
    torch.testing.assert_close(logits(loaded), before, rtol=0, atol=1e-6)


# -- bad input --------------------------------------------------------------


class _LayerNormLike(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_rejects_non_rms_norm_before_changing_anything():
    """norms: fuse needs x / rms(x) * w to fuse w; norms: online leaves every norm alone."""
    model = tiny(tied=False)
    model.model.layers[1].post_attention_layernorm = _LayerNormLike(96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="layers.1.post_attention_layernorm.*RMSNorm"):
        quarot(model, QuantScheme(), norms="fuse")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ref = logits(model)
    rotate(model, QuantScheme(weight=None), QuaRotOptions(norms="online"))
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=FP_TOL)


def test_fuse_refuses_output_norms_and_online_runs():
    """Gemma 2's norms on the sub-block outputs: the residual rotation of norms: fuse cannot
    pass them (refused before any change, naming the option and the family); norms: online
    does not rotate the residual and keeps the function."""
    from families import make_tiny

    model = make_tiny("gemma2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scheme = QuantScheme.from_name("W4A8KV4", preset="llm-qat")
    with pytest.raises(ConfigError, match=r"quarot.norms=fuse cannot rotate model_type='gemma2'.*"
                                          r"default norms: online"):
        calibrate_step(model, scheme, "quarot", options={"norms": "fuse"})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = logits(model, ids)
    metrics = calibrate_step(model, scheme, "quarot")
    assert metrics["norm_output_rotations"] == 10 and metrics["residual_rotation"] == 0.0
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=FP_TOL)


def test_rejects_size_without_construction():
    model = make_tiny_llama(hidden=18, intermediate=32, heads=3, kv_heads=3, vocab=64)
    with pytest.raises(ConfigError, match="hidden_size.*size 18"):
        quarot(model, QuantScheme(weight=None))


def test_rejects_bad_options():
    with pytest.raises(ConfigError, match="online"):
        parse_steps([{"quarot": {"online": "sometimes"}}], "calibrate.steps")
    with pytest.raises(ConfigError, match="seeed"):
        parse_steps([{"quarot": {"seeed": 1}}], "calibrate.steps")


# -- the embedded model -----------------------------------------------------


@pytest.mark.slow  # ~20 s on an idle 2-core CPU, minutes on a loaded one
def test_embedded_smollm2_fp_unchanged(embedded_model_dir):
    """SmolLM2-135M (tied, 9 heads, 576 = 36 x 16, 1536 = 12 x 128), all rotations on."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    scheme = QuantScheme.from_name("W4A4KV4", preset=PRESET, group_size=64)
    rotate(model, scheme, QuaRotOptions(online="on"))
    out = logits(model, ids)
    assert (out - ref).abs().max() < 2e-3 * ref.abs().max()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_fold_rotations_for_plain_export(tmp_path):
    """register logs a plain transformers model: online rotations are folded into it."""
    from transformers import AutoModelForCausalLM

    from tasks.register import fold_saved_rotations

    model = tiny()
    scheme = QuantScheme.from_name("W4A16KV16", preset=PRESET, group_size=16)
    quarot(model, scheme, online="on")
    before = logits(model)
    save_quantized(model, _Tok(), scheme, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert (logits(plain) - before).abs().max() > 1e-2  # without its rotations: wrong
    assert fold_saved_rotations(plain, tmp_path / "m") == 14  # down, o; q, k, v, gate, up (norms: online)
    assert not any(hasattr(m, "input_rotation") and m.input_rotation is not None
                   for m in plain.modules())
    torch.testing.assert_close(logits(plain), before, rtol=0, atol=FP_TOL)
