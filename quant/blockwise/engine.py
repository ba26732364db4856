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
  full-precision weights) is a second device-resident workspace, built once and loaded
  with each block's full-precision weights, its linear weights cast to bf16 once when
  amp is on: autocast would cast them for every batch, to the same values (a
  round to nearest), so the targets are the same numbers, made faster; the
  norms stay fp32 as under autocast.
- Two activation chains: the *targets* of block i come from the full-precision
  chain, its *inputs* from the quantized chain (block i-1 as trained). Cached
  activations ([N, L, D]) live on the device, in pinned host memory or in files
  on disk (quant.blockwise.cache), each where `cache` and the cache planner put
  it (quant.blockwise.planner: `auto` measures the free GPU memory, host memory
  and disk and says in the log where each cache went and why).
- The full-precision function is each QuantLinear's `full_precision_weight()`: its
  float weight, or the reference weight kept by a quantizer that moved the float
  weight onto the grid (GPTQ; quant.modules.linear), so training after GPTQ starts
  at GPTQ's solution and aims at the original model. A dense block's workspace
  drops the reference weights (its targets come from the full-precision workspace;
  a copy in the trained one would be a third copy on the device); an MoE block's
  workspace keeps them (it computes its own targets, below). A model whose every
  trainable linear of block 0 lies on its grid with no reference weight is refused
  before any work: its targets would be its own quantized outputs (a zero loss).
- Forward-only passes (targets, next inputs, validation losses) are pipelined
  like training steps: the next batch is fetched on a side stream (read ahead
  on a thread from disk), results go back to pinned memory without waiting
  (one synchronisation per pass) or to disk through a writer thread, and with
  `compile` the block call is compiled once for all blocks.
- Keep the better state: the validation loss of the block as it came in
  (`val_loss_init`) and as trained (`val_loss_trained`) are both measured; when
  training made it a little worse the engine warns and keeps the incoming state
  (`kept: init`), else `kept: trained`. Far worse (more than
  `ctx.max_val_mse_ratio` times the incoming MSE, 2 by default: the learning rate is
  wrong, and a run that quietly hands on its input is no result) fails the run with
  `TrainingDivergedError` before the block is written. Without validation samples the
  trained state is kept.
- Resume: after each block its state is written as safetensors plus a small
  `state.json` (fingerprint, blocks done, per-block metrics). A restarted run
  with the same fingerprint reloads the finished blocks, recomputes both chains
  through them (forward only, same batches, so bitwise equal on CPU) and
  continues with the next block. A method may also save resumable sub-steps
  inside a block (`SubSteps`); they are discarded once the block is done.
