"""The quantized-checkpoint format: loading and saving models of this project.

- `save_quantized` / `load_quantized` persist a model whose decoder linears are
  `QuantLinear`s: the dequantized weights as an ordinary transformers checkpoint
  (any tool can load it and gets the fake-quant function), plus
  `qparams.safetensors` (step sizes and zero points) and `quantization.json`
  (the scheme), from which the exact QuantLinear modules are rebuilt.
  A trainable QuantLinear's float weight (what Block-AP starts from and what
  its full-precision targets use) is kept in `float_weights.safetensors`; a
  frozen one (`QuantLinear.freeze()`) is restored frozen, bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.models.arch import get_module, iter_block_linears, mapping_for, set_module
from quant.models.hub import atomic_dir
from quant.modules.linear import QuantLinear
from quant.modules.runtime import apply_runtime_quantizers
from quant.numerics import grid as P

QPARAMS_FILE = "qparams.safetensors"
FLOAT_WEIGHTS_FILE = "float_weights.safetensors"
SCHEME_FILE = "quantization.json"


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a causal LM and its tokenizer from a local directory written by this project."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if path is not None and (Path(path) / SCHEME_FILE).exists():
        _restore_quant_linears(model, Path(path))
        scheme = read_scheme(path)
        if scheme.activation is not None or scheme.kv_cache is not None:
            apply_runtime_quantizers(model, scheme)  # activations / KV cache: not in the weights
    return model, tokenizer


def source_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint's float weights are stored in (config.json `dtype`, older
    `torch_dtype`; float32 when absent). Stages whose float weights later stages train or
    take full-precision targets from load in this precision, not in the compute dtype."""
    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"{Path(path) / 'config.json'}: dtype={name!r} is not one of {list(table)}")
    return table[name]


# ---------------------------------------------------------------------------
# Quantized checkpoints


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def save_quantized(model: nn.Module, tokenizer, scheme: QuantScheme, out: str | Path, extra: dict | None = None) -> Path:
    """Save a model with QuantLinear layers (atomically): dequantized checkpoint + qparams + scheme."""
    out = Path(out)
    qparams: dict[str, torch.Tensor] = {}
    float_weights: dict[str, torch.Tensor] = {}
    layers = dict(quant_linears(model))
    for name, ql in layers.items():
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
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            save_file(qparams, str(tmp / QPARAMS_FILE))
            if float_weights:
                save_file(float_weights, str(tmp / FLOAT_WEIGHTS_FILE))
            frozen = sorted(n for n, ql in layers.items() if ql.frozen)
            meta = {"scheme": scheme.to_dict(), "layers": sorted(layers), "frozen": frozen, **(extra or {})}
            (tmp / SCHEME_FILE).write_text(json.dumps(meta, indent=2))
    finally:
        for name, ql in layers.items():
            set_module(model, name, ql)
    return out


def read_scheme(path: str | Path) -> QuantScheme | None:
    f = Path(path) / SCHEME_FILE
    if not f.exists():
        return None
    return QuantScheme.from_dict(json.loads(f.read_text())["scheme"], "scheme")


def _restore_quant_linears(model: nn.Module, path: Path) -> None:
    """Rebuild QuantLinear modules from the saved integer weights, step sizes and zero
    points (exact, whatever dtype the dequantized checkpoint was stored in)."""
    meta = json.loads((path / SCHEME_FILE).read_text())
    scheme = QuantScheme.from_dict(meta["scheme"], "scheme")
    if scheme.weight is None:  # W16: nothing to rebuild (activation/KV-only schemes)
        return
    qparams = load_file(str(path / QPARAMS_FILE))
    floats = load_file(str(path / FLOAT_WEIGHTS_FILE)) if (path / FLOAT_WEIGHTS_FILE).exists() else {}
    frozen = set(meta.get("frozen", ()))
    g = scheme.weight.group_size
    for name in meta["layers"]:
        lin = get_module(model, name)
        ql = QuantLinear.from_linear(lin, scheme.weight, name)
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


def quantizable_linears(model: nn.Module, scheme: QuantScheme) -> list[tuple[str, nn.Linear]]:
    """Every decoder linear (plus lm_head if the scheme says so), checked against the scheme
    before any work starts."""
    mapping = mapping_for(model)
    out = [(name, mod) for name, _, _, mod in iter_block_linears(model, mapping)]
    if scheme.quantize_lm_head:
        out.append((mapping.lm_head, get_module(model, mapping.lm_head)))
    if scheme.weight is not None:
        for name, mod in out:
            in_features = mod.in_features
            scheme.weight.check_layer(name, in_features)
    return out
