"""Saved steps of the e2e trainer: one directory per step, written atomically, no pickle.

    <work_dir>/step-XXXXXX/
        trainer.json              step, fingerprint, scheduler, history, optimizer param groups
        rng-<rank>.safetensors    each process's torch (+ CUDA) RNG state
        rng-<rank>.json           each process's Python RNG state
      one process, or DDP (every process holds the same values; the main one writes them):
        trainable.safetensors     the trained parameters
        optimizer.safetensors     the AdamW state tensors (scalars in trainer.json)
      FSDP (every process writes its own shards; quant.e2e.distributed):
        shards/                   torch.distributed.checkpoint, safetensors storage

The main process creates the directory under a temporary name, every process writes its
part, and the main process renames it once all have (a barrier in between), so a killed
run leaves either a complete step or none. All processes call `save_step` and `load_step`.

A saved step that cannot be read back (edited, truncated, another version's) is an
`InputError` naming the file and saying to delete the directory to start over: resuming
from it would be wrong, and silently starting over would hide what happened.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quant.config import InputError
from quant.e2e import distributed as D
from quant.io import atomic_dir

TRAINER_FILE = "trainer.json"
SHARDS_DIR = "shards"


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(directory / f"rng-{rank}.safetensors"))
    (directory / f"rng-{rank}.json").write_text(json.dumps(random.getstate()))


def unreadable(path: Path, reason: Any) -> InputError:
    """The error for a saved step (or a file of it) that cannot be read back."""
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    work = next((p.parent for p in (path, path.parent) if p.name.startswith("step-")), path.parent)
    return InputError(f"{path}: the saved e2e step cannot be read ({text}); delete {work} to start "
                      "the e2e stage over")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise unreadable(path, exc) from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, a missing file, I/O errors alike
        raise unreadable(path, exc) from None


def _load_rng(directory: Path, rank: int) -> None:
    tensors = _load_tensors(directory / f"rng-{rank}.safetensors")
    try:
        torch.set_rng_state(tensors["torch"])
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"])
        v, internal, gauss = _read_json(directory / f"rng-{rank}.json")
        random.setstate((v, tuple(internal), gauss))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise unreadable(directory / f"rng-{rank}.json", exc) from None


def save_step(target: Path, acc: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
              trainable: dict[str, nn.Parameter], meta: dict[str, Any], sharded: bool) -> Path:
    """Write one step to `target` (see the module docstring). `optimizer` is the torch
    optimizer itself (not accelerate's wrapper); `meta` is what the trainer keeps in json."""
    from accelerate.utils import broadcast_object_list

    main = acc.is_main_process
    with atomic_dir(target) if main else contextlib.nullcontext() as tmp:
        tmp = Path(broadcast_object_list([str(tmp) if main else None])[0])  # every process writes here
        if sharded:
            tensors, groups = D.sharded_state(model, optimizer, trainable)
            D.save_shards(tensors, str(tmp / SHARDS_DIR))
            meta = {**meta, "optimizer": {"param_groups": groups}}
        elif main:
            save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()},
                      str(tmp / "trainable.safetensors"))
            opt_t, opt_meta = _optimizer_to_files(optimizer)
            save_file(opt_t, str(tmp / "optimizer.safetensors"))
            meta = {**meta, "optimizer": opt_meta}
        _save_rng(tmp, acc.process_index)
        acc.wait_for_everyone()  # every process's files are in before the rename
        if main:
            (tmp / TRAINER_FILE).write_text(json.dumps(meta))
    return target


def read_meta(ckpt: Path) -> dict[str, Any]:
    """trainer.json of a saved step: an object with the step, fingerprint and scheduler."""
    meta = _read_json(ckpt / TRAINER_FILE)
    if not isinstance(meta, dict) or not {"step", "fingerprint", "scheduler", "history"} <= set(meta):
        raise unreadable(ckpt / TRAINER_FILE, "expected an object with step, fingerprint, scheduler, history")
    return meta


def load_step(ckpt: Path, acc: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
              trainable: dict[str, nn.Parameter], sharded: bool) -> dict[str, Any]:
    """Restore parameters, optimizer state and this process's RNG from `ckpt`; returns its meta
    (the caller restores the scheduler and its own counters from it)."""
    meta = read_meta(ckpt)
    if sharded:
        if not (ckpt / SHARDS_DIR).is_dir():
            raise RuntimeError(f"checkpoint {ckpt} holds no FSDP shards ({SHARDS_DIR}/)")
        tensors, _ = D.sharded_state(model, optimizer, trainable)  # the layout to load into
        D.load_shards(tensors, str(ckpt / SHARDS_DIR))
        D.load_sharded_state(model, optimizer, tensors, meta["optimizer"]["param_groups"])
    else:
        params = _load_tensors(ckpt / "trainable.safetensors")
        if set(params) != set(trainable):
            raise unreadable(ckpt / "trainable.safetensors", "it holds other trainable parameters than this model")
        try:
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(params[n])
            sd = _optimizer_from_files(_load_tensors(ckpt / "optimizer.safetensors"), meta["optimizer"])
            optimizer.load_state_dict(sd)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise unreadable(ckpt / "optimizer.safetensors", exc) from None
    _load_rng(ckpt, acc.process_index)
    return meta
