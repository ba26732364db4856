"""Mixture of experts: per-expert linears, checkpoints in transformers' layout, calibration
that reaches every expert (routed tokens when there are enough, every token of the block for
a starved expert), training with routing, and the engine's single copy of the experts."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from families import ids, make_tiny
from torch.nn import functional as F

import quant
from quant.calibrate.gptq import GPTQOptions, Hessian, gptq_quantize
from quant.checkpoint import load_quantized, save_quantized
from quant.config.scheme import QuantScheme
from quant.models.arch import decoder_layers, get_module, mapping_for
from quant.models.moe import Experts, fused_experts, prepare_model
from quant.modules.linear import QuantLinear

CALIB = ids(4, 32, seed=1)
TRAIN, VAL = ids(4, 32, seed=2), ids(2, 32, seed=3)
X = ids(2, 24, seed=4)
STARVED = 3


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def tiny(family="qwen3_moe", **kw):
    model = make_tiny(family, **kw)
    prepare_model(model)
    return model


def starve(model, expert: int = STARVED):
    """Every router of `model` never picks `expert` (its logit is -inf before the top-k)."""

    def forward(self, hidden_states):
        h = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(h, self.weight)
        probs = torch.softmax(logits.masked_fill(self._starved, float("-inf")), dim=-1, dtype=torch.float)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(logits.dtype), index

    for block in decoder_layers(model):
        router = get_module(block, mapping_for(model).moe.router)
        router._starved = F.one_hot(torch.tensor(expert), router.weight.shape[0]).bool()
        router.forward = types.MethodType(forward, router)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_per_expert_linears_compute_what_transformers_computes(family):
    fused = make_tiny(family)
    ref = _logits(fused)
    model = copy.deepcopy(fused)
    assert prepare_model(model) == 2 and prepare_model(model) == 0  # idempotent
    experts = get_module(decoder_layers(model)[0], "mlp.experts")
    assert isinstance(experts, Experts) and len(experts) == 4
    names = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}[family]
    assert all(hasattr(experts[0], n) for n in names)  # the checkpoint's own names
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-5)
    with fused_experts(model):
        assert type(get_module(decoder_layers(model)[0], "mlp.experts")).__name__.endswith("Experts")
        assert not isinstance(get_module(decoder_layers(model)[0], "mlp.experts"), Experts)
        torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-5)
    assert isinstance(get_module(decoder_layers(model)[0], "mlp.experts"), Experts)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_quantized_checkpoint_is_a_transformers_checkpoint(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = quant.quantize(tiny(family), "rtn:W4g32")
    tok = _tokenizer()
    save_quantized(model, tok, QuantScheme.parse("W4g32"), tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(loaded), _logits(model))  # QuantLinears restored by their expert names
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # any tool: the dequantized weights
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=1e-5)


def _tokenizer():
    from tests.quant.export.test_export_gguf import bpe_tokenizer

    return bpe_tokenizer()


def _moe_inputs(model, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the MoE input of `block` over CALIB [tokens, D], the experts each token is routed to [tokens, k])."""
    seen = {}

    def inputs(_m, args):
        seen.setdefault("x", args[0].reshape(-1, args[0].shape[-1]))

    def routes(_m, _args, out):
        seen.setdefault("k", out[2])

    mlp = get_module(decoder_layers(model)[block], "mlp")
    hooks = [mlp.register_forward_pre_hook(inputs), mlp.gate.register_forward_hook(routes)]
    _logits(model, CALIB)
    for h in hooks:
        h.remove()
    return seen["x"], seen["k"]


def _hessian(x: torch.Tensor) -> torch.Tensor:
    h = Hessian(x.shape[-1], x.device)
    h.add(x)
    return h.value()


