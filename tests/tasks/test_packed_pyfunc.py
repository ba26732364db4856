"""The registry's pyfunc of a packed checkpoint (tasks/packed_model.py) on the CPU: it
dequantizes each packed weight once at load, so generation does not unpack every weight on
every token, and it generates exactly what the per-forward path generates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_llama
from quant.calibrate.rtn import quantize_linears
from quant.config.scheme import QuantScheme, WeightSpec
from quant.export.base import export
from quant.export.half import to_half
from quant.modules.packed import PackedLinear
from quant.numerics.formats import IntFormat


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(200)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    model = make_tiny_llama()
    scheme = QuantScheme(weight=WeightSpec(IntFormat(4), 32, False))
    quantize_linears(model, scheme)
    to_half(model, torch.float16)
    out = tmp_path_factory.mktemp("packed") / "ct"
    export(model, _tokenizer(), scheme, "compressed-tensors", out)
    return out


def _load(packed_dir, monkeypatch, mode: str | None):
    from tasks.packed_model import DEQUANTIZE_ENV, PackedCausalLM

    if mode is None:
        monkeypatch.delenv(DEQUANTIZE_ENV, raising=False)
    else:
        monkeypatch.setenv(DEQUANTIZE_ENV, mode)
    lm = PackedCausalLM()
    lm.load_context(SimpleNamespace(artifacts={"model": str(packed_dir)}))
    return lm


def test_the_pyfunc_dequantizes_once_at_load_and_generates_the_same(packed_dir, monkeypatch):
    fast = _load(packed_dir, monkeypatch, None)  # the default
    layers = [m for m in fast.model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.cached_weight is not None for m in layers)
    assert torch.equal(layers[0].cached_weight, layers[0].dequantized_weight())
    slow = _load(packed_dir, monkeypatch, "per-forward")
    assert all(m.cached_weight is None for m in slow.model.modules() if isinstance(m, PackedLinear))
    prompts = ["w1 w2 w3", "w7"]
    assert fast.predict(None, prompts, {"max_new_tokens": 5}) == slow.predict(None, prompts, {"max_new_tokens": 5})
    with pytest.raises(ValueError, match=r"QUANT_PACKED_DEQUANTIZE='twice'; accepted: once, per-forward"):
        _load(packed_dir, monkeypatch, "twice")
