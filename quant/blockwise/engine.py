"""The block-wise engine: input capture, activation caches, prefetch, the block loop, resume.

Block-wise methods (Block-AP, TesseraQ) differ only in how one decoder block
is trained; everything around that is here, as llmc's block-wise base class
owns input capture, caching and the block loop while its algorithms supply the
per-block math. A method is a `BlockMethod`: given the device-resident
*workspace* block (loaded with block i, QuantLinears trainable) and the block's
data, `train_block` leaves in the workspace the state that block i keeps and
returns its per-block metrics. The engine does the rest:

- Inputs of block 0 are captured with a forward pre-hook while the decoder runs
  with its layer list cut to block 0 (no exception unwinds the forward).
- One block on the accelerator at a time: the model stays on the host in fp32;
  one workspace block receives each block's weights, trains (fp32 master
  weights, bf16 autocast on GPU) and hands them back. Reusing one module object
  lets `torch.compile` compile a method's step once for all blocks. The
  full-precision block (QuantLinears replaced by plain linears holding the
  float weights) visits the device only to produce targets.
- Two activation chains: the *targets* of block i come from the full-precision
  chain, its *inputs* from the quantized chain (block i-1 as trained). Cached
  activations ([N, L, D]) live on the device, in pinned host memory, or in
  memory-mapped files (`cache`, quant.blockwise.cache); batches are fetched one
  step ahead on a side stream.
- Keep the better state: the validation loss of the block as it came in
  (`val_loss_init`) and as trained (`val_loss_trained`) are both measured; when
  training made it worse the engine warns and keeps the incoming state
  (`kept: init`), else `kept: trained`. Without validation samples the trained
  state is kept.
- Resume: after each block its state is written as safetensors plus a small
  `state.json` (fingerprint, blocks done, per-block metrics). A restarted run
  with the same fingerprint reloads the finished blocks, recomputes both chains
  through them (forward only, same batches, so bitwise equal on CPU) and
  continues with the next block. A method may also save resumable sub-steps
  inside a block (`SubSteps`); they are discarded once the block is done.
- Lifecycle: created -> captured -> training -> finished (`state()` shows it);
  `finish()` freezes every QuantLinear on its integer grid, so the fake-quant
  model and integer weights + step sizes + zero points are one function.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from quant.blockwise.cache import ActivationCache, Prefetcher
from quant.config import Config, ConfigError
from quant.config.registry import Registry
from quant.models.arch import ArchMapping, decoder_layers, get_module, mapping_for, set_module
from quant.modules.linear import QuantLinear
from quant.modules.rotation import drop_key_quantizers, move_input_rotation

log = logging.getLogger("quant.blockwise")

BLOCKWISE = Registry("block_ap", modules=("quant.blockwise.block_ap", "quant.blockwise.tesseraq"))
STATE_FILE = "state.json"


def blockwise_methods() -> Registry:
    """The block-wise registry with every method module imported."""
    return BLOCKWISE.discover()


class BlockDivergedError(RuntimeError):
    """Training of a block produced a non-finite loss; nothing of that block is written."""


@dataclass(frozen=True)
class EngineOptions(Config):
    """What every block-wise method shares: batching, cache placement, compile, precision."""

    batch_size: int = 2
    cache: Literal["gpu", "cpu", "disk"] = "cpu"  # where cached activations live
    cache_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile of the block step (auto: on GPU)
    amp: bool = True  # bf16 autocast on GPU (master weights stay fp32)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")


@dataclass
class BlockwiseContext:
    device: torch.device
    work_dir: Path  # checkpoints + state.json (resume)
    seed: int = 0
    fingerprint: str = ""  # a different fingerprint discards old checkpoints
    on_block: Callable[[int, dict[str, Any]], None] | None = None


@dataclass
class BlockwiseResult:
    blocks: int
    resumed_at: int
    per_block: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Block plumbing


def _decoder(model: nn.Module, mapping: ArchMapping) -> nn.Module:
    """The module that owns the decoder layer list (LlamaModel for LlamaForCausalLM)."""
    parent = mapping.layers.rpartition(".")[0]
    return get_module(model, parent) if parent else model


def _layers_attr(mapping: ArchMapping) -> str:
    return mapping.layers.rpartition(".")[2]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, ids: torch.Tensor, cache: ActivationCache, batch_size: int,
                         device: torch.device, mapping: ArchMapping | None = None) -> dict[str, Any]:
    """Fill `cache` with the inputs of decoder block 0 for `ids` [N, L]; return the block's
    other keyword inputs (position embeddings, mask), captured for a batch of one so that
    they broadcast over any batch size. Only the embedding part and block 0 run."""
    mapping = mapping or mapping_for(model)
    decoder, attr = _decoder(model, mapping), _layers_attr(mapping)
    layers = decoder_layers(model, mapping)
    first = layers[0]
    captured: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["hidden"] = hidden
        if "kwargs" not in captured:
            captured["kwargs"] = {k: v for k, v in kwargs.items()
                                  if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")}
        return None

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(decoder, attr, nn.ModuleList([first]))
    moved = [m for m in decoder.children() if m is not first]
    try:
        decoder.to(device)
        decoder(input_ids=ids[:1].to(device), use_cache=False)  # kwargs for a batch of one
        for i in range(0, ids.shape[0], batch_size):
            decoder(input_ids=ids[i : i + batch_size].to(device), use_cache=False)
            cache.put(i, captured["hidden"].to(cache.data.dtype))
    finally:
        handle.remove()
        setattr(decoder, attr, layers)
        for m in [*moved, first]:
            m.to("cpu")
    return captured["kwargs"]


def float_block(block: nn.Module) -> nn.Module:
    """A copy of `block` in full precision: every QuantLinear becomes a plain linear holding
    its float weight (the function block-wise training reconstructs)."""
    fp = copy.deepcopy(block)
    for name, m in list(fp.named_modules()):
        if isinstance(m, QuantLinear):
            if m.frozen:
                raise RuntimeError(f"{name} is frozen: its float weight is gone; block-wise training "
                                   "needs the calibrated (trainable) model")
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                            device=m.weight.device, dtype=m.weight.dtype)
            lin.weight = m.weight
            if m.bias is not None:
                lin.bias = m.bias
            move_input_rotation(m, lin)  # QuaRot's online rotation is part of the fp function
            set_module(fp, name, lin)
    drop_key_quantizers(fp)  # QuaRot: keys rotated after RoPE, but not quantized, in the target
    return fp


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def run_block(block: nn.Module, src: ActivationCache, dst: ActivationCache, kwargs: dict[str, Any],
              batch_size: int, amp: bool) -> None:
    """dst[i] = block(src[i]) for every sample, in batches (dst may be src)."""
    device = src.device
    for i in range(0, len(src), batch_size):
        with autocast(device, amp):
            y = call_block(block, src.get(i, i + batch_size), kwargs)
        dst.put(i, y.to(dst.data.dtype))


def make_loss_fn(block: nn.Module, kwargs: dict[str, Any], device: torch.device, amp: bool,
                 compile: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(x, y) = MSE(block(x), y) in fp32, optionally through torch.compile (one graph for
    fake-quant, the block and the loss, so fake-quant fuses into a few kernels)."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            out = call_block(block, x, kwargs)
        return F.mse_loss(out.float(), y.float())

    return torch.compile(loss, dynamic=False) if compile else loss


@torch.no_grad()
def mean_loss(loss_fn: Callable, inputs: ActivationCache, targets: ActivationCache, batch_size: int) -> float:
    """Sample-weighted mean of loss_fn over all rows (one host sync); nan without rows."""
    if not len(inputs):
        return float("nan")
    total = torch.zeros((), device=inputs.device)
    for i in range(0, len(inputs), batch_size):
        x, y = inputs.get(i, i + batch_size), targets.get(i, i + batch_size)
        total += loss_fn(x, y) * x.shape[0]
    return (total / len(inputs)).item()


def first_nonfinite(losses: torch.Tensor) -> int | None:
    """Index of the first non-finite entry of a 1-d loss record (host sync), or None."""
    bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten()
    return int(bad[0]) if len(bad) else None


# ---------------------------------------------------------------------------
# The plug-in interface


@dataclass
class BlockData:
    """What a method sees of block i: the caches and how to run the block."""

    inputs: ActivationCache  # quantized-chain inputs of block i (train)
    targets: ActivationCache  # full-precision outputs of block i (train)
    val_inputs: ActivationCache
    val_targets: ActivationCache
    kwargs: dict[str, Any]  # the block's other inputs (position embeddings, mask)
    device: torch.device
    amp: bool
    compile: bool
    seed: int  # this block's seed
    prefetch: Prefetcher
    val_loss: Callable[[], float]  # validation MSE of the *workspace* as it is now


class SubSteps:
    """Resumable sub-steps within one block: a method saves tensors after a step; a resumed run
    of the same block (same fingerprint) loads the last one. Written atomically."""

    def __init__(self, path: Path, block: int, fingerprint: str) -> None:
        self.path, self.block, self.fingerprint = path, block, fingerprint

    def save(self, step: int, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        meta = {"fingerprint": self.fingerprint, "block": str(self.block), "step": str(step),
                "info": json.dumps(info)}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, self.path)

    def load(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """(last saved step, tensors, info) or None."""
        if not self.path.exists():
            return None
        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != self.fingerprint or meta.get("block") != str(self.block):
            return None
        return int(meta["step"]), load_file(str(self.path)), json.loads(meta["info"])

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class BlockMethod:
    """Per-block math plugged into the engine."""

    name = "block-wise"

    def train_block(self, workspace: nn.Module, data: BlockData, block: int,
                    substeps: SubSteps) -> dict[str, Any]:
        """Train `workspace` (block `block`, trainable QuantLinears) on data.inputs ->
        data.targets; leave in it the state the block keeps; return per-block metrics.
        Raise BlockDivergedError naming block and step on a non-finite loss."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# The block loop


