"""The runtimes people load exports with, run for real where they install here.

Each case exports a tiny random Llama (RTN, converted to fp16) in one format, loads it
in one consumer and compares the logits with the fake-quant model's (float32):

- `exact`: bit-equal; `close`: within 4 units of the load's rounding (fp16's, or
  bf16's for bf16 loads) at the logits' scale, what storing fp16 step sizes or
  computing in half precision costs; `wrong`: loads and runs, logits off by more;
  `refuses`: raises. vLLM needs CUDA and does not install here: its cases apply
  the rules of vLLM's config parsing and weight creation, encoded below from its
  source with the function named, to the exported config.json and tensors
  (`config-ok` / `config-refused`, never called "loads").

Every outcome is asserted against `EXPECTED`, so a consumer release that changes
behaviour fails here, and recorded: with `QUANT_COMPAT_OUT=<file.json>` set, the
records of the run are written there when the module finishes;
`python scripts/compat_table.py` turns the record files in docs/results/compat/
into docs/compatibility.md. GPTQModel (and transformers' GPTQ path, which goes
through GPTQModel + optimum) pin another torch, so they run from a separate venv
(see scripts/compat_table.py); here they are skipped. CI runs the rest: about 40
small exports and loads.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open

from quant.export.base import export
from quant.export.loader import load_packed
from tests.quant.export.test_export import logits, quantized, tiny_tokenizer

CT_BITS = (2, 3, 4, 5, 6, 7, 8)
GPTQ_BITS = (2, 3, 4, 8)
RECORDS: list[dict] = []
ENV: dict[str, str] = {}


# ---------------------------------------------------------------------------
# Exports (one per variant, shared by every consumer) and verdicts


class Variant(NamedTuple):
    bits: int
    symmetric: bool
    group: int = 32
    lm_head: bool = False

    @property
    def label(self) -> str:
        g = "channel" if self.group == -1 else f"g{self.group}"
        return f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-{g}" + ("-lm_head" if self.lm_head else "")


CT_VARIANTS = [Variant(b, s) for b in CT_BITS for s in (True, False)] + [
    Variant(4, True, -1), Variant(4, False, -1), Variant(4, True, lm_head=True), Variant(4, False, lm_head=True)]
GPTQ_VARIANTS = [Variant(b, s) for b in GPTQ_BITS for s in (True, False)] + [Variant(4, False, lm_head=True)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(format, variant) -> (directory, fake-quant float32 logits), built on first use."""
    cache: dict = {}

    def get(fmt: str, v: Variant) -> tuple[Path, torch.Tensor]:
        if (fmt, v) not in cache:
            model, scheme = quantized(v.bits, v.group, v.symmetric, quantize_lm_head=v.lm_head)
            out = tmp_path_factory.mktemp("exports") / f"{fmt}-{v.label}"
            export(model, tiny_tokenizer(), scheme, fmt, out)
            cache[fmt, v] = (out, logits(model))  # logits() casts the model to float32: export first
        return cache[fmt, v]

    return get


def verdict(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[str, float, float]:
    out = out.float()
    diff = (out - ref).abs().max().item()
    unit = torch.finfo(torch.bfloat16 if dtype == torch.bfloat16 else torch.float16).eps
    tol = 4 * unit * ref.abs().max().item()
    if torch.equal(out, ref):
        return "exact", diff, tol
    return ("close" if diff <= tol else "wrong"), diff, tol


def record(request, consumer: str, fmt: str, v: Variant, dtype: str, result: str, diff: float | None = None,
           tol: float | None = None, detail: str = "") -> None:
    RECORDS.append({"consumer": consumer, "format": fmt, "bits": v.bits, "symmetric": v.symmetric,
                    "group_size": v.group, "lm_head": v.lm_head, "dtype": dtype, "verdict": result,
                    "max_abs_diff": diff, "tolerance": tol, "detail": detail[:300], "test": request.node.nodeid})


@pytest.fixture(scope="module", autouse=True)
def write_records():
    yield
    path = os.environ.get("QUANT_COMPAT_OUT")
    if path and RECORDS:
        import platform

        env = {"python": platform.python_version(), "torch": torch.__version__, **ENV}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"environment": env, "records": RECORDS}, indent=1) + "\n")


def run_load(load, ref: torch.Tensor, dtype: torch.dtype) -> tuple[str, float | None, float | None, str]:
    """(verdict, max |diff|, tolerance, detail) of loading with `load()` -> model and running it."""
    try:
        model = load()
        ids = torch.arange(3, 40).reshape(1, -1)
        with torch.no_grad():
            out = model(ids).logits
    except Exception as exc:  # noqa: BLE001 - a refusal of any kind is the outcome being recorded
        return "refuses", None, None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    v, diff, tol = verdict(out, ref, dtype)
    return v, diff, tol, ""


