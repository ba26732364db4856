"""Packed export (quant/export), the packed linear (quant/modules/packed.py) and their loaders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from quant.calibrate.rtn import quantize_linears
from quant.config import ConfigError, MissingDependencyError
from quant.config.scheme import ActivationSpec, KVCacheSpec, QuantScheme, WeightSpec
from quant.export.base import CheckpointError, export
from quant.export.half import to_half
from quant.export.loader import load_packed
from quant.load import load_model
from quant.modules.linear import quant_linears
from quant.modules.packed import PackedLinear
from quant.numerics.formats import IntFormat
from quant.numerics.packing import pack, unpack

BITS = tuple(range(2, 9))  # every integer width; GPTQ itself takes 2/3/4/8


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
    pl = packed_from_quant_linear(ql, torch.float16)
    q, scale, zp = ql.integer_weight()
    codes = q + (1 << (bits - 1)) if zp is None else q
    assert torch.equal(pl.codes().long(), codes.long())
    assert torch.equal(pl.dequantized_weight(), ql.dequantized_weight().float())
    x = torch.randn(5, 128)
    assert torch.equal(pl(x), ql(x))


# ---------------------------------------------------------------------------
# Half precision


def test_to_half_keeps_every_integer_code_and_halves_the_floats():
    model = make_tiny_llama()
    scheme = QuantScheme(weight=WeightSpec(IntFormat(3), 32))
    quantize_linears(model, scheme)
    before = {n: ql.integer_weight()[0].clone() for n, ql in quant_linears(model)}
    sizes = to_half(model, torch.bfloat16)
    assert sizes["bytes_after"] < 0.6 * sizes["bytes_before"]
    for n, ql in quant_linears(model):
        assert ql.frozen and ql.scale.dtype == torch.bfloat16
        assert torch.equal(ql.integer_weight()[0], before[n])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ---------------------------------------------------------------------------
# Formats: write, load back, same logits


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("bits,group,symmetric", [(2, 32, False), (3, 64, False), (4, -1, True),
                                                  (8, 32, False), (4, 32, True)])
def test_packed_model_logits_equal_the_fake_quant_model(fmt, bits, group, symmetric, tmp_path):
    model, scheme = quantized(bits, group, symmetric)
    export(model, tiny_tokenizer(), scheme, fmt, tmp_path / "out")
    packed, _ = load_packed(tmp_path / "out", torch.float32)
    n_packed = sum(isinstance(m, PackedLinear) for m in packed.modules())
    assert n_packed == 14
    assert torch.equal(logits(packed), logits(model))


def test_gptq_checkpoint_layout(tmp_path):
    model, scheme = quantized(2, 32, False)
    export(model, tiny_tokenizer(), scheme, "gptq", tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["bits"] == 2 and qc["group_size"] == 32
    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # 128 -> 64
    assert t[f"{name}.qweight"].shape == (128 * 2 // 32, 64) and t[f"{name}.qweight"].dtype == torch.int32
    assert t[f"{name}.qzeros"].shape == (4, 64 * 2 // 32)
    assert t[f"{name}.scales"].shape == (4, 64) and t[f"{name}.scales"].dtype == torch.float16
    assert torch.equal(t[f"{name}.g_idx"], torch.arange(128, dtype=torch.int32) // 32)
    # v2: the stored zero points are the exact ones (v1 would store z - 1; z = 0 occurs at 2 bits)
    ql = dict(quant_linears(model))[name]
    zp = unpack(t[f"{name}.qzeros"], 2, dim=1).t().float()
    assert torch.equal(zp, ql.zero_point.float())


def test_compressed_tensors_uses_the_signed_convention(tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model, scheme = quantized(4, 32, False)
    export(model, tiny_tokenizer(), scheme, "compressed-tensors", tmp_path / "out")
    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj"
    ql = dict(quant_linears(model))[name]
    q, _, zp = ql.integer_weight()
    signed = unpack_from_int32(t[f"{name}.weight_packed"], 4, torch.Size([64, 64]))
    assert torch.equal(signed.long(), q.long() - 8)
    zs = unpack_from_int32(t[f"{name}.weight_zero_point"], 4, torch.Size([64, 2]), packed_dim=0)
    assert torch.equal(zs.float(), zp.float() - 8)
    assert t[f"{name}.weight_scale"].dtype == torch.float16
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]


def test_compressed_tensors_symmetric_loads_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, scheme = quantized(4, 32, True)
    export(model, tiny_tokenizer(), scheme, "compressed-tensors", tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(logits(hf), logits(model))


def test_compressed_tensors_asymmetric_decompresses_through_the_library(tmp_path):
    """transformers 5.23 + compressed-tensors 0.20 cannot load asymmetric pack-quantized on CPU
    (its meta-device compression leaves weight_zero_point unpacked, a shape mismatch); the
    package's own ModelCompressor decompresses the checkpoint to the same logits."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM

    model, scheme = quantized(3, 32, False)
    out = tmp_path / "out"
    export(model, tiny_tokenizer(), scheme, "compressed-tensors", out)
    config = AutoConfig.from_pretrained(out)
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    del config.quantization_config
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_quantization_config(hf, qc)
    compressor = ModelCompressor(quantization_config=qc)
    compressor.compress_model(hf)
    hf.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    compressor.decompress_model(hf)
    assert torch.equal(logits(hf), logits(model))


