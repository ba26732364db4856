"""The quantized-checkpoint format: loading and saving models of this project.

- `save_quantized` / `load_quantized` persist a model whose decoder linears are
  `QuantLinear`s: the dequantized weights as an ordinary transformers checkpoint
  (any tool can load it and gets the fake-quant function), plus
  `qparams.safetensors` (step sizes and zero points) and `quantization.json`
  (the scheme), from which the exact QuantLinear modules are rebuilt.
  A trainable QuantLinear's float weight (what Block-AP starts from and, unless
  the layer keeps a reference weight, what its full-precision targets use) is kept
  in `float_weights.safetensors`; a frozen one (`QuantLinear.freeze()`) is
  restored frozen, bit for bit.
- Reference weights (`QuantLinear.reference_weight`: the full-precision weight of a
  layer whose float weight a quantizer moved onto the grid, GPTQ's) are kept in
  `reference_weights.safetensors`, a file of their own because only block-wise
  training reads them: `load_quantized(..., reference_weights=True)` (the block_ap
  stage) restores them bit for bit; every other reader (evaluate, e2e, convert,
  synthesize, `quant.load_model`) leaves them on disk and pays no memory for them.
- Floating-point layers (no integer codes) keep their float weight and, for
  FP formats, `<layer>.exp_bias`; a layer whose format differs from the scheme's
  (the `fp-search` format search) is listed in `quantization.json` under
  `layer_formats`. A searched activation quantizer (`CalibratedFPQuantizer`) is
  stored as `<layer>.act_bias` / `<layer>.act_shift` plus its format in
  `act_formats`, and restored before the scheme's runtime quantizers.
- Online rotations (QuaRot, `quant.modules.rotation`) hold no weights: their
  description goes into `quantization.json` under "rotations" and they are
  re-installed on load, before the activation / KV quantizers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quant.config import ConfigError, InputError
from quant.config.scheme import QuantScheme, WeightSpec
from quant.io import atomic_dir
from quant.models.arch import get_module, set_module
from quant.models.hub import check_loading_info
from quant.models.moe import fused_experts, prepare_model
from quant.modules.activation import CalibratedFPQuantizer, set_input_quantizer
from quant.modules.linear import QuantLinear, quant_linears
from quant.modules.rotation import install_rotations, rotation_config
from quant.modules.runtime import apply_runtime_quantizers
from quant.numerics import grid as P
from quant.numerics.formats import IntFormat, parse_format

QPARAMS_FILE = "qparams.safetensors"
FLOAT_WEIGHTS_FILE = "float_weights.safetensors"
REFERENCE_WEIGHTS_FILE = "reference_weights.safetensors"
SCHEME_FILE = "quantization.json"
# a model directory's tokenizer is one of these (fast tokenizers, sentencepiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def read_config(path: str | Path) -> dict:
    """config.json of a model directory; an `InputError` naming the file if missing or not JSON."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise InputError(f"{f} not found: {path} is not a model directory (run the stage that writes it)")
    try:
        config = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{f} is not valid JSON ({exc}); re-run the stage that wrote it") from None
    if not isinstance(config, dict):
        raise InputError(f"{f} must hold a JSON object, got {type(config).__name__}")
    return config


def read_quant_meta(path: str | Path) -> dict | None:
    """quantization.json of a model directory (None when there is none): a UTF-8 JSON object
    with a `scheme` mapping, else an InputError naming the file."""
    f = Path(path) / SCHEME_FILE
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{f} is not valid UTF-8 JSON ({exc}); re-run the stage that wrote it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("scheme"), dict):
        raise InputError(f"{f} must hold a JSON object with a 'scheme' mapping; re-run the stage that wrote it")
    return meta


def check_tokenizer_files(path: str | Path) -> None:
    """The directory holds a tokenizer (one of TOKENIZER_FILES), else an InputError naming it."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"{path} holds no tokenizer (none of {list(TOKENIZER_FILES)}); re-run the stage "
                         "that wrote it")


def load_tokenizer(path: str | Path):
    """The tokenizer of a model directory; missing or unreadable files are an InputError naming
    the directory, not transformers' advice to install a package."""
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: its tokenizer does not load ({reason}); re-run the stage that wrote it") from None