class BlockwiseEngine:
    """Lifecycle: created -> captured -> training (block k next) -> finished; `state()` shows it."""

    def __init__(self, model: nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor,
                 method: BlockMethod, options: EngineOptions, ctx: BlockwiseContext) -> None:
        self.model, self.method, self.opt, self.ctx = model, method, options, ctx
        self.mapping = mapping_for(model)
        self.layers = decoder_layers(model, self.mapping)
        self.train_ids, self.val_ids = train_ids, val_ids
        dev = ctx.device
        self.amp = options.amp and dev.type == "cuda"
        auto_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        self.cache_dtype = {"auto": auto_dtype, "float32": torch.float32,
                            "bfloat16": torch.bfloat16}[options.cache_dtype]
        self.compile = options.compile == "on" or (options.compile == "auto" and dev.type == "cuda")
        self.phase = "created"
        self.next_block = 0
        self.per_block: list[dict[str, Any]] = []
        self.kwargs: dict[str, Any] = {}
        self.workspace: nn.Module | None = None
        self._eval_fn: Callable | None = None
        self.prefetch = Prefetcher(dev)

    def state(self) -> dict[str, Any]:
        return {"phase": self.phase, "blocks": len(self.layers), "done": self.next_block,
                "next": self.next_block if self.next_block < len(self.layers) else None,
                "work_dir": str(self.ctx.work_dir)}

    # -- caches ------------------------------------------------------------

    def _caches(self) -> None:
        hidden = self.model.config.hidden_size
        dev, where = self.ctx.device, self.opt.cache
        d = self.ctx.work_dir / "cache"

        def make(name: str, n: int) -> ActivationCache:
            return ActivationCache((n, self.train_ids.shape[1], hidden), self.cache_dtype, where, dev,
                                   d / f"{name}.bin")

        n_tr, n_va = len(self.train_ids), len(self.val_ids)
        self.fp_train, self.q_train = make("fp_train", n_tr), make("q_train", n_tr)
        self.fp_val, self.q_val = make("fp_val", n_va), make("q_val", n_va)

    def capture(self) -> None:
        if self.phase != "created":
            raise RuntimeError(f"capture() in phase {self.phase!r}; it runs once, first")
        self._caches()
        dev, bs = self.ctx.device, self.opt.batch_size
        self.kwargs = capture_block_inputs(self.model, self.train_ids, self.fp_train, bs, dev, self.mapping)
        if len(self.val_ids):
            capture_block_inputs(self.model, self.val_ids, self.fp_val, bs, dev, self.mapping)
        self.q_train.copy_from(self.fp_train)
        self.q_val.copy_from(self.fp_val)
        self.phase = "captured"

    # -- resume ------------------------------------------------------------

    def _block_file(self, i: int) -> Path:
        return self.ctx.work_dir / f"block_{i:03d}.safetensors"

    def _substeps(self, i: int) -> SubSteps:
        return SubSteps(self.ctx.work_dir / f"block_{i:03d}.partial.safetensors", i, self.ctx.fingerprint)

    def _read_state(self) -> dict[str, Any] | None:
        f = self.ctx.work_dir / STATE_FILE
        if not f.exists():
            return None
        state = json.loads(f.read_text())
        if state.get("fingerprint") != self.ctx.fingerprint:
            log.warning("block_ap: %s was written for other inputs or settings; starting over", f)
            return None
        return state

    def _write_state(self) -> None:
        f = self.ctx.work_dir / STATE_FILE
        tmp = f.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps({"fingerprint": self.ctx.fingerprint, "done": self.next_block,
                                   "blocks": len(self.layers), "per_block": self.per_block}, indent=1))
        os.replace(tmp, f)

    def resume(self) -> int:
        """Reload finished blocks and replay both chains through them; returns the next block."""
        if self.phase != "captured":
            raise RuntimeError(f"resume() in phase {self.phase!r}; call capture() first")
        state = self._read_state()
        if state is None:
            return 0
        for i in range(state["done"]):
            self._advance_fp(i)  # the full-precision chain uses the weights from before training
            self.layers[i].load_state_dict(load_file(str(self._block_file(i))))
            self._load_workspace(i)
            self._advance_q()
        self.next_block = state["done"]
        self.per_block = state["per_block"]
        log.info("block_ap: resumed, blocks 0..%d done", self.next_block - 1)
        return self.next_block

    # -- per block ---------------------------------------------------------

    def _advance_fp(self, i: int) -> None:
        fp = float_block(self.layers[i]).to(self.ctx.device)
        run_block(fp, self.fp_train, self.fp_train, self.kwargs, self.opt.batch_size, self.amp)
        if len(self.val_ids):
            run_block(fp, self.fp_val, self.fp_val, self.kwargs, self.opt.batch_size, self.amp)
        del fp

    def _advance_q(self) -> None:
        run_block(self.workspace, self.q_train, self.q_train, self.kwargs, self.opt.batch_size, self.amp)
        if len(self.val_ids):
            run_block(self.workspace, self.q_val, self.q_val, self.kwargs, self.opt.batch_size, self.amp)

    def _load_workspace(self, i: int) -> None:
        block = self.layers[i]
        if self.workspace is None:
            self.workspace = copy.deepcopy(block).to(self.ctx.device, torch.float32)
            self._eval_fn = make_loss_fn(self.workspace, self.kwargs, self.ctx.device, self.amp, False)
        with torch.no_grad():
            for (n, w), (_, b) in zip(self.workspace.state_dict().items(), block.state_dict().items(),
                                      strict=True):
                assert w.shape == b.shape, n
                w.copy_(b)

    def val_loss(self) -> float:
        """Mean MSE of the workspace block on the validation samples (one host sync)."""
        return mean_loss(self._eval_fn, self.q_val, self.fp_val, self.opt.batch_size)

    def _data(self, i: int) -> BlockData:
        return BlockData(self.q_train, self.fp_train, self.q_val, self.fp_val, self.kwargs, self.ctx.device,
                         self.amp, self.compile, self.ctx.seed * 1000003 + i * 1009, self.prefetch,
                         self.val_loss)

    def train_block(self, i: int) -> dict[str, Any]:
        """Train block i on (quantized-chain inputs -> full-precision outputs)."""
        if self.phase not in ("captured", "training") or i != self.next_block:
            raise RuntimeError(f"train_block({i}) in phase {self.phase!r} with next block {self.next_block}")
        self.phase = "training"
        t0 = time.time()
        self._advance_fp(i)  # fp_* now hold block i's full-precision outputs: the targets
        self._load_workspace(i)
        info: dict[str, Any] = {"block": i, "val_loss_init": self.val_loss()}
        substeps = self._substeps(i)
        info.update(self.method.train_block(self.workspace, self._data(i), i, substeps))
        self._keep_better(i, info)
        with torch.no_grad():  # hand the kept weights back to the host model
            for (_, w), (_, b) in zip(self.workspace.state_dict().items(),
                                      self.layers[i].state_dict().items(), strict=True):
                b.copy_(w)
        self._advance_q()
        info["seconds"] = round(time.time() - t0, 3)
        self.per_block.append(info)
        self.ctx.work_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.layers[i].state_dict().items()},
                  str(self._block_file(i)))
        self.next_block = i + 1
        self._write_state()
        substeps.clear()
        if self.ctx.on_block:
            self.ctx.on_block(i, info)
        return info

    def _keep_better(self, i: int, info: dict[str, Any]) -> None:
        """Keep the trained state unless it is worse on validation than the incoming one."""
        init, trained = info["val_loss_init"], self.val_loss()
        info["val_loss_trained"] = trained
        if math.isfinite(init) and math.isfinite(trained) and trained > init:
            log.warning("%s: block %d validation MSE got worse in training (%.4g -> %.4g); keeping "
                        "the initial state of this block (check the learning rates)",
                        self.method.name, i, init, trained)
            self._load_workspace(i)  # the host model still holds the block as it came in
            info["kept"], info["val_loss_final"] = "init", init
        else:
            info["kept"], info["val_loss_final"] = "trained", trained

    # -- whole run ---------------------------------------------------------

    def run(self) -> BlockwiseResult:
        self.capture()
        start = self.resume()
        for i in range(start, len(self.layers)):
            info = self.train_block(i)
            log.info("%s: block %d/%d val mse %.3g -> %.3g, kept %s (%.1fs)", self.method.name, i + 1,
                     len(self.layers), info["val_loss_init"], info["val_loss_final"], info["kept"],
                     info["seconds"])
        self.finish()
        return BlockwiseResult(len(self.layers), start, self.per_block)

    def finish(self) -> None:
        """Freeze every QuantLinear on its integer grid; release the device."""
        if self.next_block != len(self.layers):
            raise RuntimeError(f"finish() with blocks {self.next_block}..{len(self.layers) - 1} untrained")
        for m in self.model.modules():
            if isinstance(m, QuantLinear):
                m.freeze()
        self.workspace = self._eval_fn = None
        self.fp_train = self.q_train = self.fp_val = self.q_val = None  # type: ignore[assignment]
        self.phase = "finished"
