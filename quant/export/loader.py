"""Loading a packed checkpoint (compressed-tensors `pack-quantized` or GPTQ v2) into a
model whose quantized linears are `PackedLinear`s.

The model is built from its config; the quantized layers (every decoder linear of
the architecture mapping, plus lm_head when the checkpoint says so) are read by the
format's exporter (`load_layer`), every other tensor must match the model's own
state dict. A missing, mis-shaped or unexpected tensor is a `CheckpointError` naming
it; nothing is loaded half-way (the model is only returned when everything matched).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from quant.config import ConfigError
from quant.export.base import CheckpointError, exporter
from quant.models.arch import (
    get_module,
    iter_block_linears,
    mapping_for,
    mapping_for_type,
    set_module,
)
from quant.models.moe import prepare_model

QUANT_METHODS = {"compressed-tensors": "compressed-tensors", "gptq": "gptq"}


def packed_format(path: str | Path) -> str | None:
    """The export format of a packed checkpoint directory, or None for anything else."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return QUANT_METHODS.get(qc.get("quant_method"))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def model_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under the model's module names: transformers' own renamings of this family's
    checkpoint names (Mixtral's experts are stored under `block_sparse_moe`, the module is `mlp`),
    the ones `save_pretrained` applied in reverse when the export was written."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return tensors
    return {apply_renamings(k, renamings): v for k, v in tensors.items()}


def load_packed(path: str | Path, dtype: torch.dtype = torch.float16, device: str = "cpu",
                backend: str = "torch"):
    """(model, tokenizer) of a packed checkpoint, computing through `backend`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    fmt = packed_format(path)
    if fmt is None:
        raise ConfigError(f"{path} is not a packed checkpoint (config.json has no quantization_config "
                          f"with quant_method in {sorted(QUANT_METHODS)})")
    exp = exporter(fmt)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    mapping_for_type(config.model_type, str(path / "config.json"))  # before any tensor is read
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prepare_model(model)  # per-expert linears in MoE blocks, named as the checkpoint names them
    tensors = model_names(model, read_tensors(path))
    mapping = mapping_for(model)
    names = [name for name, *_ in iter_block_linears(model, mapping)]
    if exp.layer_spec(qc)[2]:
        names.append(mapping.lm_head)
    consumed: set[str] = set()
    packed = {}
    for name in names:
        packed[name] = exp.load_layer(tensors, name, get_module(model, name), qc, dtype)
        consumed.update(exp.layer_keys(name))
    for name, pl in packed.items():
        set_module(model, name, pl)
    _load_rest(model, {k: v for k, v in tensors.items() if k not in consumed}, set(packed))
    model.eval().to(device)
    for pl in packed.values():
        pl.use_backend(backend)
    return model, AutoTokenizer.from_pretrained(path)


def _load_rest(model: nn.Module, rest: dict[str, torch.Tensor], packed: set[str]) -> None:
    """Every tensor that is not a packed layer's: same names and shapes as the model's."""
    prefixes = tuple(f"{n}." for n in packed)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    aliases: dict[int, list[str]] = {}  # tied weights: one tensor, several names
    for k, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(k)
    groups = {k: aliases.get(id(p), [k]) for k, p in model.named_parameters(remove_duplicate=False)}
    for k in sorted(set(rest) - set(own)):
        raise CheckpointError(f"checkpoint tensor {k!r} is not a tensor of this model")
    for k, t in own.items():
        present = [a for a in groups.get(k, [k]) if a in rest]
        if not present:
            raise CheckpointError(f"checkpoint tensor {k!r} is missing")
        got = rest[present[0]]
        if tuple(got.shape) != tuple(t.shape):
            raise CheckpointError(f"checkpoint tensor {present[0]!r} has shape {tuple(got.shape)}; "
                                  f"expected {tuple(t.shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in rest.items()}, strict=False)
