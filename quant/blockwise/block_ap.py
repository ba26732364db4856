"""Block-AP (EfficientQAT): block-wise training of all weights and quantizer parameters.

For each decoder block in order, the block's float weights (every parameter of
the block: linears, norms, biases) and its quantizers' step sizes and zero
points train together to minimise the MSE between the quantized block's output
and the full-precision block's output, with AdamW (no weight decay), separate
learning rates for weights and quantization parameters, and a cosine schedule
(floor lr/20, as in the reference). As in the paper, the *inputs* of block i+1
are recomputed through the trained quantized block i (quantized chain) while
the *targets* come from the full-precision chain. At the end every QuantLinear
is frozen on its integer grid (`QuantLinear.freeze()`).

This module is only the per-block math; capture, caches, prefetch, the block
loop, resume, keeping the better of init/trained and the final freeze are the
engine's (quant.blockwise.engine).

Design notes
- Host batches are contiguous slices of the caches (the batch *order* is
  shuffled per epoch, the batch composition is fixed), fetched one step ahead;
  losses stay on the device and are read once per epoch, so a training step has
  no host synchronisation. A non-finite epoch loss stops the run naming the
  block and the first non-finite step.

Not implemented from the reference: its early stopping and fp16 loss scaling
(bf16 needs none); the val loss is computed once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quant.blockwise.cache import ActivationCache, Prefetcher
from quant.blockwise.engine import (
    BlockData,
    BlockDivergedError,
    BlockMethod,
    BlockwiseContext,
    BlockwiseEngine,
    BlockwiseResult,
    EngineOptions,
    SubSteps,
)
from quant.blockwise.passes import first_nonfinite, make_loss_fn
from quant.config import ConfigError
from quant.config.scheme import integer_weights_only
from quant.methods import register


@dataclass(frozen=True)
class BlockAPOptions(EngineOptions):
    epochs: int = 2
    batch_size: int = 2
    weight_lr: float | None = None  # null: 2e-5 at <= 2 bits, 1e-5 above (paper)
    qparam_lr: float = 1e-4
    min_lr_ratio: float = 0.05  # cosine floor (reference: lr / 20)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs} must be >= 1")
        for name in ("weight_lr", "qparam_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name}={v} must be a positive learning rate")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")

    def weight_lr_for(self, bits: int) -> float:
        return self.weight_lr if self.weight_lr is not None else (2e-5 if bits <= 2 else 1e-5)


def _param_groups(block: nn.Module, weight_lr: float, qparam_lr: float) -> list[dict[str, Any]]:
    qparams, weights = [], []
    for name, p in block.named_parameters():
        (qparams if name.rpartition(".")[2] in ("scale", "zero_point") else weights).append(p)
    return [{"params": weights, "lr": weight_lr, "name": "weights"},
            {"params": qparams, "lr": qparam_lr, "name": "qparams"}]


def fit_block(block: nn.Module, loss_fn: Callable, inputs: ActivationCache, targets: ActivationCache,
              opt: BlockAPOptions, weight_lr: float, qparam_lr: float, seed: int, prefetch: Prefetcher,
              val_fn: Callable[[], float] | None = None, name: str = "block") -> dict[str, Any]:
    """AdamW (wd 0) + cosine over `opt.epochs` epochs of (inputs -> targets) batches.

    Batches are contiguous slices in a seeded random order, fetched one step
    ahead (an epoch's order is handed to the prefetcher whole, so disk caches
    are read ahead on a thread); the loss accumulates on the device and is read
    once per epoch."""
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
        step_losses = torch.zeros(n_batches, device=inputs.device)  # to name a diverging step
        plan = [slice(o, o + bs) for o in order]  # known up front: disk caches are read ahead
        for k, (x, y) in enumerate(prefetch.batches(caches, plan)):
            loss = loss_fn(x, y)
            loss.backward()
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            acc += loss.detach()
            step_losses[k] = loss.detach()
        train_losses.append((acc / n_batches).item())  # one host sync per epoch
        if not math.isfinite(train_losses[-1]):
            k = first_nonfinite(step_losses)
            step = epoch * n_batches + (k if k is not None else n_batches - 1)
            raise BlockDivergedError(
                f"block_ap: {name} diverged: loss {step_losses[k if k is not None else -1].item()} at "
                f"step {step} (epoch {epoch}); nothing of this block is written; lower "
                "block_ap.steps[0].block-ap.weight_lr / qparam_lr")
        if val_fn is not None:
            val_losses.append(val_fn())
    block.eval()
    return {"train_loss": train_losses, "val_loss": val_losses}


class BlockAPStep(BlockMethod):
    """Block-AP's per-block math for the engine."""

    name = "block-ap"

    def __init__(self, options: BlockAPOptions, bits: int) -> None:
        self.opt = options
        self.weight_lr, self.qparam_lr = options.weight_lr_for(bits), options.qparam_lr
        self._step_fn: Callable | None = None
        self._for: nn.Module | None = None

    def train_block(self, workspace: nn.Module, data: BlockData, block: int,
                    substeps: SubSteps) -> dict[str, Any]:
        if self._for is not workspace:  # one compiled step for every block of the run
            self._step_fn = make_loss_fn(workspace, data.kwargs, data.device, data.amp, data.compile)
            self._for = workspace
        return fit_block(workspace, self._step_fn, data.inputs, data.targets, self.opt, self.weight_lr,
                         self.qparam_lr, data.seed, data.prefetch, data.val_loss, f"block {block}")


class BlockAP(BlockwiseEngine):
    """The engine running Block-AP (lifecycle and state() as BlockwiseEngine)."""

    def __init__(self, model: nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor,
                 options: BlockAPOptions, ctx: BlockwiseContext, bits: int) -> None:
        super().__init__(model, train_ids, val_ids, BlockAPStep(options, bits), options, ctx)


@register("block-ap", kind="blockwise", options=BlockAPOptions, check=integer_weights_only)
def block_ap(model: nn.Module, options: BlockAPOptions, ctx: BlockwiseContext) -> BlockwiseResult:
    """Block-AP (EfficientQAT): every block's weights and qparams trained on the block-output MSE."""
    train_ids, val_ids = ctx.data()
    return BlockAP(model, train_ids, val_ids, options, ctx, ctx.bits).run()
