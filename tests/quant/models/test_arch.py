"""The architecture mapping of every family against the model transformers builds, and the
controls that show the per-family tests can fail: a fold that ignores the norm kind, the
fused rows or the router changes the full-precision function."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from families import FAMILIES, MOE, ids, make_tiny
from torch import nn

from quant.calibrate.awq import apply_scales
from quant.config import ConfigError
from quant.models import arch
from quant.models.arch import decoder_layers, get_module, mapping_for, size_of
from quant.models.moe import Experts, prepare_model

X = ids(2, 24, seed=5)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X, use_cache=False).logits


@pytest.fixture(scope="module")
def models():
    out = {}
    for family in FAMILIES:
        model = make_tiny(family)
        prepare_model(model)
        out[family] = model
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_mapping_names_every_linear_of_every_block_once(family, models):
    model = models[family]
    m = mapping_for(model)
    assert m.family == family
    for block in decoder_layers(model):
        linears = {n for n, mod in block.named_modules() if isinstance(mod, nn.Linear)}
        assert set(m.linears(block)) == linears  # the router is no nn.Linear: never quantized
        assert len(m.linears(block)) == len(linears)
        flat = [p for stage in m.input_stages(block, model.config) for g in stage for p in g]
        assert sorted(flat) == sorted(linears)
        for f in m.fused:  # split sizes add up to the fused linear's rows
            rows = sum(size_of(model.config, s) for s in f.sizes)
            assert get_module(block, f.path).out_features == rows
        for path in (m.input_norm, m.mlp_norm, *m.output_norms, *m.qk_norms):
            assert hasattr(get_module(block, path), "weight")
        if family in MOE:
            assert isinstance(get_module(block, m.moe.experts), Experts)
            assert not isinstance(get_module(block, m.moe.router), nn.Linear)


def test_an_unsupported_model_type_names_itself_and_the_supported_list():
    with pytest.raises(ConfigError, match=r"model_type='gpt2' has no architecture mapping; known: "
                                          r"\['gemma2', 'gemma3_text', 'llama', 'mistral', 'mixtral'"):
        arch.mapping_for_type("gpt2")


def _random_fold(model, mapping=None):
    m = mapping or mapping_for(model)
    gen = torch.Generator().manual_seed(0)
    for block in decoder_layers(model):
        groups = [g for g in m.groups(block, model.config) if g.foldable(block)]
        scales = {g.prev: torch.rand(g.width(block), generator=gen) * 1.5 + 0.5 for g in groups}
        apply_scales(block, groups, scales, m.norm_kind)


@pytest.mark.parametrize("family,broken", [
    ("gemma2", {"norm_kind": "rms"}),  # w / s instead of (1 + w) / s - 1
    # the v / up rows looked for at the wrong end of qkv_proj / gate_up_proj
    ("phi3", {"fused": (arch.Fused("self_attn.qkv_proj", ("v", "k", "q"), ("kv", "kv", "q")),
                        arch.Fused("mlp.gate_up_proj", ("up", "gate"), ("ffn", "ffn")))}),
])
def test_a_fold_that_ignores_the_mapping_changes_the_function(family, broken, models):
    """(Without its `fused` entry Phi-3's v -> o and up -> down groups are not foldable, hence
    skipped: the wrong rows need a wrong entry.)"""
    model = copy.deepcopy(models[family])
    ref = _logits(model)
    good = copy.deepcopy(model)
    _random_fold(good)
    assert (_logits(good) - ref).abs().max() < 1e-4
    bad = copy.deepcopy(model)
    _random_fold(bad, dataclasses.replace(mapping_for(model), **broken))
    assert (_logits(bad) - ref).abs().max() > 1e-2


def test_a_fold_that_leaves_the_router_out_changes_the_routing(models):
    model = copy.deepcopy(models["qwen3_moe"])
    ref = _logits(model)
    m = mapping_for(model)
    no_router = dataclasses.replace(m, expert_groups=tuple(dataclasses.replace(g, readers=())
                                                           for g in m.expert_groups))
    _random_fold(model, no_router)
    assert (_logits(model) - ref).abs().max() > 1e-2


def test_norm_scale_reads_and_writes_through_the_kind(models):
    norm = get_module(decoder_layers(models["gemma3"])[0], "input_layernorm")
    w = norm.weight.detach().clone()
    torch.testing.assert_close(arch.norm_scale(norm, "rms_one_plus"), w + 1)
    arch.set_norm_scale(norm, torch.full_like(w, 2.0), "rms_one_plus")
    assert torch.equal(norm.weight, torch.ones_like(w))
    norm.weight.data.copy_(w)


def test_refusals_come_before_any_change(models, tmp_path):
    """KV-cache quantization of a fused qkv_proj and GGUF configs llama.cpp would run
    differently are refused with their reason; an MoE expert width the group size does not
    divide is refused from config.json alone."""
    import quant
    from quant.checkpoint import check_scheme_fits
    from quant.export.gguf_format import GGUFExporter

    phi3 = copy.deepcopy(models["phi3"])
    ref = _logits(phi3)
    with pytest.raises(ConfigError, match=r"model_type='phi3' computes keys and values in the fused "
                                          r"self_attn.qkv_proj; .* use scheme.kv_cache: null"):
        quant.quantize(phi3, "rtn:W4A8KV4")
    assert torch.equal(_logits(phi3), ref)
    gemma = make_tiny("gemma2", query_pre_attn_scalar=256)
    with pytest.raises(ConfigError, match=r"query_pre_attn_scalar=256 != head_dim=16: llama.cpp scales"):
        GGUFExporter().check_model(gemma, None)
    gemma3 = make_tiny("gemma3", layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match=r"llama.cpp fixes gemma3_text's pattern \(every 6th layer global\)"):
        GGUFExporter().check_model(gemma3, None)
    moe = make_tiny("qwen3_moe", moe_intermediate_size=48)
    moe.config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"group_size=32 does not divide .*experts' down_proj "
                                          r"\(moe_intermediate_size\)"):
        check_scheme_fits(tmp_path, quant.QuantScheme.parse("W4g32"))


def test_quarot_norm_fusion_honours_one_plus_w(models):
    """QuaRot's norm fusion alone (the step before the residual rotation Gemma refuses) keeps
    Gemma's function: the (1 + w) scale moves into the readers and the norms then scale by 1."""
    from quant.calibrate.quarot import fuse_norms, untie_embeddings

    model = copy.deepcopy(models["gemma3"])
    ref = _logits(model)
    m = mapping_for(model)
    untie_embeddings(model, m)
    fuse_norms(model, m, torch.float64)
    assert (_logits(model) - ref).abs().max() < 1e-4
    norm = get_module(decoder_layers(model)[0], m.input_norm)
    assert torch.equal(arch.norm_scale(norm, m.norm_kind), torch.ones(64))


