"""Block-AP (EfficientQAT): block-wise training of all weights and quantizer parameters.

For each decoder block in order, the block's float weights (every parameter of
the block: linears, norms, biases) and its quantizers' step sizes and zero
points train together to minimise the MSE between the quantized block's output
and the full-precision block's output, with AdamW (no weight decay), separate
learning rates for weights and quantization parameters, and a cosine schedule
(floor lr/20, as in the reference). As in the paper, the *inputs* of block i+1
are recomputed through the trained quantized block i (quantized chain) while
the *targets* come from the full-precision chain. At the end every QuantLinear
is frozen on its integer grid (`QuantLinear.freeze()`), so the fake-quant model
and integer weights + step sizes + zero points are one and the same function.

Design notes
- Inputs of block 0 are captured with a forward pre-hook while the decoder runs
  with its layer list cut to block 0 (no exception unwinds the forward).
- One block on the accelerator at a time: the model stays on the host in fp32;
  a single device-resident *workspace* block receives each block's weights,
  trains (fp32 master weights, bf16 autocast on GPU) and hands them back.
  Reusing one module object lets `torch.compile` compile the training step
  once for all blocks. The full-precision block (QuantLinears replaced by plain
  linears holding the float weights) visits the device only to produce targets.
- Cached activations ([N, L, D] inputs of the quantized chain, and the
  full-precision chain, whose outputs are the targets) live on the device, in
  pinned host memory, or in memory-mapped files on disk (`cache`). Host batches
  are contiguous slices of pinned memory (the batch *order* is shuffled per
  epoch, the batch composition is fixed), copied with non_blocking copies on a
  side stream one step ahead; losses stay on the device and are read once per
  epoch, so a training step has no host synchronisation.
- Resume: after each block its trained state is written as safetensors plus a
  small `state.json` (blocks done, next block, losses). A restarted run with the
  same fingerprint reloads the finished blocks, recomputes both activation
  chains through them (forward only, same batches, so bitwise equal on CPU) and
  continues with the next unfinished block.

Not implemented from the reference: its early stopping and fp16 loss scaling
(bf16 needs none); the val loss is computed once per epoch.
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
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from quant.config import Config, ConfigError
from quant.config.registry import Registry
from quant.models.arch import ArchMapping, decoder_layers, get_module, mapping_for, set_module
from quant.modules.linear import QuantLinear
from quant.modules.rotation import drop_key_quantizers, move_input_rotation

log = logging.getLogger("quant.blockwise.block_ap")

BLOCKWISE = Registry("block_ap", modules=("quant.blockwise.block_ap",))
STATE_FILE = "state.json"


def blockwise_methods() -> Registry:
    """The block-wise registry with every method module imported."""
    return BLOCKWISE.discover()


@dataclass(frozen=True)
class BlockAPOptions(Config):
    epochs: int = 2
    batch_size: int = 2
    weight_lr: float | None = None  # null: 2e-5 at <= 2 bits, 1e-5 above (paper)
    qparam_lr: float = 1e-4
    min_lr_ratio: float = 0.05  # cosine floor (reference: lr / 20)
    cache: Literal["gpu", "cpu", "disk"] = "cpu"  # where cached activations live
    cache_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile of the block step (auto: on GPU)
    amp: bool = True  # bf16 autocast on GPU (master weights stay fp32)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")
        for name in ("weight_lr", "qparam_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name}={v} must be a positive learning rate")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")

    def weight_lr_for(self, bits: int) -> float:
        return self.weight_lr if self.weight_lr is not None else (2e-5 if bits <= 2 else 1e-5)


@dataclass
class BlockwiseContext:
    device: torch.device
    work_dir: Path  # checkpoints + state.json (resume)
    seed: int = 0
    fingerprint: str = ""  # a different fingerprint discards old checkpoints
    on_block: Callable[[int, dict[str, Any]], None] | None = None


@dataclass
class BlockAPResult:
    blocks: int
    resumed_at: int
    per_block: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Activation cache


class ActivationCache:
    """[N, L, D] activations on the device, in pinned host memory, or memory-mapped on disk."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, where: str, device: torch.device,
                 path: Path | None = None) -> None:
        self.device, self.where = device, where
        if where == "gpu":
            self.data = torch.empty(shape, dtype=dtype, device=device)
        elif where == "disk":
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            numel = math.prod(shape)
            with open(path, "wb") as f:
                f.truncate(numel * torch.empty((), dtype=dtype).element_size())
            self.data = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        else:
            pin = device.type == "cuda"
            self.data = torch.empty(shape, dtype=dtype, pin_memory=pin)

    def __len__(self) -> int:
        return self.data.shape[0]

    def get(self, i: int, j: int, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Rows [i, j) on the device (non_blocking from pinned memory)."""
        x = self.data[i:j]
        return x.to(self.device, non_blocking=x.is_pinned())

    def put(self, i: int, x: torch.Tensor) -> None:
        self.data[i : i + x.shape[0]].copy_(x, non_blocking=False)

    def copy_from(self, other: ActivationCache) -> None:
        self.data.copy_(other.data)


class Prefetcher:
    """Copies the next batch on a side CUDA stream while the current one computes."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def issue(self, caches: list[ActivationCache], i: int, j: int):
        if self.stream is None:
            return [c.get(i, j) for c in caches], None
        with torch.cuda.stream(self.stream):
            out = [c.get(i, j) for c in caches]
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return out, ev

    @staticmethod
    def wait(handle) -> list[torch.Tensor]:
        out, ev = handle
        if ev is not None:
            cur = torch.cuda.current_stream()
            cur.wait_event(ev)
            for t in out:
                t.record_stream(cur)
        return out


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
    its float weight (the function Block-AP reconstructs)."""
    fp = copy.deepcopy(block)
    for name, m in list(fp.named_modules()):
        if isinstance(m, QuantLinear):
            if m.frozen:
                raise RuntimeError(f"{name} is frozen: its float weight is gone; Block-AP needs "
                                   "the calibrated (trainable) model")
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                            device=m.weight.device, dtype=m.weight.dtype)
            lin.weight = m.weight
            if m.bias is not None:
                lin.bias = m.bias
            move_input_rotation(m, lin)  # QuaRot's online rotation is part of the fp function
            set_module(fp, name, lin)
    drop_key_quantizers(fp)  # QuaRot: keys rotated after RoPE, but not quantized, in the target
    return fp


def _call(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def run_block(block: nn.Module, src: ActivationCache, dst: ActivationCache, kwargs: dict[str, Any],
              batch_size: int, amp: bool) -> None:
    """dst[i] = block(src[i]) for every sample, in batches (dst may be src)."""
    device = src.device
    for i in range(0, len(src), batch_size):
        with _autocast(device, amp):
            y = _call(block, src.get(i, i + batch_size), kwargs)
        dst.put(i, y.to(dst.data.dtype))


def _param_groups(block: nn.Module, weight_lr: float, qparam_lr: float) -> list[dict[str, Any]]:
    qparams, weights = [], []
    for name, p in block.named_parameters():
        (qparams if name.rpartition(".")[2] in ("scale", "zero_point") else weights).append(p)
    return [{"params": weights, "lr": weight_lr, "name": "weights"},
            {"params": qparams, "lr": qparam_lr, "name": "qparams"}]


def make_loss_fn(block: nn.Module, kwargs: dict[str, Any], device: torch.device, amp: bool,
                 compile: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(x, y) = MSE(block(x), y) in fp32, optionally through torch.compile (one graph for
    fake-quant, the block and the loss, so fake-quant fuses into a few kernels)."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _autocast(device, amp):
            out = _call(block, x, kwargs)
        return F.mse_loss(out.float(), y.float())

    return torch.compile(loss, dynamic=False) if compile else loss


def fit_block(block: nn.Module, loss_fn: Callable, inputs: ActivationCache, targets: ActivationCache,
              opt: BlockAPOptions, weight_lr: float, qparam_lr: float, seed: int, prefetch: Prefetcher,
              val_fn: Callable[[], float] | None = None, name: str = "block") -> dict[str, Any]:
    """AdamW (wd 0) + cosine over `opt.epochs` epochs of (inputs -> targets) batches.

    Batches are contiguous slices in a seeded random order, fetched one step
    ahead; the loss accumulates on the device and is read once per epoch."""
    block.train()
    fused = inputs.device.type == "cuda"
    optimizer = torch.optim.AdamW(_param_groups(block, weight_lr, qparam_lr), weight_decay=0.0,
                                  fused=fused or None)
    bs = opt.batch_size
    n_batches = len(inputs) // bs
    if n_batches < 1:
        raise ConfigError(f"block_ap: {len(inputs)} training samples make no batch of {bs}")
    total, floor = opt.epochs * n_batches, opt.min_lr_ratio
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * s / total)))
    caches = [inputs, targets]
    train_losses, val_losses = [], []
    for epoch in range(opt.epochs):
        g = torch.Generator().manual_seed(seed + epoch)
        order = (torch.randperm(n_batches, generator=g) * bs).tolist()
        acc = torch.zeros((), device=inputs.device)
        pending = prefetch.issue(caches, order[0], order[0] + bs)
        for k in range(n_batches):
            x, y = Prefetcher.wait(pending)
            if k + 1 < n_batches:
                pending = prefetch.issue(caches, order[k + 1], order[k + 1] + bs)
            loss = loss_fn(x, y)
            loss.backward()
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            acc += loss.detach()
        train_losses.append((acc / n_batches).item())  # one host sync per epoch
        if val_fn is not None:
            val_losses.append(val_fn())
        if not math.isfinite(train_losses[-1]):
            raise RuntimeError(f"block_ap: {name} loss became {train_losses[-1]} in epoch {epoch}; "
                               "lower block_ap.options.weight_lr / qparam_lr")
    block.eval()
    return {"train_loss": train_losses, "val_loss": val_losses}


# ---------------------------------------------------------------------------
# The block-wise loop


class BlockAP:
    """Lifecycle: created -> captured -> training (block k next) -> finished; `state()` shows it."""

    def __init__(self, model: nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor,
                 options: BlockAPOptions, ctx: BlockwiseContext, bits: int) -> None:
        self.model, self.opt, self.ctx = model, options, ctx
        self.mapping = mapping_for(model)
        self.layers = decoder_layers(model, self.mapping)
        self.train_ids, self.val_ids = train_ids, val_ids
        self.weight_lr, self.qparam_lr = options.weight_lr_for(bits), options.qparam_lr
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
        self._step_fn: Callable | None = None
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
            self._step_fn = make_loss_fn(self.workspace, self.kwargs, self.ctx.device, self.amp,
                                         self.compile)
            self._eval_fn = make_loss_fn(self.workspace, self.kwargs, self.ctx.device, self.amp, False)
        with torch.no_grad():
            for (n, w), (_, b) in zip(self.workspace.state_dict().items(), block.state_dict().items(),
                                      strict=True):
                assert w.shape == b.shape, n
                w.copy_(b)

    @torch.no_grad()
    def val_loss(self) -> float:
        """Mean MSE of the workspace block on the validation samples (one host sync)."""
        if not len(self.val_ids):
            return float("nan")
        total = torch.zeros((), device=self.ctx.device)
        bs = self.opt.batch_size
        for i in range(0, len(self.q_val), bs):
            x, y = self.q_val.get(i, i + bs), self.fp_val.get(i, i + bs)
            total += self._eval_fn(x, y) * x.shape[0]
        return (total / len(self.q_val)).item()

    def train_block(self, i: int) -> dict[str, Any]:
        """Train block i on (quantized-chain inputs -> full-precision outputs)."""
        if self.phase not in ("captured", "training") or i != self.next_block:
            raise RuntimeError(f"train_block({i}) in phase {self.phase!r} with next block {self.next_block}")
        self.phase = "training"
        t0 = time.time()
        self._advance_fp(i)  # fp_* now hold block i's full-precision outputs: the targets
        self._load_workspace(i)
        info: dict[str, Any] = {"block": i, "val_loss_init": self.val_loss()}
        info.update(self._fit(i))
        with torch.no_grad():  # hand the trained weights back to the host model
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
        if self.ctx.on_block:
            self.ctx.on_block(i, info)
        return info

    def _fit(self, i: int) -> dict[str, Any]:
        return fit_block(self.workspace, self._step_fn, self.q_train, self.fp_train,
                         self.opt, self.weight_lr, self.qparam_lr,
                         self.ctx.seed * 1000003 + i * 1009, self.prefetch, self.val_loss, f"block {i}")

    # -- whole run ---------------------------------------------------------

    def run(self) -> BlockAPResult:
        self.capture()
        start = self.resume()
        for i in range(start, len(self.layers)):
            info = self.train_block(i)
            log.info("block_ap: block %d/%d val mse %.3g -> %.3g (%.1fs)", i + 1, len(self.layers),
                     info["val_loss_init"], info["val_loss"][-1], info["seconds"])
        self.finish()
        return BlockAPResult(len(self.layers), start, self.per_block)

    def finish(self) -> None:
        """Freeze every QuantLinear on its integer grid; release the device."""
        if self.next_block != len(self.layers):
            raise RuntimeError(f"finish() with blocks {self.next_block}..{len(self.layers) - 1} untrained")
        for m in self.model.modules():
            if isinstance(m, QuantLinear):
                m.freeze()
        self.workspace = self._step_fn = self._eval_fn = None
        self.fp_train = self.q_train = self.fp_val = self.q_val = None  # type: ignore[assignment]
        self.phase = "finished"


@BLOCKWISE.register("block-ap", BlockAPOptions)
def block_ap(model: nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor, options: BlockAPOptions,
             ctx: BlockwiseContext, bits: int) -> BlockAPResult:
    """Run Block-AP over every decoder block of `model` (in place; model on the host, fp32)."""
    return BlockAP(model, train_ids, val_ids, options, ctx, bits).run()
