"""KV-cache quantization: reference values, and what a generation-time cache really holds."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from quant.calibrate.rtn import quantize_linears
from quant.config.scheme import KVCacheSpec, QuantScheme, WeightSpec
from quant.modules.linear import QuantLinear
from quant.modules.runtime import apply_runtime_quantizers
from quant.numerics.formats import IntFormat
from tests.quant.modules.test_act_quant import ref_per_token

HEAD_DIM = 16  # tiny Llama: hidden 64, 4 heads, 2 KV heads


def ref_kv(x: torch.Tensor, spec: KVCacheSpec) -> torch.Tensor:
    """Reference KV quantization of a projection output [B, S, n_kv * head_dim]."""
    if spec.granularity == "per_token":
        return ref_per_token(x, spec.format.bits, spec.symmetric)
    heads = x.reshape(*x.shape[:-1], -1, HEAD_DIM)
    return ref_per_token(heads, spec.format.bits, spec.symmetric).reshape(x.shape)


def _scheme(spec: KVCacheSpec, weights: bool) -> QuantScheme:
    return QuantScheme(weight=WeightSpec(IntFormat(4), -1, True) if weights else None, kv_cache=spec)


def _record_inputs(model, layer: int):
    """Record every input of layer `layer`'s k_proj (before any quantizer)."""
    attn = model.model.layers[layer].self_attn
    seen = []
    handle = attn.k_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()), prepend=True)
    return attn, seen, handle


def _weight(lin):
    return lin.dequantized_weight().detach() if isinstance(lin, QuantLinear) else lin.weight.detach()


@pytest.mark.parametrize(
    "spec,weights",
    [
        (KVCacheSpec(IntFormat(4), "per_token", False), True),
        (KVCacheSpec(IntFormat(4), "per_head", True), False),
        (KVCacheSpec(IntFormat(8), "per_token", True), False),
    ],
)
def test_generation_cache_holds_quantized_keys_and_values(tiny_llama, spec, weights):
    model = tiny_llama
    scheme = _scheme(spec, weights)
    if weights:
        quantize_linears(model, scheme)
    assert apply_runtime_quantizers(model, scheme)["kv_quantized_projections"] == 4
    layer = 1
    attn, seen, handle = _record_inputs(model, layer)
    prompt = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    handle.remove()
    assert len(seen) == 6  # prefill + 5 decode steps: the cache grew over several calls
    cache = out.past_key_values.layers[layer]
    x = torch.cat(seen, dim=1)  # [B, S, hidden]: every token the cache holds
    b, s, _ = x.shape
    assert cache.keys.shape == (b, 2, s, HEAD_DIM)

    v_ref = ref_kv(F.linear(x, _weight(attn.v_proj)), spec).view(b, s, -1, HEAD_DIM).transpose(1, 2)
    torch.testing.assert_close(cache.values, v_ref, rtol=0, atol=1e-6)
    v_float = F.linear(x, _weight(attn.v_proj)).view(b, s, -1, HEAD_DIM).transpose(1, 2)
    assert (cache.values - v_float).abs().max() > 1e-3  # not the unquantized values

    # keys are quantized before RoPE (LLM-QAT): the cache holds RoPE(quantized k_proj output)
    k_q = ref_kv(F.linear(x, _weight(attn.k_proj)), spec).view(b, s, -1, HEAD_DIM).transpose(1, 2)
    pos = torch.arange(s).expand(b, s)
    cos, sin = model.model.rotary_emb(k_q, pos)
    _, k_ref = apply_rotary_pos_emb(k_q, k_q, cos, sin)
    torch.testing.assert_close(cache.keys, k_ref, rtol=1e-5, atol=1e-6)

    # every cached value row lies on its own grid: at most 2^bits levels per token (or head)
    levels = 2**spec.format.bits
    group = HEAD_DIM if spec.granularity == "per_head" else None
    rows = cache.values.transpose(1, 2).reshape(b * s, -1)
    for row in rows.reshape(-1, group) if group else rows:
        assert row.unique().numel() <= levels


def test_eval_path_equals_generation_path(tiny_llama):
    """Per-token KV quantization does not depend on other tokens, so a full forward
    (training / perplexity) and token-by-token decoding with the cache agree."""
    model = tiny_llama
    apply_runtime_quantizers(model, _scheme(KVCacheSpec(IntFormat(4)), weights=False))
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :4], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    for t in range(4, 10):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    # and the quantizer really changed the function
    apply_runtime_quantizers(model, QuantScheme(weight=None))
    assert (model(ids, use_cache=False).logits - full).abs().max() > 1e-4


def test_kv_bits_change_the_cache(tiny_llama):
    ids = torch.randint(3, 256, (1, 8))
    caches = {}
    for bits in (4, 8):
        apply_runtime_quantizers(tiny_llama, _scheme(KVCacheSpec(IntFormat(bits)), weights=False))
        caches[bits] = tiny_llama(ids, use_cache=True).past_key_values.layers[0].values
    apply_runtime_quantizers(tiny_llama, QuantScheme(weight=None))
    fp = tiny_llama(ids, use_cache=True).past_key_values.layers[0].values
    err4, err8 = ((caches[b] - fp).abs().mean() for b in (4, 8))
    assert err8 < err4 / 8  # ~16x finer grid


@pytest.mark.parametrize("weights", [True, False])
def test_loaded_checkpoint_gets_the_runtime_quantizers_back(tiny_llama, tmp_path, weights):
    """evaluate / generate load checkpoints with load_model: the A/KV quantizers must come back."""
    from quant.checkpoint import save_quantized
    from quant.config.scheme import ActivationSpec
    from quant.load import load_model
    from tests.quant.e2e.test_kd import save_teacher

    tok_dir = save_teacher(tiny_llama, tmp_path / "fp")  # any tokenizer will do
    _, tokenizer = load_model(tok_dir)
    scheme = QuantScheme(weight=WeightSpec(IntFormat(4), -1, True, True) if weights else None,
                         activation=ActivationSpec(IntFormat(8)), kv_cache=KVCacheSpec(IntFormat(4)))
    if weights:
        quantize_linears(tiny_llama, scheme)
    apply_runtime_quantizers(tiny_llama, scheme)
    ids = torch.randint(3, 256, (2, 12))
    ref = tiny_llama(ids).logits
    save_quantized(tiny_llama, tokenizer, scheme, tmp_path / "q")
    loaded, _ = load_model(tmp_path / "q")
    assert loaded.model.layers[0].self_attn.k_proj.output_quantizer is not None
    assert loaded.model.layers[0].mlp.down_proj.input_quantizer is not None
    assert torch.equal(loaded(ids).logits, ref)