def check_model_files(path: str | Path) -> None:
    """Cheap integrity checks before loading: config.json and quantization.json parse, the
    tokenizer files are there, a packed export still says so in config.json, a quantized
    checkpoint has its qparams, and every safetensors file has a valid header that covers
    the whole file (truncation). An unsupported family is the first thing said."""
    from safetensors import safe_open

    path = Path(path)
    config = read_config(path)
    check_family(path)
    meta = read_quant_meta(path)
    if meta is not None and not config.get("quantization_config"):
        if meta.get("format") not in (None, "half"):  # convert's label file of a packed export
            raise InputError(f"{path / 'config.json'} has no quantization_config, but {path / SCHEME_FILE} says "
                             f"this is a packed {meta['format']!r} export; its config.json was edited or "
                             "replaced: re-run convert")
        if meta["scheme"].get("weight") and meta.get("layers") and not (path / QPARAMS_FILE).is_file():
            raise InputError(f"{path / QPARAMS_FILE} not found: {path / SCHEME_FILE} describes a quantized "
                             "checkpoint, whose step sizes and integer weights live there; re-run the stage "
                             "that wrote it")
    check_index(path)
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError and I/O errors alike
            raise InputError(f"{f} is corrupt or truncated ({exc}); re-run the stage that wrote it") from None
    check_tokenizer_files(path)


def check_index(path: Path) -> None:
    """A sharded checkpoint's index names only shards that exist (a missing shard is found here,
    not as random weights after loading)."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{index} is not a safetensors index ({exc}); re-download the model") from None
    absent = sorted({f for f in weight_map.values() if not (path / f).is_file()})
    if absent:
        tensors = sorted(k for k, f in weight_map.items() if f == absent[0])
        raise InputError(f"{index} names shard(s) {absent} that are not in {path} (holding e.g. "
                         f"{tensors[:3]}); the download is incomplete")


def check_scheme_fits(path: str | Path, scheme: QuantScheme) -> None:
    """What config.json alone can tell, before any weight is loaded: consistent head counts
    and a weight group size that divides every quantized linear's input width (Llama-style
    widths; the exact per-module check runs again in `quantizable_linears`)."""
    f = Path(path) / "config.json"
    c = read_config(path)
    hidden, heads = c.get("hidden_size"), c.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        return  # not a Llama-style config: the per-module check after loading decides
    kv = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim")
    if head_dim is None and hidden % heads:
        raise InputError(f"{f}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    if heads % kv:
        raise InputError(f"{f}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if scheme.weight is None:
        return
    head_dim = head_dim or hidden // heads
    widths = {"q_proj/k_proj/v_proj/gate_proj/up_proj (hidden_size)": hidden,
              "o_proj (num_attention_heads x head_dim)": heads * head_dim}
    if isinstance(c.get("intermediate_size"), int):
        widths["down_proj (intermediate_size)"] = c["intermediate_size"]
    moe = _moe_width(c)
    if moe is not None:
        widths[f"experts' down_proj ({moe[0]})"] = moe[1]
    if scheme.quantize_lm_head:
        widths["lm_head (hidden_size)"] = hidden
    for name, width in widths.items():
        scheme.weight.check_layer(name, width)


def _moe_width(config: dict) -> tuple[str, int] | None:
    """(attribute, value) of an MoE family's expert width in config.json, or None."""
    from quant.models.arch import MAPPINGS

    for m in MAPPINGS:
        if config.get("model_type") in m.model_types and m.moe is not None:
            value = config.get(m.moe.intermediate)
            return (m.moe.intermediate, value) if isinstance(value, int) else None
    return None


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   reference_weights: bool = False):
    """(model, tokenizer) of a directory in this format, or of a plain transformers checkpoint
    (after `check_model_files`: a corrupt file is an `InputError` naming it). A packed export
    (`convert`) is refused here: `quant.load_model` loads every kind of directory.
    `reference_weights`: also restore the QuantLinears' reference weights (block-wise
    training's targets; module docstring)."""
    from transformers import AutoModelForCausalLM

    check_model_files(path)
    config = read_config(path)
    if config.get("quantization_config"):
        raise ConfigError(f"{path} is a packed export (config.json has a quantization_config); "
                          "load it with quant.load_model")
    check_shapes(path)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    check_loading_info(path, info)
    prepare_model(model)  # per-expert linears in MoE blocks (quant.models.moe)
    model.to(device)
    model.eval()
    tokenizer = load_tokenizer(path)
    meta = read_quant_meta(path)
    if meta is not None:
        _restore_quant_linears(model, Path(path), reference_weights)
        install_rotations(model, meta.get("rotations"))
        scheme = read_scheme(path)
        if scheme.activation is not None or scheme.kv_cache is not None:
            apply_runtime_quantizers(model, scheme)  # activations / KV cache: not in the weights
    return model, tokenizer