def test_gptq_calibrates_routed_experts_on_their_tokens_and_starved_ones_on_all():
    fp = starve(tiny())
    recipe = quant.Recipe.parse("gptq:W4g32", options={"gptq": {"expert_min_tokens": 8, "batch_size": 4}})
    model, report = quant.quantize(copy.deepcopy(fp), recipe, calib_ids=CALIB)
    assert report.calibrate["experts_all_token_calibrated"] == 2  # expert 3 in both blocks
    x, routed = _moe_inputs(model)  # block 0's MoE input does not depend on its experts
    assert not (routed == STARVED).any()
    spec, opts = recipe.model_scheme.weight, GPTQOptions()
    for e, tokens in ((0, (routed == 0).any(-1)), (STARVED, torch.ones(len(x), dtype=torch.bool))):
        assert tokens.sum() >= 8
        name = f"mlp.experts.{e}.gate_proj"
        want = gptq_quantize(get_module(decoder_layers(fp)[0], name).weight, _hessian(x[tokens]), spec, opts)
        got, _, _ = get_module(decoder_layers(model)[0], name).integer_weight()
        assert torch.equal(got, want.codes), f"expert {e}'s GPTQ codes are not those of its Hessian"


@pytest.mark.parametrize("method", ["awq", "fp-search"])
def test_awq_and_fp_search_reach_the_starved_expert(method):
    scheme = "W4g32" if method == "awq" else None
    opts = {"expert_min_tokens": 8, "batch_size": 4}
    if method == "awq":
        r = quant.Recipe.parse("awq:W4g32", options={"awq": {**opts, "n_grid": 4, "clip_grid": 4}})
    else:
        r = quant.Recipe(QuantScheme.from_dict({"weight": {"format": "fp4-e2m1", "group_size": -1}}),
                         calibrate=({"fp-search": {**opts, "rounds": 1, "candidates": 4, "search_format": False}},))
    model, report = quant.quantize(starve(tiny()), r, calib_ids=CALIB)
    assert scheme is None or report.calibrate["quantized_linears"] == 2 * (4 + 3 * 4)
    assert report.calibrate["experts_all_token_calibrated"] == 2
    ql = get_module(decoder_layers(model)[0], f"mlp.experts.{STARVED}.down_proj")
    assert isinstance(ql, QuantLinear) and torch.isfinite(ql.dequantized_weight()).all()


def test_block_ap_trains_with_routing_and_leaves_an_unreached_expert_as_calibrated():
    model, _ = quant.quantize(starve(tiny()), "rtn:W4g32")
    before = {n: m.integer_weight()[0] for n, m in model.named_modules()
              if isinstance(m, QuantLinear) and f"experts.{STARVED}." in n}
    recipe = quant.Recipe.parse("rtn+block-ap:W4g32", options={"block-ap": {"epochs": 2, "batch_size": 2}})
    from quant.blockwise.engine import BlockwiseContext, reconstruct

    ctx = BlockwiseContext(torch.device("cpu"), _tmp() / "bw", 0, "fp", train_ids=TRAIN, val_ids=VAL,
                           scheme=recipe.model_scheme)
    result = reconstruct(model, recipe.blockwise, ctx)
    assert [b["experts_without_tokens"] for b in result.per_block] == [1, 1]
    for name, codes in before.items():  # no gradient reached it: its codes are the calibrated ones
        assert torch.equal(get_module(model, name).integer_weight()[0], codes)
    trained = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and "experts.0." in n]
    assert trained and any(b["kept"] == "trained" for b in result.per_block)


def _tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp())