- Each block runs with its own keyword inputs (`layer_kwargs`): families that mix
  sliding-window and full attention (Gemma 2/3) give their blocks different masks and
  RoPE; blocks of different structure (Qwen3-MoE's dense `mlp_only_layers`) get a
  workspace of their own structure.
- Mixture-of-experts blocks: the full-precision workspace is not built. The targets of
  block i are computed by the workspace itself, loaded with block i as it comes in and
  run with its quantizers bypassed (`passes.full_precision`), which is the function the
  separate copy would compute. So the device holds each expert once (the workspace's fp32
  master weights and, under Block-AP, their gradients and AdamW state; TesseraQ adds its
  soft-rounding copy): one full-precision and one quantized copy at most, never the
  three a dense block's workspaces make. An expert that no training token reaches gets
  no gradient and keeps its calibrated state; `experts_without_tokens` counts them.
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

from quant.blockwise import planner
from quant.blockwise.cache import ActivationCache, Prefetcher
from quant.blockwise.passes import (
    capture_block_inputs,
    cast_linears,
    float_block,
    forward_pass,
    full_precision,
    layer_kwargs,
    load_float_weights,
    make_forward_fn,
    make_loss_fn,
    mean_loss,
    on_grid_without_reference,
    reference_keys,
    same_structure,
)
from quant.config import Config, ConfigError, InputError, TrainingDivergedError
from quant.config.scheme import QuantScheme
from quant.models.arch import decoder_layers, mapping_for
from quant.modules.linear import QuantLinear, drop_reference_weights

log = logging.getLogger("quant.blockwise")

STATE_FILE = "state.json"


def unreadable(path: Path, reason: Any) -> InputError:
    """The error for a file of the saved block-wise state that cannot be read back."""
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return InputError(f"{path}: the saved block-wise state cannot be read ({text}); delete {path.parent} to "
                      "start the stage over")


class BlockDivergedError(TrainingDivergedError):
    """Training of a block produced a non-finite loss; nothing of that block is written.
    A TrainingDivergedError (a ConfigError): one line and exit 2, like e2e's."""


@dataclass(frozen=True)
class EngineOptions(Config):
    """What every block-wise method shares: batching, cache placement, compile, precision."""

    batch_size: int = 2
    cache: Literal["auto", "gpu", "cpu", "disk"] = "auto"  # where cached activations live (auto: planner)
    cache_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile of the block step and forward passes (auto: on GPU)
    amp: bool = True  # bf16 autocast on GPU (master weights stay fp32)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")


@dataclass
class BlockwiseContext:
    """What a block-wise method (`fn(model, options, ctx)`) sees beyond the model and options."""

    device: torch.device
    work_dir: Path  # checkpoints + state.json (resume)
    seed: int = 0
    fingerprint: str = ""  # a different fingerprint discards old checkpoints
    on_block: Callable[[int, dict[str, Any]], None] | None = None
    measure: Callable[..., planner.Capacity] = planner.measure  # free memory/disk (tests fake it)
    train_ids: torch.Tensor | None = None  # [N, L] training sequences
    val_ids: torch.Tensor | None = None  # [M, L] validation sequences (may be empty)
    scheme: QuantScheme | None = None  # the model's scheme (bit width for learning rates)
    where: str = "block_ap.steps[0]"  # the step's field, for errors
    # a block whose trained validation MSE exceeds this many times its incoming MSE fails the
    # run (TrainingDivergedError); up to it the better state is kept. None: off
    max_val_mse_ratio: float | None = 2.0

    @property
    def bits(self) -> int:
        if self.scheme is None or self.scheme.weight is None:
            raise ConfigError(f"{self.where}: block-wise training needs a weight-quantized scheme")
        return self.scheme.weight.bits

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train_ids is None:
            raise ConfigError(f"{self.where}: no training sequences (ctx.train_ids)")
        val = self.val_ids if self.val_ids is not None else self.train_ids[:0]
        return self.train_ids, val


@dataclass
class BlockwiseResult:
    blocks: int
    resumed_at: int
    per_block: list[dict[str, Any]] = field(default_factory=list)
    caches: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> where, bytes, reason


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
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint or meta.get("block") != str(self.block):
                return None
            return int(meta["step"]), load_file(str(self.path)), json.loads(meta["info"])
        except Exception as exc:  # noqa: BLE001 - SafetensorError, bad metadata alike
            raise unreadable(self.path, exc) from None

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
        self.kwargs: dict[str, Any] = {}  # the current block's; updated in place (closures see it)
        self.block_kwargs: list[dict[str, Any]] = []
        self.moe = any(self.mapping.is_moe_block(b) for b in self.layers)
        self.workspace: nn.Module | None = None
        self.fp_workspace: nn.Module | None = None
        self._eval_fn: Callable | None = None
        self._q_fn: Callable | None = None
        self._fp_fn: Callable | None = None
        self.prefetch = Prefetcher(dev)
        self._check_targets()
        self.placements = self._plan()  # before any heavy work: a cache that cannot fit fails here

    def _check_targets(self) -> None:
        """Refuse a model whose full-precision targets would be its quantized outputs (module
        docstring); block 0 stands for the model (one quantizer made every block)."""
        block = self.layers[0]
        linears = [n for n, m in block.named_modules() if isinstance(m, QuantLinear) and not m.frozen]
        if linears and len(on_grid_without_reference(block)) == len(linears):
            raise ConfigError(
                f"{self.ctx.where}: every quantized linear of block 0 has its float weight on its grid "
                "and no reference weight, so the full-precision targets would be the quantized model's "
                "own outputs and training would learn nothing; re-run calibrate with this version (GPTQ "
                "keeps the full-precision weights in reference_weights.safetensors)")

    def state(self) -> dict[str, Any]:
        return {"phase": self.phase, "blocks": len(self.layers), "done": self.next_block,
                "next": self.next_block if self.next_block < len(self.layers) else None,
                "work_dir": str(self.ctx.work_dir)}

    # -- caches ------------------------------------------------------------

    def _requests(self) -> list[planner.CacheRequest]:
        """The four caches, in the planner's order of preference (read every step first)."""
        row = (self.train_ids.shape[1], self.model.config.hidden_size)
        n_tr, n_va = len(self.train_ids), len(self.val_ids)
        return [planner.CacheRequest("fp_train", n_tr, row, self.cache_dtype, True),
                planner.CacheRequest("q_train", n_tr, row, self.cache_dtype, True),
                planner.CacheRequest("fp_val", n_va, row, self.cache_dtype, False),
                planner.CacheRequest("q_val", n_va, row, self.cache_dtype, False)]

    def _plan(self) -> list[planner.Placement]:
        """Where each cache goes (options.cache, the measured room); logged with the reasons."""
        cfg, seq, reqs = self.model.config, self.train_ids.shape[1], self._requests()
        params = sum(p.numel() for p in self.layers[0].parameters())
        mlp = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        reserve = planner.step_reserve(params, self.opt.batch_size, seq, cfg.hidden_size, mlp)
        cap = self.ctx.measure(self.ctx.device, self._cache_dir(), tuple(r.name for r in reqs))
        plan = planner.plan_caches(reqs, self.opt.cache, cap, reserve, f"{self.ctx.where}.{self.method.name}.cache")
        for p in plan:
            log.info("%s: cache %s -> %s: %s", self.method.name, p.name, p.where, p.reason)
        return plan

    def _cache_dir(self) -> Path:
        return self.ctx.work_dir / "cache"

    def cache_placements(self) -> dict[str, dict[str, Any]]:
        """Where each cache went and why (the planner's placements)."""
        return {p.name: p.to_dict() for p in self.placements}

    def _caches(self) -> None:
        made = {r.name: ActivationCache((r.rows, *r.row_shape), r.dtype, p.where, self.ctx.device,
                                        self._cache_dir() / f"{r.name}.bin")
                for r, p in zip(self._requests(), self.placements, strict=True)}
        self.fp_train, self.q_train = made["fp_train"], made["q_train"]
        self.fp_val, self.q_val = made["fp_val"], made["q_val"]

    def capture(self) -> None:
        if self.phase != "created":
            raise RuntimeError(f"capture() in phase {self.phase!r}; it runs once, first")
        self._caches()
        dev, bs = self.ctx.device, self.opt.batch_size
        capture_block_inputs(self.model, self.train_ids, self.fp_train, bs, dev, self.mapping, self.amp)
        self.block_kwargs = layer_kwargs(self.model, self.train_ids, dev, self.mapping)
        if len(self.val_ids):
            capture_block_inputs(self.model, self.val_ids, self.fp_val, bs, dev, self.mapping, self.amp)
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
        try:
            state = json.loads(f.read_text(encoding="utf-8"))
            ok = isinstance(state, dict) and isinstance(state.get("done"), int) and 0 <= state["done"] <= len(
                self.layers) and isinstance(state.get("per_block"), list)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise unreadable(f, exc) from None
        if not ok:
            raise unreadable(f, f"expected an object with done (0..{len(self.layers)}) and per_block")
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
            try:
                self.layers[i].load_state_dict(load_file(str(self._block_file(i))))
            except Exception as exc:  # noqa: BLE001 - SafetensorError, missing file, other keys alike
                raise unreadable(self._block_file(i), exc) from None
            self._load_workspace(i)
            self._advance_q()
        self.next_block = state["done"]
        self.per_block = state["per_block"]
        log.info("block_ap: resumed, blocks 0..%d done", self.next_block - 1)
        return self.next_block

    # -- per block ---------------------------------------------------------

    def _use_kwargs(self, i: int) -> None:
        self.kwargs.clear()
        self.kwargs.update(self.block_kwargs[i])

    def _load_fp(self, i: int) -> None:
        """The full-precision workspace holds block i's float weights (built on first use)."""
        if self.fp_workspace is not None and not same_structure(self.fp_workspace, float_block(self.layers[i])):
            self.fp_workspace = None
        if self.fp_workspace is None:
            fp = float_block(self.layers[i]).to(self.ctx.device)
            self.fp_workspace = cast_linears(fp, torch.bfloat16) if self.amp else fp
            self._fp_fn = make_forward_fn(self.fp_workspace, self.kwargs, self.ctx.device, self.amp, self.compile)
        else:
            load_float_weights(self.fp_workspace, self.layers[i])

    def _advance_fp(self, i: int) -> None:
        self._use_kwargs(i)
        if self.moe:  # the workspace as block i comes in, quantizers bypassed (module docstring)
            self._load_workspace(i)
            with full_precision(self.workspace):
                self._fp_passes(self._q_fn)
            return
        self._load_fp(i)
        self._fp_passes(self._fp_fn)

    def _fp_passes(self, fn: Callable) -> None:
        forward_pass(fn, self.fp_train, self.fp_train, self.opt.batch_size, self.prefetch)
        if len(self.val_ids):
            forward_pass(fn, self.fp_val, self.fp_val, self.opt.batch_size, self.prefetch)

    def _advance_q(self) -> None:
        forward_pass(self._q_fn, self.q_train, self.q_train, self.opt.batch_size, self.prefetch)
        if len(self.val_ids):
            forward_pass(self._q_fn, self.q_val, self.q_val, self.opt.batch_size, self.prefetch)

    def _shared_state(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors of `block` the workspace holds: all, less a dense block's reference
        weights (module docstring)."""
        state = block.state_dict()
        if not self.moe:
            for key in reference_keys(block):
                del state[key]
        return state

    def _load_workspace(self, i: int) -> None:
        block = self.layers[i]
        self._use_kwargs(i)
        state = self._shared_state(block)
        if self.workspace is not None and not same_structure(self.workspace, state):
            self.workspace = None  # a block of another structure: a workspace of its own
        if self.workspace is None:
            ws = copy.deepcopy(block)
            if not self.moe:
                drop_reference_weights(ws)
            self.workspace = ws.to(self.ctx.device, torch.float32)
            self._eval_fn = make_loss_fn(self.workspace, self.kwargs, self.ctx.device, self.amp, False)
            self._q_fn = make_forward_fn(self.workspace, self.kwargs, self.ctx.device, self.amp, self.compile)
        with torch.no_grad():
            for (n, w), (m, b) in zip(self.workspace.state_dict().items(), state.items(), strict=True):
                assert n == m and w.shape == b.shape, (n, m)
                w.copy_(b)

    def val_loss(self) -> float:
        """Mean MSE of the workspace block on the validation samples (one host sync)."""
        return mean_loss(self._eval_fn, self.q_val, self.fp_val, self.opt.batch_size, self.prefetch)

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
        if not self.moe:  # (an MoE block's targets were computed by the loaded workspace)
            self._load_workspace(i)
        info: dict[str, Any] = {"block": i, "val_loss_init": self.val_loss()}
        substeps = self._substeps(i)
        info.update(self.method.train_block(self.workspace, self._data(i), i, substeps))
        if self.mapping.is_moe_block(self.workspace):
            info["experts_without_tokens"] = self._idle_experts()
        self._keep_better(i, info)
        with torch.no_grad():  # hand the kept weights back to the host model
            for (_, w), (_, b) in zip(self.workspace.state_dict().items(),
                                      self._shared_state(self.layers[i]).items(), strict=True):
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

    @torch.no_grad()
    def _idle_experts(self) -> int:
        """Experts of the workspace block no training token is routed to (they got no update)."""
        from quant.models.moe import count_routed

        n, bs = len(self.q_train), self.opt.batch_size
        plan = [slice(i, min(i + bs, n)) for i in range(0, n, bs)]
        with count_routed(self.workspace, self.mapping.moe.experts) as experts:
            for (x,) in self.prefetch.batches([self.q_train], plan):
                self._q_fn(x)
        idle = int((experts.routed == 0).sum())
        experts.routed = None
        return idle

    def _keep_better(self, i: int, info: dict[str, Any]) -> None:
        """Keep the trained state unless it is worse on validation than the incoming one."""
        init, trained = info["val_loss_init"], self.val_loss()
        info["val_loss_trained"] = trained
        limit = self.ctx.max_val_mse_ratio
        if limit is not None and math.isfinite(init) and not trained <= limit * init:
            raise TrainingDivergedError(
                f"{self.ctx.where}: block {i} got far worse in training: validation MSE {init:.4g} -> "
                f"{trained:.4g} (more than block_ap.max_val_mse_ratio={limit} times); nothing of this "
                f"block was written (lower the learning rates of {self.ctx.where})")
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
        return BlockwiseResult(len(self.layers), start, self.per_block, self.cache_placements())

    def finish(self) -> None:
        """Freeze every QuantLinear on its integer grid (which drops the reference weights:
        nothing trains against them any more); release the device."""
        if self.next_block != len(self.layers):
            raise RuntimeError(f"finish() with blocks {self.next_block}..{len(self.layers) - 1} untrained")
        for m in self.model.modules():
            if isinstance(m, QuantLinear):
                m.freeze()
        self.workspace = self.fp_workspace = self._eval_fn = self._q_fn = self._fp_fn = None
        self.fp_train = self.q_train = self.fp_val = self.q_val = None  # type: ignore[assignment]
        self.phase = "finished"


def reconstruct(model: nn.Module, steps, ctx: BlockwiseContext,
                path: str = "block_ap.steps") -> BlockwiseResult | None:
    """Run the block-wise `steps` of a recipe (none or one) on `model` (on the host, fp32), in
    place; None when there is no step."""
    from quant import methods
    from quant.recipe import check_steps

    steps = tuple(steps)
    check_steps("blockwise", steps, path, ctx.scheme)
    if not steps:
        return None
    (step,) = steps
    ctx.where = f"{path}[0].{step.method}"
    return methods.method(step.method, "blockwise").fn(model, step.options, ctx)