# ---------------------------------------------------------------------------
# Footprint


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_w4_g64_export_has_the_expected_size_on_disk(fmt, tmp_path):
    model, scheme = quantized(4, 64, False)
    fp = export(model, tiny_tokenizer(), scheme, fmt, tmp_path / "out")
    layers = dict(quant_linears(model))
    expected = 0
    for ql in layers.values():
        k, n = ql.in_features, ql.out_features
        g = k // 64
        expected += k * n // 2 + g * n * 2 + g * n // 2  # codes, fp16 scales, 4-bit zero points
        expected += k * 4 if fmt == "gptq" else 2 * 8  # g_idx int32 / weight_shape int64[2]
    assert fp.quantized_bytes == expected
    assert fp.bits_per_weight == pytest.approx(8 * expected / fp.quantized_weights)
    other = sum(p.numel() * 2 for n, p in model.named_parameters() if ".layers." not in n or "norm" in n)
    files = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert expected + other <= files <= expected + other + 16_384  # + the safetensors header
    assert fp.bytes >= files


# ---------------------------------------------------------------------------
# Bad input


def test_runtime_quant_schemes_are_refused_for_packed_formats(tmp_path):
    for field, spec in (("activation", ActivationSpec(IntFormat(8))), ("kv_cache", KVCacheSpec(IntFormat(4)))):
        model, scheme = quantized(4, 32, False, **{field: spec})
        for fmt in ("gptq", "compressed-tensors"):
            with pytest.raises(ConfigError, match=rf"scheme\.{field}=.*cannot be exported to '{fmt}'"):
                export(model, tiny_tokenizer(), scheme, fmt, tmp_path / "out")
            assert not (tmp_path / "out").exists()
        export(model, tiny_tokenizer(), scheme, "half", tmp_path / f"half-{field}")  # its own format keeps it


def test_non_integer_weight_formats_are_refused(tmp_path):
    from dataclasses import dataclass

    from quant.numerics.formats import NumberFormat

    @dataclass(frozen=True)
    class FP4(NumberFormat):
        bits: int = 4

        def spec(self) -> str:
            return "fp4_e2m1"

    model, _ = quantized(4, 32, False)
    scheme = QuantScheme(weight=WeightSpec(FP4(), 32))
    with pytest.raises(ConfigError, match=r"scheme\.weight\.format='fp4_e2m1' cannot be exported to 'gptq'"):
        export(model, tiny_tokenizer(), scheme, "gptq", tmp_path / "out")