def check_family(path: str | Path) -> None:
    """The model_type of config.json has an architecture mapping (a ConfigError naming it and
    the supported ones otherwise), read before any weight is loaded."""
    from quant.models.arch import mapping_for_type

    mapping_for_type(read_config(path).get("model_type"), f"{Path(path) / 'config.json'}")


def check_shapes(path: str | Path) -> None:
    """Every stored tensor whose name the model of config.json has is of that tensor's shape:
    read from the safetensors headers against a model built on the meta device (no weight is
    read). Tensors stored under other names (MoE experts) are checked by the loader."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for f in sorted(Path(path).glob("*.safetensors")):
        if f.name in (QPARAMS_FILE, FLOAT_WEIGHTS_FILE, REFERENCE_WEIGHTS_FILE):
            continue
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                shape = tuple(st.get_slice(k).get_shape())
                if k in expected and shape != expected[k]:
                    raise InputError(f"{f}: tensor {k!r} has shape {list(shape)} but the model of "
                                     f"{Path(path) / 'config.json'} needs {list(expected[k])}; "
                                     "config.json describes another model than the weights")


def source_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint's float weights are stored in (config.json `dtype`, older
    `torch_dtype`; float32 when absent). Stages whose float weights later stages train or
    take full-precision targets from load in this precision, not in the compute dtype."""
    config = read_config(path)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"{Path(path) / 'config.json'}: dtype={name!r} is not one of {list(table)}")
    return table[name]


# ---------------------------------------------------------------------------
# Quantized checkpoints


def save_quantized(model: nn.Module, tokenizer, scheme: QuantScheme, out: str | Path, extra: dict | None = None,
                   files: dict | None = None) -> Path:
    """Save a model with QuantLinear layers (atomically): dequantized checkpoint + qparams + scheme.
    `files` ({name: writer(path)}) adds method results (e.g. AWQ scales) inside the same directory."""
    out = Path(out)
    qparams: dict[str, torch.Tensor] = {}
    float_weights: dict[str, torch.Tensor] = {}
    layers = dict(quant_linears(model))
    references = {f"{name}.reference_weight": ql.reference_weight.detach().contiguous().cpu()
                  for name, ql in layers.items() if ql.reference_weight is not None}
    fp_meta: dict[str, dict[str, str]] = {"layer_formats": {}, "act_formats": {}}
    rotations = rotation_config(model)
    for name, ql in layers.items():
        if not isinstance(ql.spec.format, IntFormat):
            _collect_fp_layer(name, ql, scheme, qparams, float_weights, fp_meta)
            continue
        if not ql.frozen:
            float_weights[f"{name}.weight"] = ql.weight.detach().contiguous().cpu()
        q, scale, zp = ql.integer_weight()
        qdtype = torch.int8 if zp is None else torch.uint8
        qparams[f"{name}.qweight"] = q.to(qdtype).contiguous().cpu()
        qparams[f"{name}.scale"] = scale.contiguous().cpu()
        if zp is not None:
            qparams[f"{name}.zero_point"] = zp.contiguous().cpu()
    # Swap in plain linears holding the dequantized weights for the HF checkpoint.
    for name, ql in layers.items():
        set_module(model, name, ql.to_linear())
    try:
        with atomic_dir(out) as tmp, fused_experts(model):  # transformers' own MoE layout on disk
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            save_file(qparams, str(tmp / QPARAMS_FILE))
            if float_weights:
                save_file(float_weights, str(tmp / FLOAT_WEIGHTS_FILE))
            if references:
                save_file(references, str(tmp / REFERENCE_WEIGHTS_FILE))
            frozen = sorted(n for n, ql in layers.items() if ql.frozen)
            meta = {"scheme": scheme.to_dict(), "layers": sorted(layers), "frozen": frozen,
                    **{k: v for k, v in fp_meta.items() if v}, **(extra or {})}
            if rotations is not None:
                meta["rotations"] = rotations
            (tmp / SCHEME_FILE).write_text(json.dumps(meta, indent=2))
            for name, write in (files or {}).items():
                write(tmp / name)
    finally:
        for name, ql in layers.items():
            set_module(model, name, ql)
    return out


