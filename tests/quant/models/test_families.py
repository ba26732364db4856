"""Every family through every method and export format, on a tiny random model of each.

One test per (family, cell). A cell either runs and passes its checks, or is refused with a
ConfigError this file expects (`REFUSED`, matched by message). The outcomes make the support
table of docs/support.md: the last test renders it (docs/gen_support.py) and fails when the
committed table differs (UPDATE_SUPPORT_TABLE=1 rewrites it instead).

What each cell checks (stated tolerances are max |logit difference| in fp32):
- rtn: every block linear (every expert's) is a QuantLinear, the router is not, logits close;
- awq: folding random per-channel scales the AWQ way (norm scale or the fused rows of `prev`,
  next columns and the router's) leaves the fp logits unchanged (1e-4); then AWQ runs;
- gptq: runs, and its calibration-data error is at most RTN's;
- quarot: the rotation alone leaves the fp logits unchanged (1e-4, fp64 fusion, every online
  rotation on), with norms: online (the default) and, where the family allows it, norms: fuse;
  then quarot+rtn runs;
- fp-search: FP4 weights searched per layer;
- block-ap / tesseraq: train every block, end frozen on the grid, no block worse on validation;
- e2e-qp / kd: two optimizer steps, finite loss;
- synthesize: the decoder's greedy tokens are the model's own argmax;
- evaluate: perplexity of the exported model loaded back equals the fake-quant model's;
- export:<format>: export -> load gives the same logits (exactly on CPU; GGUF: in llama.cpp,
  within its activation rounding, 3% relative L2, as tests/quant/export/test_export_gguf.py states).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch
from families import FAMILIES, MOE, ids, make_tiny

import quant
from quant.config import ConfigError
from quant.models.arch import decoder_layers, get_module, iter_block_linears, mapping_for
from quant.models.moe import prepare_model
from quant.modules.linear import QuantLinear, quant_linears

CALIB = ids(4, 32, seed=1)
TRAIN, VAL = ids(4, 32, seed=2), ids(2, 32, seed=3)
EVAL = ids(2, 32, seed=4)
W4 = "W4g32"
SMALL = {
    "awq": {"n_grid": 4, "clip_grid": 4, "batch_size": 4},
    "gptq": {"batch_size": 4},
    "fp-search": {"rounds": 1, "candidates": 8, "search_format": False, "batch_size": 4},
    "block-ap": {"epochs": 1, "batch_size": 2},
    "tesseraq": {"thresholds": [0.5], "iterations": 2, "batch_size": 2},
}
CELLS = ("rtn", "awq", "gptq", "quarot", "fp-search", "block-ap", "tesseraq", "e2e-qp", "kd",
         "synthesize", "evaluate", "export:half", "export:compressed-tensors", "export:gptq", "export:gguf")
# (family, cell) -> the refusal this file expects (a regex of the ConfigError's message)
REFUSED = {
    ("mixtral", "export:gguf"): r"model_type='mixtral' cannot be exported to 'gguf': llama.cpp stores",
    ("qwen3_moe", "export:gguf"): r"model_type='qwen3_moe' cannot be exported to 'gguf': llama.cpp stores",
}
OUTCOMES: dict[str, dict[str, dict[str, str]]] = {}


# ---------------------------------------------------------------------------
# Models, shared within a family


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than two on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    from tests.quant.export.test_export_gguf import bpe_tokenizer

    return bpe_tokenizer()


_CACHE: dict[tuple[str, str], object] = {}


def fp_model(family: str):
    """The family's tiny model (a fresh copy; MoE experts as per-expert linears)."""
    if (family, "fp") not in _CACHE:
        model = make_tiny(family)
        prepare_model(model)
        _CACHE[(family, "fp")] = model
    return copy.deepcopy(_CACHE[(family, "fp")])


def rtn_model(family: str):
    """The family's model after RTN W4 g32 (a fresh copy): what training and exports start from."""
    if (family, "rtn") not in _CACHE:
        model, _ = quant.quantize(fp_model(family), f"rtn:{W4}")
        _CACHE[(family, "rtn")] = model
    return copy.deepcopy(_CACHE[(family, "rtn")])


def logits(model, x=EVAL) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def recipe(text: str) -> quant.Recipe:
    names = re.split(r"[+:]", text)[:-1]
    return quant.Recipe.parse(text, options={k: v for k, v in SMALL.items() if k in names})


# ---------------------------------------------------------------------------
# The cells