def test_group_size_the_format_refuses(tmp_path):
    model = make_tiny_llama(hidden=96, intermediate=192, heads=4, kv_heads=2)
    scheme = QuantScheme(weight=WeightSpec(IntFormat(4), 48))
    quantize_linears(model, scheme)
    to_half(model, torch.float16)
    with pytest.raises(ConfigError, match=r"scheme\.weight\.group_size=48 cannot be exported to 'gptq'; "
                                          r"accepted: \[-1, 16, 32"):
        export(model, tiny_tokenizer(), scheme, "gptq", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bit_widths_each_format_holds(tmp_path):
    """compressed-tensors packs every width of this project (2..8); GPTQ names 2/3/4/8 only."""
    model, scheme = quantized(5, 32, False)
    with pytest.raises(ConfigError, match=r"scheme\.weight\.format=int5 cannot be exported to 'gptq'; "
                                          r"accepted: \['int2', 'int3', 'int4', 'int8'\]"):
        export(model, tiny_tokenizer(), scheme, "gptq", tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()
    export(model, tiny_tokenizer(), scheme, "compressed-tensors", tmp_path / "ct")
    packed, _ = load_packed(tmp_path / "ct", torch.float32)
    assert torch.equal(logits(packed), logits(model))


def test_unknown_format_and_unquantized_model_are_refused(tmp_path):
    model, scheme = quantized(4, 32, False)
    with pytest.raises(ConfigError, match=r"convert\.formats: 'awq' is not a known format; known: "
                                          r"\['compressed-tensors', 'gguf', 'gptq', 'half'\]"):
        export(model, tiny_tokenizer(), scheme, "awq", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"no quantized linear layers \(not a quantized model\)"):
        export(make_tiny_llama(), tiny_tokenizer(), scheme, "gptq", tmp_path / "out")


@pytest.mark.parametrize("fmt,tensor", [("gptq", "qzeros"), ("compressed-tensors", "weight_packed")])
def test_missing_or_misshaped_tensor_is_named(fmt, tensor, tmp_path):
    model, scheme = quantized(4, 32, False)
    out = tmp_path / "out"
    export(model, tiny_tokenizer(), scheme, fmt, out)
    f = out / "model.safetensors"
    good = load_file(str(f))
    key = f"model.layers.1.mlp.up_proj.{tensor}"
    save_file({k: v for k, v in good.items() if k != key}, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"checkpoint tensor '{key}' is missing"):
        load_packed(out)
    bad = dict(good)
    bad[key] = good[key][:-1].clone()
    save_file(bad, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"checkpoint tensor '{key}' has shape"):
        load_packed(out)
    bad = {k: v for k, v in good.items() if k != "model.norm.weight"}
    save_file(bad, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"checkpoint tensor 'model.norm.weight' is missing"):
        load_packed(out)


def test_failed_export_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    from quant.export.gptq import GPTQExporter

    model, scheme = quantized(4, 32, False)
    out = tmp_path / "out"
    export(model, tiny_tokenizer(), scheme, "gptq", out)
    before = sorted(p.name for p in out.iterdir())

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(GPTQExporter, "quantization_config", boom)
    with pytest.raises(OSError, match="disk full"):
        export(model, tiny_tokenizer(), scheme, "gptq", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before  # the old checkpoint, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left


def test_export_refuses_a_non_empty_target_and_a_missing_tokenizer(tmp_path):
    model, scheme = quantized(4, 32, False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for fmt in ("gptq", "compressed-tensors", "half"):
        with pytest.raises(ConfigError, match=rf"export to '{fmt}': .*out exists and is not an empty directory"):
            export(model, tiny_tokenizer(), scheme, fmt, out)
        with pytest.raises(ConfigError, match=rf"export to '{fmt}': no tokenizer was given"):
            export(model, None, scheme, fmt, tmp_path / "new")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not (tmp_path / "new").exists()
    export(model, tiny_tokenizer(), scheme, "gptq", tmp_path / "empty")  # a new directory is fine
    (tmp_path / "empty2").mkdir()
    export(model, tiny_tokenizer(), scheme, "gptq", tmp_path / "empty2")  # so is an empty one


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "half"])
def test_exported_files_are_readable_by_every_user(fmt, tmp_path):
    """transformers writes model.safetensors through a 0600 temporary; the export is 0644 / 0755
    under the usual umask (and follows a stricter one)."""
    import os

    model, scheme = quantized(4, 32, False)
    old = os.umask(0o022)
    try:
        export(model, tiny_tokenizer(), scheme, fmt, tmp_path / "out")
        os.umask(0o077)
        export(model, tiny_tokenizer(), scheme, fmt, tmp_path / "private")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "private").iterdir()} == {0o600}


