"""Several processes for the e2e trainer: how many, which strategy, the Accelerator, FSDP2.

The processes themselves are started by accelerate's launcher (torchrun underneath;
tasks/launch.py builds the command); this module is what each process needs.

Strategies (`DistributedConfig.strategy`):

- `ddp`: every process holds the whole student, the teacher and the AdamW state;
  gradients are averaged (DistributedDataParallel through `Accelerator.prepare`).
  Runs on GPUs (NCCL) and on the CPU (gloo). Checkpoints: the main process writes the
  trained parameters and the optimizer state (every rank holds the same values).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) through accelerate's
  `FullyShardedDataParallelPlugin`: each decoder layer (the class the architecture
  mapping finds at `layers`) is a shard unit, plus the embedding and the final norm +
  lm_head; parameters, gradients and AdamW state are split over the processes. KD on a
  7B student trains every weight: fp32 master + gradient + two AdamW moments are 16
  bytes per parameter, 108 GB, more than one GPU holds next to the teacher; two GPUs
  hold half each. GPUs only (NCCL; FSDP2 runs on gloo too, but a CPU run has no
  memory to save and accelerate does not shard on the CPU).

Precision under FSDP: parameters are all-gathered in their stored dtype (the fp32
masters of what trains, bf16 for frozen weights: `MixedPrecisionPolicy` without a
param cast), gradients are reduced in fp32, and compute runs in bf16 under the
trainer's autocast, as with one process or DDP, so every strategy trains the same
function. The usual alternative, `param_dtype=bf16`, halves the all-gather bytes but
would round the learned step sizes to bf16 inside the forward pass
(`QuantLinear` dequantizes in the step size's dtype): a different model from the
one-GPU path.

The KD teacher is not sharded: it is frozen (no gradients, no optimizer state) and
replicated on every process in the dtype it was loaded in (bf16 on GPU: 13.5 GB for
7B). Sharding it would all-gather every teacher layer on every micro batch to save
memory that matters only once the teacher alone nears a GPU (~60B parameters in
bf16 on an H200), which this stage does not support.

Checkpoints under FSDP use torch.distributed.checkpoint with its safetensors storage
(`HuggingFaceStorageWriter(save_distributed=True)`): every process writes its own
shards of the trained parameters and of the AdamW state, keyed by parameter name
(`get_state_dict` / `set_state_dict` map FSDP's DTensors to names). The default DCP
storage would keep its metadata as a pickle; this one keeps it in the safetensors
headers (JSON), so, as everywhere else here, nothing read back is unpickled.

The final model under FSDP: the full state dict is gathered to the main process on
the CPU and loaded into a copy of the student's structure made before sharding,
whose tensors lived on the meta device until then (`meta_skeleton`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from quant.config import Config, ConfigError

STRATEGIES = ("ddp", "fsdp")
PARAM_PREFIX, OPTIM_PREFIX = "param.", "optim."


@dataclass(frozen=True)
class DistributedConfig(Config):
    """`e2e.distributed`: how many training processes, and how they share the model.

    processes: 1 (this process only), N, or `auto` (one per visible GPU; 1 on the CPU).
    `batch_size` of the training config is per process, so the global batch is
    batch_size x grad_accum x processes (always a multiple of the process count)."""

    processes: int | Literal["auto"] = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        p = self.processes
        if p != "auto" and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ConfigError(f"processes={p!r} must be an integer >= 1 or 'auto' (one process per visible GPU)")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r} is not accepted; use one of {list(STRATEGIES)}")


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_processes(cfg: DistributedConfig, device: str, base_device: str = "auto",
                      path: str = "e2e.distributed") -> int:
    """The number of processes this run uses, checked against the machine before any work.

    `device` is the resolved device of the run (`cpu`, `cuda` or `cuda:N`), `base_device`
    the configured `base.device` (named in errors)."""
    on_gpu = device.startswith("cuda")
    gpus = visible_gpus() if on_gpu else 0
    n = (gpus if on_gpu else 1) if cfg.processes == "auto" else cfg.processes
    if cfg.strategy == "fsdp" and not on_gpu:
        raise ConfigError(
            f"{path}.strategy='fsdp' needs CUDA GPUs (FSDP shards over NCCL here), but this run is on the "
            f"CPU (base.device={base_device!r}); use strategy 'ddp' (gloo) on the CPU")
    if cfg.strategy == "fsdp" and n < 2:
        raise ConfigError(
            f"{path}.strategy='fsdp' shards over processes, but processes={cfg.processes!r} gives {n}; "
            "use processes >= 2 (or 'auto' on a machine with several GPUs) or strategy 'ddp'")
    if on_gpu and n > gpus:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
        raise ConfigError(
            f"{path}.processes={cfg.processes!r} asks for {n} processes, one per GPU, but {gpus} GPU(s) "
            f"are visible{where}; use at most {gpus} or 'auto'")
    if on_gpu and n > 1 and device != "cuda":
        raise ConfigError(
            f"{path}.processes={n} puts one process on each GPU, but base.device={base_device!r} pins one; "
            "use base.device 'auto' or 'cuda' (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    return n


def fsdp_plugin():
    """accelerate's FSDP2 plugin as described in the module docstring. The decoder layer
    class to wrap is set from the model by `set_wrap_class` (the model is loaded later)."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32),
        cpu_ram_efficient_loading=False,
        activation_checkpointing=False,  # the trainer's (transformers') gradient checkpointing applies
    )