def run_rtn(family, tok):
    model = fp_model(family)
    ref = logits(model)
    model, report = quant.quantize(model, f"rtn:{W4}")
    names = [n for n, *_ in iter_block_linears(model)]
    assert report.calibrate["quantized_linears"] == len(names)
    assert all(isinstance(get_module(model, n), QuantLinear) for n in names)
    m = mapping_for(model)
    if family in MOE:  # every expert's linears quantized, the router never
        n_experts = model.config.num_local_experts if family == "mixtral" else model.config.num_experts
        assert len(names) == model.config.num_hidden_layers * (4 + 3 * n_experts)
        for block in decoder_layers(model):
            assert not any(isinstance(x, QuantLinear) for x in get_module(block, m.moe.router).modules())
    assert rel_err(logits(model), ref) < 0.5


@torch.no_grad()
def run_awq(family, tok):
    from quant.calibrate.awq import apply_scales

    model = fp_model(family)
    ref = logits(model)
    m, gen = mapping_for(model), torch.Generator().manual_seed(0)
    for block in decoder_layers(model):
        groups = [g for g in m.groups(block, model.config) if g.foldable(block)]
        scales = {g.prev: torch.rand(g.width(block), generator=gen) * 1.5 + 0.5 for g in groups}
        apply_scales(block, groups, scales, m.norm_kind)
    assert (logits(model) - ref).abs().max() < 1e-4, "AWQ's fold changed the full-precision function"
    model, report = quant.quantize(fp_model(family), recipe(f"awq:{W4}"), calib_ids=CALIB)
    assert report.calibrate["awq_scaled_groups"] > 0
    assert rel_err(logits(model), ref) < 0.5


def run_gptq(family, tok):
    ref = logits(fp_model(family), CALIB)
    rtn = rel_err(logits(rtn_model(family), CALIB), ref)
    model, report = quant.quantize(fp_model(family), recipe(f"gptq:{W4}"), calib_ids=CALIB)
    assert report.calibrate["quantized_linears"] == len(list(iter_block_linears(model)))
    assert rel_err(logits(model, CALIB), ref) <= rtn * 1.05


def run_quarot(family, tok):
    from conftest import calibrate_step

    for norms in ("online", "fuse"):
        model = fp_model(family)
        if norms == "fuse" and mapping_for(model).output_norms:  # refused (tests/quant/calibrate/test_quarot.py)
            continue
        ref = logits(model)
        calibrate_step(model, quant.QuantScheme.parse(W4), "quarot", options={"online": "on", "norms": norms})
        assert (logits(model) - ref).abs().max() < 1e-4, f"QuaRot (norms: {norms}) changed the fp function"
    model, _ = quant.quantize(fp_model(family), recipe(f"quarot+rtn:{W4}"))
    assert rel_err(logits(model), ref) < 0.5


def run_fp_search(family, tok):
    scheme = quant.QuantScheme.from_dict({"weight": {"format": "fp4-e2m1", "group_size": -1}})
    r = quant.Recipe(scheme, calibrate=({"fp-search": SMALL["fp-search"]},))
    model, report = quant.quantize(fp_model(family), r, calib_ids=CALIB)
    assert report.calibrate["searched_blocks"] == model.config.num_hidden_layers
    assert torch.isfinite(logits(model)).all()


def _trained(family, method):
    model, report = quant.quantize(rtn_model(family), recipe(f"rtn+{method}:{W4}"), train_ids=TRAIN,
                                   val_ids=VAL)
    assert all(ql.frozen for _, ql in quant_linears(model))
    for info in report.blockwise.per_block:
        assert info["val_loss_final"] <= info["val_loss_init"] + 1e-12
        if family in MOE:
            assert "experts_without_tokens" in info
    assert torch.isfinite(logits(model)).all()


def run_block_ap(family, tok):
    _trained(family, "block-ap")


def run_tesseraq(family, tok):
    _trained(family, "tesseraq")


def _e2e(family, method):
    teacher = fp_model(family) if method == "kd" else None
    model, report = quant.quantize(rtn_model(family), recipe(f"rtn+{method}:{W4}"), train_ids=TRAIN,
                                   val_ids=VAL, train=quant.TrainConfig(batch_size=2, max_steps=2),
                                   teacher=teacher)
    assert report.e2e.steps == 2
    assert torch.isfinite(logits(model)).all()


def run_e2e_qp(family, tok):
    _e2e(family, "e2e-qp")


def run_kd(family, tok):
    _e2e(family, "kd")


