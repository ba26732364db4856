"""Search results a calibration method saves beside its model and a re-run reuses, and what
the searching methods share: the fingerprint of the model searched, a device-synchronised clock.

AWQ's scales/clips and GPTQ's codes are safetensors files whose metadata carries a
format version, the fingerprint of the model they were searched on and the weight
scheme; `read_results` opens one and refuses a file of another version, model or
scheme before the caller changes anything.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from quant.config import ConfigError
from quant.config.scheme import WeightSpec


def spec_dict(spec: WeightSpec) -> dict:
    """The weight scheme as saved in the metadata (canonical key order)."""
    return json.loads(json.dumps(spec.to_dict(), sort_keys=True))


def read_results(path: str | Path, file_name: str, method: str, version_key: str, version: str,
                 fingerprint: str, spec: WeightSpec, where: str, missing: str, redo: str
                 ) -> tuple[Path, dict[str, str], dict[str, torch.Tensor]]:
    """(file, metadata, tensors) of a results file of `method` ("AWQ", "GPTQ"); `path` may be
    its directory. `missing` ends the does-not-exist message, `redo` the stale-file ones."""
    path = Path(path)
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise ConfigError(f"{where}.results={str(path)!r} does not exist; give {missing}")
    try:
        with safe_open(str(path), "pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        article = "an" if method[0] in "AEIOU" else "a"
        raise ConfigError(f"{path}: not {article} readable {method} results file ({exc})") from None
    if meta.get(version_key) != version:
        article = "an" if method[0] in "AEIOU" else "a"
        raise ConfigError(f"{path}: not {article} {method} results file of version {version}")
    if meta["fingerprint"] != fingerprint:
        raise ConfigError(f"{path}: {method} results of another model (fingerprint "
                          f"{meta['fingerprint']}, this model {fingerprint}); set "
                          f"{where}.results: null to {redo}")
    saved = json.loads(meta["weight_scheme"])
    if saved != spec_dict(spec):
        raise ConfigError(f"{path}: {method} results for weight scheme {saved}, this run "
                          f"quantizes {spec_dict(spec)}; set {where}.results: null")
    return path, meta, tensors


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the config's shape fields and a strided sample (~4K values) of every parameter,
    rounded to bf16 so an fp32 and a bf16 load of the same checkpoint agree."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size")
    h.update(json.dumps({k: getattr(cfg, k, None) for k in keys}).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.bfloat16).float().cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:20]


def clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done (per-block timings on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