def make_accelerator(device: str = "auto", strategy: str = "ddp"):
    """An Accelerator: bf16 autocast on GPU, plain fp32 on the CPU; FSDP2 when `strategy` is fsdp.

    Inside processes started by accelerate's launcher it joins their process group (NCCL
    on GPU, gloo on the CPU). A launch whose own FSDP settings contradict `strategy`
    (`accelerate launch --use_fsdp` with strategy ddp, or FSDP1) is refused."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r} is not accepted; use one of {list(STRATEGIES)}")
    cpu = device == "cpu" or not torch.cuda.is_available()
    if strategy == "fsdp":
        if cpu:
            raise ConfigError("strategy 'fsdp' needs CUDA GPUs; this run is on the CPU (use 'ddp')")
        acc = Accelerator(mixed_precision="bf16", fsdp_plugin=fsdp_plugin())
    else:
        acc = Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16")
    fsdp = acc.distributed_type == DistributedType.FSDP
    if fsdp != (strategy == "fsdp" and acc.num_processes > 1) or (fsdp and not acc.is_fsdp2):
        raise ConfigError(
            f"the launcher set up {acc.distributed_type.value} (FSDP version "
            f"{getattr(getattr(acc.state, 'fsdp_plugin', None), 'fsdp_version', None)}) but e2e.distributed.strategy="
            f"{strategy!r}; launch with `python -m tasks.e2e` (it starts the processes) instead of "
            "passing FSDP flags to accelerate")
    return acc


def is_sharded(acc: Any) -> bool:
    """True when `acc` shards the model (FSDP2)."""
    return bool(getattr(acc, "is_fsdp2", False))


def set_wrap_class(acc: Any, model: nn.Module) -> list[str]:
    """Make each decoder layer an FSDP unit: its class, found through the architecture mapping."""
    from quant.models.arch import decoder_layers

    names = sorted({type(layer).__name__ for layer in decoder_layers(model)})
    acc.state.fsdp_plugin.transformer_cls_names_to_wrap = names
    return names


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded (DTensor) tensor; a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every process calls it); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------
# FSDP: sharded checkpoints and the full model


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, names) -> tuple[dict, list[dict]]:
    """(tensors, param_groups): this process's shards of the parameters `names` and of the
    optimizer state as one flat name -> tensor dict (`param.<fqn>`, `optim.<fqn>.<key>`),
    and the optimizer's param groups (plain values, named by fqn). A collective."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    tensors = {PARAM_PREFIX + n: msd[n] for n in names}
    for fqn, state in osd["state"].items():
        for key, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"optimizer state {fqn}.{key} is a {type(v).__name__}, not a tensor")
            tensors[f"{OPTIM_PREFIX}{fqn}.{key}"] = v
    return tensors, osd["param_groups"]


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict,
                       param_groups: list[dict]) -> None:
    """Put `tensors` (as `sharded_state` names them, loaded in place) back into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    params = {k[len(PARAM_PREFIX):]: v for k, v in tensors.items() if k.startswith(PARAM_PREFIX)}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith(OPTIM_PREFIX):
            fqn, key = k[len(OPTIM_PREFIX):].rsplit(".", 1)
            state.setdefault(fqn, {})[key] = v
    set_state_dict(model, optimizer, model_state_dict=params,
                   optim_state_dict={"state": state, "param_groups": param_groups},
                   options=StateDictOptions(strict=False))  # only the trained parameters are saved


def save_shards(tensors: dict, directory: str) -> None:
    """Every process writes its shards of `tensors` under `directory` (safetensors; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(directory, save_distributed=True))


def load_shards(tensors: dict, directory: str) -> None:
    """Fill `tensors` (as `sharded_state` made them: the layout to load into) in place from `directory`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(directory))


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and persistent buffers are on the meta device
    (no memory): the structure to load the gathered state into after FSDP has sharded the
    original in place. Non-persistent buffers (not in a state dict) are copied as they are."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in m.named_buffers(recurse=False):
            if name not in m._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def gather_full_model(model: nn.Module, skeleton: nn.Module | None, is_main: bool) -> nn.Module | None:
    """The trained model, whole, on the CPU of the main process (None elsewhere; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    if skeleton is None:
        raise RuntimeError("the main process has no model skeleton to load the gathered state into")
    skeleton.load_state_dict(sd, strict=True, assign=True)
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    return skeleton