# ---------------------------------------------------------------------------
# transformers + compressed-tensors: AutoModelForCausalLM.from_pretrained, nothing else


HF_CT_CASES = [(v, torch.float32) for v in CT_VARIANTS] + [
    (Variant(4, s), d) for s in (True, False) for d in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("v,dtype", HF_CT_CASES, ids=lambda x: getattr(x, "label", str(x)[6:]))
def test_transformers_loads_compressed_tensors(v, dtype, exports, request):
    import compressed_tensors
    import transformers
    from transformers import AutoModelForCausalLM

    ENV.update(transformers=transformers.__version__, compressed_tensors=compressed_tensors.__version__)
    path, ref = exports("compressed-tensors", v)
    result, diff, tol, detail = run_load(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype), ref, dtype)
    record(request, "transformers", "compressed-tensors", v, str(dtype)[6:], result, diff, tol, detail)
    # symmetric: compressed modules decompressed in the load dtype (float32: exact); asymmetric: dequantised
    # while loading in the checkpoint's fp16 (quant/export/compressed_tensors.py), one rounding per weight
    expected = {"exact"} if v.symmetric and dtype == torch.float32 else {"exact", "close"}
    assert result in expected, (result, diff, tol, detail)


def test_asymmetric_weights_are_the_fake_quant_weights_rounded_once_to_fp16(exports):
    """Where the asymmetric load is not bit-equal in logits, it is exact in the weights: every
    dequantised weight is the fake-quant float32 weight rounded once to fp16."""
    from transformers import AutoModelForCausalLM

    from quant.modules.linear import quant_linears

    v = Variant(4, False)
    model, _ = quantized(v.bits, v.group, v.symmetric)
    path, _ = exports("compressed-tensors", v)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, ql in quant_linears(model):
        want = ql.dequantized_weight().float().half().float()
        assert torch.equal(hf.get_submodule(name).weight, want), name


def test_config_without_the_dequantize_flag_fails_in_transformers(exports, tmp_path):
    """Why the flag is written: without it, transformers' compressed path refuses the packed
    zero points (its meta-device layout keeps them unpacked)."""
    import shutil

    from transformers import AutoModelForCausalLM

    path, _ = exports("compressed-tensors", Variant(4, False))
    copy = tmp_path / "no-flag"
    shutil.copytree(path, copy)
    cfg = json.loads((copy / "config.json").read_text())
    assert cfg["quantization_config"].pop("dequantize") is True
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32)


# ---------------------------------------------------------------------------
# compressed-tensors' own decompression, and this project's loader


@pytest.mark.parametrize("v", [v for v in CT_VARIANTS if not v.lm_head], ids=lambda v: v.label)
def test_compressed_tensors_library_decompresses(v, exports, request):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path, ref = exports("compressed-tensors", v)

    def load():
        config = AutoConfig.from_pretrained(path)
        qc = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        apply_quantization_config(model, qc)
        compressor = ModelCompressor(quantization_config=qc)
        compressor.compress_model(model)
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        compressor.decompress_model(model)
        return model

    result, diff, tol, detail = run_load(load, ref, torch.float32)
    record(request, "compressed-tensors ModelCompressor", "compressed-tensors", v, "float32", result, diff, tol,
           detail)
    assert result == "exact", (result, diff, detail)


@pytest.mark.parametrize("fmt,v", [("compressed-tensors", v) for v in CT_VARIANTS]
                         + [("gptq", v) for v in GPTQ_VARIANTS], ids=lambda x: getattr(x, "label", x))
def test_project_loader(fmt, v, exports, request):
    path, ref = exports(fmt, v)
    result, diff, tol, detail = run_load(lambda: load_packed(path, torch.float32)[0], ref, torch.float32)
    record(request, "quant-pipeline load_packed", fmt, v, "float32", result, diff, tol, detail)
    assert result == "exact", (result, diff, detail)


# ---------------------------------------------------------------------------
# vLLM: its rules, applied to the exported files (vLLM needs CUDA; it is not run here)


class VLLMRefusal(Exception):
    pass


def tensor_specs(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(path / "model.safetensors"), "pt") as st:
        return {k: (tuple(st.get_slice(k).get_shape()), st.get_slice(k).get_dtype()) for k in st.keys()}  # noqa: SIM118