def _collect_fp_layer(name: str, ql: QuantLinear, scheme: QuantScheme, qparams: dict,
                      float_weights: dict, fp_meta: dict) -> None:
    """An FP layer's state: float weight, exponent bias, searched format and act quantizer."""
    float_weights[f"{name}.weight"] = ql.weight.detach().contiguous().cpu()
    if ql.exp_bias is not None:
        qparams[f"{name}.exp_bias"] = ql.exp_bias.detach().float().contiguous().cpu()
    if scheme.weight is None or ql.spec.format != scheme.weight.format:
        fp_meta["layer_formats"][name] = ql.spec.format.spec()
    aq = ql.input_quantizer
    if isinstance(aq, CalibratedFPQuantizer):
        fp_meta["act_formats"][name] = aq.fmt.spec()
        qparams[f"{name}.act_bias"] = aq.bias.detach().float().reshape(1).cpu()
        if aq.shift is not None:
            qparams[f"{name}.act_shift"] = aq.shift.detach().float().contiguous().cpu()
            if aq.unshift:
                qparams[f"{name}.act_unshift"] = torch.ones(1)


def _restore_fp_layer(name: str, lin: nn.Linear, spec: WeightSpec, qparams: dict, floats: dict,
                      act_format: str | None) -> QuantLinear:
    ql = QuantLinear.from_linear(lin, spec, name)
    with torch.no_grad():
        ql.weight.copy_(floats[f"{name}.weight"].to(ql.weight.dtype))
        if ql.exp_bias is not None:
            ql.exp_bias.copy_(qparams[f"{name}.exp_bias"])
    if act_format is not None:
        fmt = parse_format(act_format, f"act_formats[{name!r}]")
        shift = qparams.get(f"{name}.act_shift")
        unshift = f"{name}.act_unshift" in qparams
        set_input_quantizer(ql, CalibratedFPQuantizer(fmt, qparams[f"{name}.act_bias"], shift, unshift))
    return ql


def read_steps(path: str | Path) -> list:
    """The recipe steps (params form) that produced the checkpoint, as its stages recorded them."""
    meta = read_quant_meta(path)
    return list(meta.get("steps", [])) if meta is not None else []


def steps_record(prior: list, steps) -> dict:
    """`extra` for save_quantized: the steps so far (params form) and their names joined."""
    specs = [*prior, *(s.spec() for s in steps)]
    names = [s if isinstance(s, str) else next(iter(s)) for s in specs]
    return {"method": "+".join(names), "steps": specs}


def read_scheme(path: str | Path) -> QuantScheme | None:
    """The scheme of a quantized checkpoint (None for a plain one); an InputError naming
    quantization.json when it is unreadable or its scheme is not one this version accepts."""
    meta = read_quant_meta(path)
    if meta is None:
        return None
    try:
        return QuantScheme.from_dict(meta["scheme"], "scheme")
    except ConfigError as exc:
        raise InputError(f"{Path(path) / SCHEME_FILE}: {exc}; re-run the stage that wrote it") from None