def test_footprint_counts_against_the_fp16_model(tmp_path):
    from quant.export.base import unquantized_params

    model, scheme = quantized(4, 64, False)
    params = sum(p.numel() for p in make_tiny_llama().parameters())
    assert unquantized_params(model) == params  # however the quantized linears store their weights now
    fp = export(model, tiny_tokenizer(), scheme, "compressed-tensors", tmp_path / "out")
    d = fp.to_dict()
    assert d["fp16_bytes"] == 2 * params
    assert d["weights_bytes"] == (tmp_path / "out" / "model.safetensors").stat().st_size
    assert d["size_vs_fp16"] == pytest.approx(d["weights_bytes"] / (2 * params))
    assert d["bits_per_param"] == pytest.approx(16 * d["size_vs_fp16"])


def test_model_card_has_the_recipe_footprint_and_load_lines(tmp_path):
    from quant.export.card import CardFacts, render_card

    model, scheme = quantized(4, 32, False)
    fp = export(model, tiny_tokenizer(), scheme, "gptq", tmp_path / "out")
    facts = CardFacts("gptq", scheme.to_dict(), "calibrate=rtn", "float16", "tiny-llama", fp.to_dict(),
                      {"max_logit_diff": 0.0})
    card = render_card(facts, "org/tiny-w4")
    assert card.startswith("---\nbase_model: tiny-llama\n")
    assert "# tiny-llama: W4A16KV16g32 (asymmetric int4), gptq" in card and "`calibrate=rtn`" in card
    assert f"| bits per weight, quantized linears (codes + scales + zero points + indices) | " \
           f"{fp.bits_per_weight:.4f} |" in card
    assert f"| size vs fp16 | {fp.to_dict()['size_vs_fp16']:.3f} |" in card
    assert "GPTQModel.load('org/tiny-w4', backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)" in card
    assert "not BACKEND.AUTO with dtype=torch.float32" in card  # asymmetric 4-bit: GPTQModel's CPU pitfall
    assert "not measured when a checkpoint is converted" in card and "are identical to the fake-quant" in card
    measured = render_card(facts, ".", {"perplexity, wiki": 23.1243}, "the evaluate stage")
    assert "| perplexity, wiki | 23.1243 |" in measured and "not measured" not in measured
    ct = render_card(CardFacts("compressed-tensors", scheme.to_dict(), "r", "float16", "m", fp.to_dict()))
    assert "llm = LLM('.')" in ct and '"dequantize": true' in ct
    sym3 = QuantScheme(weight=WeightSpec(IntFormat(3), 32, True)).to_dict()
    ct3 = render_card(CardFacts("compressed-tensors", sym3, "r", "float16", "m", fp.to_dict()))
    assert "# not loadable by vLLM (int3 symmetric" in ct3


def test_missing_kernel_library_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gemlite" else real(n, *a))
    pl = PackedLinear(64, 64, 4, 32, symmetric=False)
    with pytest.raises(MissingDependencyError, match=r"backend='gemlite' needs the gemlite package: "
                                                     r"pip install 'gemlite=="):
        pl.use_backend("gemlite")
    with pytest.raises(ValueError, match=r"backend='marlin' is not known; accepted: \['torch', 'triton', 'gemlite'"):
        pl.use_backend("marlin")
    with pytest.raises(MissingDependencyError, match=r"backend='triton' needs a CUDA device and the triton"):
        pl.use_backend("triton")  # a CPU tensor (and, here, no triton)


def test_torch_int4_backend_is_close_to_the_reference():
    from quant.export.gptq import packed_from_quant_linear
    from quant.modules.linear import QuantLinear

    ql = QuantLinear.from_linear(torch.nn.Linear(256, 128, bias=False), WeightSpec(IntFormat(4), 64))
    ql.freeze()
    pl = packed_from_quant_linear(ql, torch.bfloat16)
    x = torch.randn(3, 256)
    ref = pl(x)
    y = pl.use_backend("torch-int4")(x)
    assert (y - ref).norm() / ref.norm() < 1e-2  # bf16 activations and folded zero points
    with pytest.raises(ValueError, match=r"backend='torch-int4' needs 4 bits"):
        PackedLinear(64, 64, 3, 32, symmetric=False).use_backend("torch-int4")


def test_packed_model_generates_and_loads_through_load_model(tmp_path):
    model, scheme = quantized(4, 32, False)
    export(model, tiny_tokenizer(), scheme, "gptq", tmp_path / "out")
    packed, tok = load_model(tmp_path / "out", torch.float32)
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    ids = torch.tensor([[3, 4, 5]])
    ref = model.to(torch.float32).generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(packed.generate(ids, max_new_tokens=5, do_sample=False), ref)



