"""Packed export (quant/export), the packed linear (quant/modules/packed.py) and their loaders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from quant.calibrate.rtn import quantize_linears
from quant.config import ConfigError
from quant.config.scheme import ActivationSpec, KVCacheSpec, QuantScheme, WeightSpec
from quant.export.base import CheckpointError, export
from quant.export.half import to_half
from quant.export.loader import load_packed
from quant.export.packing import pack, unpack
from quant.models.checkpoint import load_model, quant_linears
from quant.models.hub import MissingDependencyError
from quant.modules.packed import PackedLinear
from quant.numerics import grid as P
from quant.numerics.formats import IntFormat

BITS = (2, 3, 4, 8)


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(200)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def quantized(bits=4, group=32, symmetric=False, dtype=torch.float16, **scheme_kw):
    """A tiny Llama, RTN-quantized, frozen and converted to half precision."""
    model = make_tiny_llama()
    scheme = QuantScheme(weight=WeightSpec(IntFormat(bits), group, symmetric), **scheme_kw)
    quantize_linears(model, scheme)
    to_half(model, dtype)
    return model, scheme


def logits(model, dtype=torch.float32):
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model.to(dtype)(ids).logits


# ---------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_round_trip_is_bitwise(bits, dim):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (96, 64), generator=g)
    words = pack(codes, bits, dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == codes.shape[dim] * bits // 32
    assert torch.equal(unpack(words, bits, dim).long(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_compressed_tensors_and_gptq_bit_stream(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 1 << bits, (4, 64), generator=torch.Generator().manual_seed(0))
    ref = pack_to_int32((codes - (1 << (bits - 1))).to(torch.int8), bits)  # its signed convention
    assert torch.equal(pack(codes, bits, dim=1), ref)
    # the GPTQ stream, written out: element i at bits [i*b, (i+1)*b) of the row's words
    stream = sum(int(c) << (bits * i) for i, c in enumerate(codes[0].tolist()))
    words = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(64 * bits // 32)]
    assert [w & 0xFFFFFFFF for w in pack(codes, bits, dim=1)[0].tolist()] == words


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [-1, 32, 64])
@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_linear_dequantizes_the_quant_linear_codes_exactly(bits, group, symmetric):
    from quant.export.gptq import packed_from_quant_linear
    from quant.modules.linear import QuantLinear

    lin = torch.nn.Linear(128, 64, bias=False)
    ql = QuantLinear.from_linear(lin, WeightSpec(IntFormat(bits), group, symmetric))
    ql.freeze()
    with torch.no_grad():
        ql.scale.copy_(ql.scale.half().float())  # half-precision step sizes, as after to_half
    pl = packed_from_quant_linear(ql, symmetric, torch.float16)
    q, scale, zp = ql.integer_weight()
    codes = q + (1 << (bits - 1)) if zp is None else q
    assert torch.equal(pl.codes().long(), codes.long())
    assert torch.equal(pl.dequantized_weight(), ql.dequantized_weight().float())
    x = torch.randn(5, 128)
    assert torch.equal(pl(x), ql(x))