def _restore_quant_linears(model: nn.Module, path: Path, reference_weights: bool = False) -> None:
    """Rebuild QuantLinear modules from the saved integer weights, step sizes and zero
    points (exact, whatever dtype the dequantized checkpoint was stored in); with
    `reference_weights`, their reference weights too."""
    meta = read_quant_meta(path)
    scheme = read_scheme(path)
    if scheme.weight is None:  # W16: nothing to rebuild (activation/KV-only schemes)
        return
    qparams = load_file(str(path / QPARAMS_FILE))
    floats = load_file(str(path / FLOAT_WEIGHTS_FILE)) if (path / FLOAT_WEIGHTS_FILE).exists() else {}
    try:
        _restore_layers(model, meta, scheme, qparams, floats)
    except KeyError as exc:
        raise InputError(f"{path / QPARAMS_FILE} (or {FLOAT_WEIGHTS_FILE}) has no tensor {exc.args[0]!r}, which "
                         f"{path / SCHEME_FILE} lists; the files are from different runs: re-run the stage "
                         "that wrote them") from None
    if reference_weights and (path / REFERENCE_WEIGHTS_FILE).exists():
        _restore_references(model, path / REFERENCE_WEIGHTS_FILE)


def _restore_references(model: nn.Module, f: Path) -> None:
    """Every tensor of `f` back into its trainable QuantLinear's reference weight, in the
    layer's dtype; a tensor no such layer of that shape takes is an InputError naming it."""
    layers = dict(quant_linears(model))
    for key, value in load_file(str(f)).items():
        ql = layers.get(key.removesuffix(".reference_weight"))
        if (not key.endswith(".reference_weight") or ql is None or ql.frozen
                or tuple(value.shape) != tuple(ql.weight.shape)):
            raise InputError(f"{f}: tensor {key!r} is no reference weight of a trainable quantized linear "
                             "of this model (of its shape); the files are from different runs: re-run the "
                             "stage that wrote them")
        ql.reference_weight = value.to(ql.weight.device, ql.weight.dtype)


def _restore_layers(model: nn.Module, meta: dict, scheme: QuantScheme, qparams: dict, floats: dict) -> None:
    frozen = set(meta.get("frozen", ()))
    g = scheme.weight.group_size
    layer_formats, act_formats = meta.get("layer_formats", {}), meta.get("act_formats", {})
    for name in meta.get("layers", ()):
        lin = get_module(model, name)
        spec = scheme.weight
        if name in layer_formats:
            spec = dataclasses.replace(spec, format=parse_format(layer_formats[name], f"layer_formats[{name!r}]"))
        if not isinstance(spec.format, IntFormat):
            set_module(model, name, _restore_fp_layer(name, lin, spec, qparams, floats, act_formats.get(name)))
            continue
        ql = QuantLinear.from_linear(lin, spec, name)
        scale = qparams[f"{name}.scale"].to(ql.scale.device)
        zp = qparams.get(f"{name}.zero_point")
        zp = None if zp is None else zp.to(ql.scale.device)
        q = qparams[f"{name}.qweight"].to(ql.scale.device)
        with torch.no_grad():
            if name in frozen:  # exact integer state, whatever the checkpoint dtype
                ql.freeze()
                ql.qweight.copy_(q.to(ql.qweight.dtype))
                if zp is not None:
                    ql.zero_point.copy_(zp)
            elif f"{name}.weight" in floats:
                ql.weight.copy_(floats[f"{name}.weight"].to(ql.weight.dtype))
            else:
                ql.weight.copy_(P.dequantize(q, scale, zp, scheme.weight.format, g).to(ql.weight.dtype))
            ql.scale.copy_(scale)
            if not ql.frozen and ql.zero_point is not None:
                ql.zero_point.copy_(zp)
        set_module(model, name, ql)