# ---------------------------------------------------------------------------
# The convert stage


def _stage_params(tmp_path, monkeypatch, convert: dict, bits=4, group=32):
    from quant.checkpoint import save_quantized
    from tasks.common import BaseParams, ModelParams, Params

    model = make_tiny_llama()
    scheme = QuantScheme(weight=WeightSpec(IntFormat(bits), group))
    quantize_linears(model, scheme)
    save_quantized(model, tiny_tokenizer(), scheme, tmp_path / "artifacts" / "e2e" / "model",
                   extra={"method": "e2e-qp"})
    monkeypatch.chdir(tmp_path)
    return Params(BaseParams(device="cpu"), ModelParams(), scheme, {"convert": convert})


def test_convert_stage_writes_every_format_and_evaluate_loads_the_first(tmp_path, monkeypatch):
    from quant.checkpoint import read_scheme
    from quant.eval.footprint import footprint
    from tasks import convert

    params = _stage_params(tmp_path, monkeypatch, {"model": "e2e", "formats": ["gptq", "compressed-tensors",
                                                                              "half"]})
    m = convert.run(params)
    assert set(m["formats"]) == {"gptq", "compressed-tensors", "half"}
    for fmt, entry in m["formats"].items():
        assert entry["max_logit_diff"] == 0.0, fmt
        assert entry["size_bytes"] < m["size_before_bytes"]
    assert m["memory_bytes_after"] < 0.6 * m["memory_bytes_before"]
    assert (tmp_path / "artifacts/convert/formats/compressed-tensors/config.json").exists()
    assert json.loads((tmp_path / "metrics/convert.json").read_text())["primary_format"] == "gptq"
    model, _ = load_model(tmp_path / "artifacts/convert/model")
    assert read_scheme(tmp_path / "artifacts/convert/model").name == "W4A16KV16g32"
    fp = footprint(model)
    assert fp.bits_per_weight == pytest.approx(4 + (16 + 4) / 32)
    # sizes against the same model in fp16 (2 bytes per parameter), not against the fake-quant input
    params = sum(p.numel() for p in make_tiny_llama().parameters())
    assert m["fp16_bytes"] == 2 * params
    for entry in m["formats"].values():
        assert "ratio_to_input" not in entry
        assert entry["size_vs_fp16"] == pytest.approx(entry["weights_bytes"] / (2 * params))
        assert entry["bits_per_param"] == pytest.approx(8 * entry["weights_bytes"] / params)
    # tiny model: embeddings and lm_head (fp16) are half of it; half = fp16 weights + codes and qparams
    assert m["formats"]["gptq"]["size_vs_fp16"] < 0.6 and m["formats"]["half"]["size_vs_fp16"] > 1
    # every folder is publishable: config, weights, tokenizer, generation config, model card; readable by all
    for d in (tmp_path / "artifacts/convert/model", tmp_path / "artifacts/convert/formats/compressed-tensors"):
        names = {f.name for f in d.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= names
        assert all(f.stat().st_mode & 0o777 == 0o644 for f in d.iterdir()), d
        card = (d / "README.md").read_text()
        assert "not measured when a checkpoint is converted" in card and "from_pretrained" in card
        facts = json.loads((d / "quantization.json").read_text())["card"]
        assert facts["recipe"] and facts["footprint"]["size_vs_fp16"] == pytest.approx(
            m["formats"][facts["format"]]["size_vs_fp16"])


def test_convert_stage_refuses_bad_params_before_writing(tmp_path, monkeypatch):
    from tasks import convert

    params = _stage_params(tmp_path, monkeypatch, {"model": "e2e"})
    for f in (tmp_path / "artifacts/e2e/model").glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ConfigError, match=r"convert\.model='e2e': .* has no tokenizer"):
        convert.run(params)

    with pytest.raises(ConfigError, match=r"convert\.formats\[1\]: 'awq' is not a known format"):
        convert.run(_stage_params(tmp_path, monkeypatch, {"formats": ["gptq", "awq"]}))
    with pytest.raises(ConfigError, match=r"convert\.dtype='float32' is not accepted"):
        convert.run(_stage_params(tmp_path, monkeypatch, {"dtype": "float32"}))
    with pytest.raises(ConfigError, match=r"convert\.model='block_ap': .* does not exist"):
        convert.run(_stage_params(tmp_path, monkeypatch, {"model": "block_ap"}))
    params = _stage_params(tmp_path, monkeypatch, {"formats": ["compressed-tensors", "gptq"]}, group=-1)
    params = type(params)(params.base, params.model, QuantScheme(
        weight=WeightSpec(IntFormat(4), -1), kv_cache=KVCacheSpec(IntFormat(4))), params.sections)
    from quant.checkpoint import save_quantized

    model = make_tiny_llama()
    quantize_linears(model, params.scheme)
    save_quantized(model, tiny_tokenizer(), params.scheme, tmp_path / "artifacts" / "e2e" / "model")
    with pytest.raises(ConfigError, match=r"scheme\.kv_cache=.*cannot be exported to 'compressed-tensors'"):
        convert.run(params)
    assert not (tmp_path / "artifacts" / "convert").exists()