@torch.no_grad()
def run_synthesize(family, tok):
    from quant.synth.sampling import Item, SynthesisConfig, generate

    model = rtn_model(family)
    cfg = SynthesisConfig(seq_len=10, prefix_lengths=(10,), batch_size=2, on_eos="continue")
    out = generate(model, [Item(0, 5, 10), Item(1, 9, 10)], cfg, seed=0)
    seqs = torch.tensor([g.ids for g in out])  # fully greedy: every token is the model's argmax
    assert torch.equal(seqs[:, 1:], logits(model, seqs)[:, :-1].argmax(-1))


def _export(family, fmt, tok, tmp_path):
    model = rtn_model(family)
    r = quant.Recipe.parse(f"rtn:{W4}")
    quant.export_model(model, tok, r.model_scheme, fmt, tmp_path / fmt)
    return model


def run_export(fmt):
    def run(family, tok, tmp_path):
        model = _export(family, fmt, tok, tmp_path)
        loaded, _ = quant.load_model(tmp_path / fmt, torch.float16)
        assert torch.equal(logits(loaded), logits(model)), f"{fmt} round trip changed the logits"
    return run


def run_gguf(family, tok, tmp_path):
    model = _export(family, "gguf", tok, tmp_path)
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: the file is written but not run")
    from quant.export import llamacpp as lc

    seq = [1, *range(40, 80), *range(200, 240)]
    got = lc.logits(lc.load(tmp_path / "gguf" / "model.gguf", n_ctx=128), seq)
    want = logits(model.float(), torch.tensor([seq]))[0].numpy()
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) < 0.03
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def run_evaluate(family, tok, tmp_path):
    from quant.eval.ppl import perplexity

    model = _export(family, "compressed-tensors", tok, tmp_path)
    loaded, _ = quant.load_model(tmp_path / "compressed-tensors", torch.float16)
    stream = EVAL.flatten()
    with torch.no_grad():
        assert perplexity(loaded, stream, 32).ppl == perplexity(model, stream, 32).ppl


RUNNERS = {"rtn": run_rtn, "awq": run_awq, "gptq": run_gptq, "quarot": run_quarot,
           "fp-search": run_fp_search, "block-ap": run_block_ap, "tesseraq": run_tesseraq,
           "e2e-qp": run_e2e_qp, "kd": run_kd, "synthesize": run_synthesize, "evaluate": run_evaluate,
           "export:half": run_export("half"), "export:compressed-tensors": run_export("compressed-tensors"),
           "export:gptq": run_export("gptq"), "export:gguf": run_gguf}
NEEDS_TMP = {"evaluate", "export:half", "export:compressed-tensors", "export:gptq", "export:gguf"}


@pytest.mark.parametrize("family,cell", [(f, c) for f in FAMILIES for c in CELLS])
def test_family_cell(family, cell, tok, tmp_path):
    run = RUNNERS[cell]
    expected = REFUSED.get((family, cell))
    try:
        run(family, tok, tmp_path) if cell in NEEDS_TMP else run(family, tok)
    except ConfigError as exc:
        if expected is None or not re.search(expected, str(exc)):
            raise
        OUTCOMES.setdefault(family, {})[cell] = {"outcome": "refused", "detail": _short(str(exc))}
        return
    assert expected is None, f"{family} / {cell} ran, but this file expects it refused: update REFUSED"
    OUTCOMES.setdefault(family, {})[cell] = {"outcome": "yes", "detail": ""}


def _short(message: str) -> str:
    """A refusal as a footnote: its first sentence, without the model_type it names."""
    first = message.split("; ")[0].split(". ")[0]
    return re.sub(r"model_type='[^']*'", "this family", first)


def test_support_table_matches_the_tests():
    """docs/support.md's table is the one these tests produce (docs/gen_support.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "docs"))
    import gen_support

    complete = all(c in OUTCOMES.get(f, {}) for f in FAMILIES for c in CELLS)
    if not complete:
        pytest.skip("not every (family, cell) ran in this session (a -k selection or a failure)")
    outcomes = {f: {c: OUTCOMES[f][c] for c in CELLS} for f in FAMILIES}
    if os.environ.get("UPDATE_SUPPORT_TABLE") == "1":
        gen_support.write(outcomes)
    committed = gen_support.table_in(gen_support.SUPPORT_MD.read_text())
    assert committed == gen_support.render(outcomes), (
        "docs/support.md's table differs from what the tests produce; run docs/gen_support.py")
    assert json.loads(gen_support.RESULTS.read_text()) == gen_support.record(outcomes)