def test_the_engine_keeps_one_copy_of_the_experts_and_its_targets_are_the_float_blocks():
    """For MoE blocks no full-precision workspace is built; the targets the workspace computes
    with its quantizers bypassed equal the float block's outputs (W4A8KV4: weight, activation
    and KV quantizers all bypassed)."""
    from quant.blockwise.block_ap import BlockAP, BlockAPOptions
    from quant.blockwise.engine import BlockwiseContext
    from quant.blockwise.passes import float_block, full_precision

    model, _ = quant.quantize(tiny(), "rtn:W4A8KV4")
    block = copy.deepcopy(decoder_layers(model)[0])
    x = torch.randn(2, 24, 64)
    kw = {"position_embeddings": model.model.rotary_emb(x, torch.arange(24)[None]), "attention_mask": None}
    with torch.no_grad():
        want = float_block(block)(x, **kw)
        with full_precision(block):
            got = block(x, **kw)
        quantized = block(x, **kw)
    assert torch.equal(got, want) and not torch.equal(quantized, want)
    ctx = BlockwiseContext(torch.device("cpu"), _tmp() / "bw", 0, "fp", train_ids=TRAIN, val_ids=VAL,
                           scheme=QuantScheme.parse("W4A8KV4"))
    engine = BlockAP(model, TRAIN, VAL, BlockAPOptions(epochs=1), ctx, 4)
    engine.run()
    assert engine.moe and engine.fp_workspace is None


def test_after_gptq_the_moe_workspace_targets_are_the_original_blocks(tmp_path):
    """GPTQ puts every expert linear on its grid and keeps the weight it started from as its
    reference weight (saved and loaded back by the experts' names); the MoE workspace, which
    computes its own targets with the quantizers bypassed, computes the original float block
    from them, and training starts at a loss above 0 (with GPTQ's own outputs as targets it
    was exactly 0)."""
    from quant.blockwise.block_ap import BlockAP, BlockAPOptions
    from quant.blockwise.engine import BlockwiseContext
    from quant.blockwise.passes import full_precision
    from quant.calibrate import calibrate
    from quant.modules.linear import quant_linears
    from quant.recipe import Step

    fp = tiny()
    model = copy.deepcopy(fp)
    scheme = QuantScheme.parse("W4g32")
    calibrate(model, scheme, [Step("gptq", {"batch_size": 4})], CALIB)
    experts = [m for n, m in quant_linears(model) if ".experts." in n]
    assert experts and all(m.reference_weight is not None for m in experts)
    block = decoder_layers(model)[0]
    x = torch.randn(2, 24, 64)
    kw = {"position_embeddings": model.model.rotary_emb(x, torch.arange(24)[None]), "attention_mask": None}
    with torch.no_grad():
        want = decoder_layers(fp)[0](x, **kw)
        assert not torch.equal(block(x, **kw), want)
        with full_precision(block):
            assert torch.equal(block(x, **kw), want)
    saved = {n: m.reference_weight for n, m in quant_linears(model)}
    save_quantized(model, _tokenizer(), scheme, tmp_path / "q")
    model, _ = load_quantized(tmp_path / "q", reference_weights=True)
    loaded = {n: m.reference_weight for n, m in quant_linears(model)}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[n], saved[n]) for n in saved)
    ctx = BlockwiseContext(torch.device("cpu"), tmp_path / "bw", 0, "fp", train_ids=TRAIN, val_ids=VAL,
                           scheme=scheme)
    engine = BlockAP(model, TRAIN, VAL, BlockAPOptions(epochs=1), ctx, 4)
    engine.capture()
    info = engine.train_block(0)
    assert engine.moe and engine.fp_workspace is None
    assert all(m.reference_weight is not None for _, m in quant_linears(engine.workspace))
    assert info["train_loss"][0] > 0 and info["val_loss_init"] > 0


def test_dense_and_moe_blocks_in_one_model():
    """Qwen3-MoE's mlp_only_layers: block 1 has a dense MLP; each block gets its own linears
    and the engine a workspace of each structure."""
    model = tiny(mlp_only_layers=[1])
    m = mapping_for(model)
    assert [m.is_moe_block(b) for b in decoder_layers(model)] == [True, False]
    model, report = quant.quantize(model, quant.Recipe.parse("rtn+block-ap:W4g32",
                                                             options={"block-ap": {"epochs": 1}}),
                                   train_ids=TRAIN, val_ids=VAL)
    assert report.calibrate["quantized_linears"] == (4 + 3 * 4) + 7
    assert len(report.blockwise.per_block) == 2