def test_registry_pyfunc_loads_and_generates_from_the_packed_checkpoint(tmp_path, monkeypatch):
    import mlflow

    from tasks.packed_model import log_packed_model

    model, scheme = quantized(4, 32, False)
    export(model, tiny_tokenizer(), scheme, "gptq", tmp_path / "packed")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", (tmp_path / "art").as_uri()))
    with mlflow.start_run():
        info = log_packed_model(tmp_path / "packed", ["torch"])
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    out = loaded.predict(["w1 w2 w3"], params={"max_new_tokens": 4})
    tok = tiny_tokenizer()
    ids = tok("w1 w2 w3", return_tensors="pt")["input_ids"]
    ref = model.to(torch.float32).generate(ids, max_new_tokens=4, do_sample=False)
    assert out == [tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,bits", [("triton", 4), ("triton", 2), ("triton", 8), ("torch-int4", 4),
                                          ("gemlite", 4), ("gemlite", 2)])
@pytest.mark.parametrize("rows", [1, 7, 16, 40])
def test_gpu_kernels_match_the_reference(backend, bits, rows):
    """Each kernel against the exact dequantised reference: relative error < 1% (half-precision
    products and sums, tinygemm's bf16), at decode (1..16 rows) and prefill (40 rows) sizes."""
    from quant.export.gptq import packed_from_quant_linear
    from quant.modules.linear import QuantLinear

    if backend == "gemlite":
        pytest.importorskip("gemlite")
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 512, bias=False)
    ql = QuantLinear.from_linear(lin, WeightSpec(IntFormat(bits), 64))
    ql.freeze()
    dtype = torch.bfloat16 if backend == "torch-int4" else torch.float16
    pl = packed_from_quant_linear(ql, dtype).cuda()
    x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
    ref = pl(x.float()).float()
    y = pl.use_backend(backend)(x).float()
    assert (y - ref).norm() / ref.norm() < 1e-2


def test_dequantize_once_is_bit_identical_and_only_for_inference(tmp_path):
    """Evaluation caches each layer's dequantized weight: same logits bit for bit, for the
    trainable and the frozen fake-quant model (with activation quantizers) and the packed
    model; with gradients on, layers dequantize as usual; the copies are gone afterwards."""
    from quant.config.scheme import ActivationSpec
    from quant.modules.linear import QuantLinear
    from quant.modules.runtime import dequantize_once

    trainable = make_tiny_llama()
    quantize_linears(trainable, QuantScheme(weight=WeightSpec(IntFormat(3), 32, False),
                                            activation=ActivationSpec(IntFormat(8), "per_token", False)))
    model, scheme = quantized(4, 32, False)
    export(model, tiny_tokenizer(), scheme, "gptq", tmp_path / "out")
    packed, _ = load_packed(tmp_path / "out", torch.float32)
    for m in (trainable, model.float(), packed):
        ref = logits(m)
        with dequantize_once(m) as n:
            assert n == 14
            assert torch.equal(logits(m), ref)
            ids = torch.arange(3, 20).reshape(1, -1)
            if any(p.requires_grad for p in m.parameters()):  # training inside still gets gradients
                m(ids).logits.sum().backward()
                assert all(q.scale.grad is not None for q in m.modules() if isinstance(q, QuantLinear))
        assert all(q.cached_weight is None for q in m.modules() if isinstance(q, QuantLinear | PackedLinear))