@pytest.mark.parametrize("family", ["gemma2", "phi3", "qwen3_moe"])
@torch.no_grad()
def test_decoders_match_the_model_after_dropping_rows(family, models):
    """Synthesis' decoder (the fast one, or the model's own forward for Gemma / Phi-3) gives the
    model's logits at every step, also after rows are dropped mid-sequence."""
    from quant.synth.decode import KVDecoder, ModelDecoder, fast_path, make_decoder

    model = models[family]
    seen: list[torch.Tensor] = []

    def head(logits, pos):
        seen.append(logits.clone())
        return logits.argmax(-1)

    dec = make_decoder(model, 3, 12, head)
    assert isinstance(dec, KVDecoder if fast_path(model) else ModelDecoder)
    assert fast_path(model) == (family == "qwen3_moe")
    start = torch.tensor([5, 7, 9])
    dec.inp.copy_(start)
    tokens = [start]
    for t in range(10):
        if t == 4:  # drop row 1: the rest continue from their own cache rows
            dec.keep(torch.tensor([0, 2]))
            tokens = [x[[0, 2]] for x in tokens]
            seen[:] = [s[[0, 2]] for s in seen]
        dec.step()
        tokens.append(seen[-1].argmax(-1))
    seq = torch.stack(tokens, 1)  # [2, 11]
    full = model(input_ids=seq, use_cache=False).logits[:, :-1]
    torch.testing.assert_close(torch.stack(seen, 1), full, rtol=0, atol=1e-4)