def vllm_compressed_tensors(path: Path) -> str:
    """What vLLM's compressed-tensors loader does with this checkpoint, from its source
    (vllm-project/vllm, vllm/model_executor/layers/quantization/compressed_tensors/):

    - compressed_tensors.py `CompressedTensorsConfig.from_config`: reads `format`, `ignore`,
      `config_groups[*].targets/weights/input_activations`; weights parse as
      compressed_tensors `QuantizationArgs`; other keys (our `dequantize`) are not read.
    - `get_quant_method`: only `LinearBase` layers (and Attention, FusedMoE) get a method;
      `ParallelLMHead` is an embedding, so a quantized lm_head has no loader.
    - `get_scheme` / `should_ignore_layer` (utils.py): the shards of a fused layer (q/k/v ->
      qkv_proj, gate/up -> gate_up_proj) must be all ignored or none.
    - `_is_wNa16_group_channel` + `_get_scheme_from_parts`: channel or group strategy, static,
      no input activations, format pack-quantized, num_bits in WNA16_SUPPORTED_BITS.
    - schemes/compressed_tensors_wNa16.py `CompressedTensorsWNA16.__init__`: group_size None
      only with strategy channel; `WNA16_SUPPORTED_TYPES_MAP` {4: uint4b8, 8: uint8b128};
      asymmetric needs `WNA16_ZP_SUPPORTED_TYPES_MAP` {4: uint4, 8: uint8} (newer vLLM lists
      2..8 bits symmetric; the zero-point map is 4/8 in every version read).
    - `create_weights`: weight_packed int32 [N, K/pack_factor], weight_scale [N, groups],
      weight_shape int64 [2], weight_zero_point int32 [N/pack_factor, groups] packed along N.
    Returns the scheme it would run, or raises VLLMRefusal with the reason."""
    from compressed_tensors.quantization import QuantizationArgs

    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    if qc.get("quant_method") != "compressed-tensors":
        raise VLLMRefusal(f"quant_method={qc.get('quant_method')!r}")
    ignore = qc.get("ignore") or []
    groups = qc["config_groups"]
    targets = {t: g for g in groups.values() for t in g["targets"]}
    if "Linear" not in targets:
        raise VLLMRefusal(f"targets {sorted(targets)}: vLLM matches linear layers by class name 'Linear'")
    group = targets["Linear"]
    w = QuantizationArgs.model_validate(group["weights"])
    fmt = group.get("format") or qc.get("format")
    if group.get("input_activations") is not None or w.dynamic or w.strategy not in ("channel", "group"):
        raise VLLMRefusal("not a weight-only channel/group scheme (_is_wNa16_group_channel)")
    if fmt != "pack-quantized":
        raise VLLMRefusal(f"format={fmt!r}: WNA16 reads pack-quantized")
    if w.num_bits not in (4, 8):
        table = "WNA16_SUPPORTED_TYPES_MAP" if w.symmetric else "WNA16_ZP_SUPPORTED_TYPES_MAP"
        raise VLLMRefusal(f"num_bits={w.num_bits} ({'symmetric' if w.symmetric else 'asymmetric'}): "
                          f"{table} holds 4 and 8")
    if w.group_size is None and w.strategy != "channel":
        raise VLLMRefusal("group_size None with strategy group")
    for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        flags = {any(i.endswith(f".{s}") or i == s for i in ignore) for s in fused}
        if len(flags) > 1:
            raise VLLMRefusal(f"ignore lists only some of the fused shards {fused}")
    specs = tensor_specs(path)
    if "lm_head" not in ignore and "lm_head.weight" not in specs:
        raise VLLMRefusal("lm_head is quantized: vLLM's compressed-tensors config gives ParallelLMHead no "
                          "quantized method (get_quant_method: LinearBase only)")
    pack = 32 // w.num_bits
    st = safe_open(str(path / "model.safetensors"), "pt")
    for name in sorted({k.rsplit(".", 1)[0] for k in specs if k.endswith(".weight_packed")}):
        n, k = (int(x) for x in st.get_tensor(f"{name}.weight_shape"))
        groups_ = 1 if w.strategy == "channel" else k // w.group_size
        want = {"weight_packed": ((n, k // pack), "I32"), "weight_shape": ((2,), "I64")}
        if not w.symmetric:
            want["weight_zero_point"] = ((n // pack, groups_), "I32")
        for t, spec in want.items():
            if specs.get(f"{name}.{t}") != spec:
                raise VLLMRefusal(f"{name}.{t} is {specs.get(f'{name}.{t}')}; create_weights allocates {spec}")
        if specs[f"{name}.weight_scale"][0] != (n, groups_):
            raise VLLMRefusal(f"{name}.weight_scale shape {specs[f'{name}.weight_scale'][0]} != {(n, groups_)}")
    qtype = f"uint{w.num_bits}" + (f"b{1 << (w.num_bits - 1)}" if w.symmetric else " + zero points")
    return f"CompressedTensorsWNA16 ({qtype}, {w.strategy})"


def vllm_gptq(path: Path) -> str:
    """What vLLM does with a GPTQ checkpoint, from its source (vllm-project/vllm,
    vllm/model_executor/layers/quantization/):

    - gptq_marlin.py `GPTQMarlinConfig.is_gptq_marlin_compatible` (through
      `override_quantization_method`): quant_method gptq, bits/group_size/sym/desc_act all
      present, (bits, sym) in `TYPE_MAP` = {(4, True), (8, True)}, group size Marlin supports
      (`check_marlin_supported`: -1, 32, 64, 128) -> gptq_marlin. Marlin's uint4b8/uint8b128
      types carry the zero point 2^(b-1) themselves: our symmetric qzeros must hold exactly that.
    - otherwise gptq.py `GPTQConfig`: bits in [2, 3, 4, 8], `checkpoint_format` read by
      `from_config`, `GPTQLinearMethod.use_v2_format = checkpoint_format == "gptq_v2"` (v1
      would add 1 to every zero point), `get_supported_act_dtypes` = [float16] only;
      `create_weights`: qweight int32 [K/pack_factor, N], g_idx [K], qzeros int32
      [K/group, N/pack_factor], scales [K/group, N], N % pack_factor.numerator == 0.
    Returns the method it would run, or raises VLLMRefusal."""
    from quant.numerics.packing import unpack

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    if qc.get("quant_method") != "gptq":
        raise VLLMRefusal(f"quant_method={qc.get('quant_method')!r}")
    bits, g, sym, desc_act = qc.get("bits"), qc.get("group_size"), qc.get("sym"), qc.get("desc_act")
    if None in (bits, g, sym, desc_act):
        raise VLLMRefusal("bits, group_size, sym and desc_act must all be in quantization_config")
    specs = tensor_specs(path)
    names = sorted({k.rsplit(".", 1)[0] for k in specs if k.endswith(".qweight")})
    if qc.get("lm_head") != ("lm_head" in names):
        raise VLLMRefusal(f"lm_head={qc.get('lm_head')} but lm_head tensors {'present' if 'lm_head' in names else 'absent'}")
    marlin = (bits, sym) in {(4, True), (8, True)} and g in (-1, 32, 64, 128)
    if not marlin:
        if bits not in (2, 3, 4, 8):
            raise VLLMRefusal(f"bits={bits}: GPTQConfig takes 2/3/4/8")
        if qc.get("checkpoint_format") != "gptq_v2":
            raise VLLMRefusal("checkpoint_format is not gptq_v2: vLLM would read the zero points as v1 (z - 1)")
    pf = Fraction(32, bits)
    st = safe_open(str(path / "model.safetensors"), "pt")
    for name in names:
        (kp, n), _ = specs[f"{name}.qweight"]
        k = int(kp * pf)
        groups = 1 if g == -1 else k // g
        want = {"qweight": ((kp, n), "I32"), "g_idx": ((k,), "I32"), "qzeros": ((groups, int(n / pf)), "I32")}
        for t, spec in want.items():
            if specs.get(f"{name}.{t}") != spec:
                raise VLLMRefusal(f"{name}.{t} is {specs.get(f'{name}.{t}')}; create_weights allocates {spec}")
        if specs[f"{name}.scales"][0] != (groups, n) or n % pf.numerator:
            raise VLLMRefusal(f"{name}.scales / output size do not fit create_weights")
        if marlin and not torch.all(unpack(st.get_tensor(f"{name}.qzeros"), bits, dim=1) == 1 << (bits - 1)):
            raise VLLMRefusal(f"{name}.qzeros: Marlin assumes the zero point {1 << (bits - 1)} of a symmetric type")
    return "gptq_marlin" if marlin else "gptq (exllama gptq_gemm, v2 zero points, float16 only)"


@pytest.mark.parametrize("fmt,v", [("compressed-tensors", v) for v in CT_VARIANTS]
                         + [("gptq", v) for v in GPTQ_VARIANTS], ids=lambda x: getattr(x, "label", x))
def test_vllm_rules_on_the_exported_config(fmt, v, exports, request):
    path, _ = exports(fmt, v)
    check = vllm_compressed_tensors if fmt == "compressed-tensors" else vllm_gptq
    try:
        result, detail = "config-ok", check(path)
    except VLLMRefusal as exc:
        result, detail = "config-refused", str(exc)
    ENV["vllm"] = "rules from vllm-project/vllm source (not run)"
    record(request, "vLLM", fmt, v, "float16", result, detail=detail)
    ok = fmt == "gptq" or (v.bits in (4, 8) and not v.lm_head)
    assert result == ("config-ok" if ok else "config-refused"), detail


def test_vllm_rules_catch_a_wrong_config(exports, tmp_path):
    """The rules above can fail: a v1-format asymmetric GPTQ config, a fused layer half
    ignored, or a zero point left unpacked are refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = exports("gptq", Variant(3, False))
    bad = tmp_path / "gptq"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VLLMRefusal, match="v1"):
        vllm_gptq(bad)

    path, _ = exports("compressed-tensors", Variant(4, False))
    bad = tmp_path / "ct"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head", "model.layers.0.self_attn.k_proj"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VLLMRefusal, match="fused shards"):
        vllm_compressed_tensors(bad)
    cfg["quantization_config"]["ignore"] = ["lm_head"]
    (bad / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(bad / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight_zero_point"
    t[key] = torch.zeros(128, 2, dtype=torch.int32)  # unpacked [N, G]
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VLLMRefusal, match="weight_zero_point"):
        vllm_compressed_tensors(bad)


# ---------------------------------------------------------------------------
# GPTQModel, and transformers' GPTQ path through it (separate venv; skipped here)

GPTQMODEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("v", GPTQ_VARIANTS, ids=lambda v: v.label)
@pytest.mark.parametrize("backend", ["auto", "gptq_torch"])
@pytest.mark.parametrize("dtype", GPTQMODEL_DTYPES, ids=str)
def test_gptqmodel_loads_gptq(v, backend, dtype, exports, request):
    gptqmodel = pytest.importorskip("gptqmodel")
    from gptqmodel import BACKEND, GPTQModel

    ENV["gptqmodel"] = gptqmodel.__version__
    path, ref = exports("gptq", v)
    b = BACKEND.AUTO if backend == "auto" else BACKEND.GPTQ_TORCH
    kernel: list[str] = []

    def load():
        model = GPTQModel.load(str(path), backend=b, device="cpu", dtype=dtype).model
        kernel.append(type(model.get_submodule("model.layers.0.mlp.down_proj")).__name__)
        return model

    result, diff, tol, detail = run_load(load, ref, dtype)
    record(request, f"GPTQModel backend={backend}", "gptq", v, str(dtype)[6:], result, diff, tol,
           detail or f"kernel {kernel[0]}")
    # TorchLinear (GPTQ_TORCH, and AUTO's choice except at 4 bits) runs fp16/bf16 only; at 4 bits
    # AUTO picks TorchFusedLinear in float32, which drops asymmetric zero points on CPU
    if dtype == torch.float32:
        if backend == "auto" and v.bits == 4:
            expected = {"close"} if v.symmetric else {"wrong"}
        else:
            expected = {"refuses"}
    else:
        expected = {"close", "exact"}
    assert result in expected, (result, diff, tol, detail, kernel)


@pytest.mark.parametrize("v", GPTQ_VARIANTS, ids=lambda v: v.label)
@pytest.mark.parametrize("dtype", GPTQMODEL_DTYPES, ids=str)
def test_transformers_loads_gptq_through_gptqmodel(v, dtype, exports, request):
    gptqmodel = pytest.importorskip("gptqmodel")
    optimum = pytest.importorskip("optimum")
    import importlib.metadata

    import transformers
    from transformers import AutoModelForCausalLM

    ENV.update(gptqmodel=gptqmodel.__version__, transformers=transformers.__version__,
               optimum=importlib.metadata.version(optimum.__name__))
    path, ref = exports("gptq", v)
    head: list[str] = []

    def load():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu")
        head.append(type(model.lm_head).__name__)
        return model

    result, diff, tol, detail = run_load(load, ref, dtype)
    if v.lm_head and head == ["Linear"]:
        detail = detail or ("lm_head: true is not read; lm_head stays nn.Linear, lm_head.weight MISSING and "
                            "initialised at random (only a load report, no error)")
    record(request, "transformers (GPTQModel + optimum)", "gptq", v, str(dtype)[6:], result, diff, tol, detail)
    # a quantized lm_head: transformers' GPTQ path (optimum) converts the decoder blocks only
    assert result in ({"wrong"} if v.lm_head else {"close", "exact"}), (result, diff, tol, detail)
