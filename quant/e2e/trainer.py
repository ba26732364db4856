"""End-to-end trainer shared by every `e2e` method (E2E-QP here, KD-QAT in quant/kd.py).

What the trainer owns: a data loader over packed token tensors, AdamW, a
linear-warmup + cosine schedule, gradient accumulation and clipping, gradient
checkpointing, fp32 master weights with bf16 autocast, multi-process training
through `accelerate` (DDP, or FSDP2 when the Accelerator is made with
`quant.e2e.distributed.make_accelerator(strategy="fsdp")`; the processes are started
by accelerate's launcher, see tasks/e2e.py), a divergence check, and save/resume
per step. What a *method* owns: which parameters train, and the loss.

Precision: whatever dtype the stage loaded the model in (bf16 on GPU), the
trainable parameters are made fp32 before the optimizer is built (fp32 master
weights, as Block-AP keeps); the forward and backward run under autocast in
the model's half precision (bf16 on GPU, also on CPU when the model was loaded
in bf16), so frozen weights stay in half precision and matmuls run in bf16.
Training bf16 parameters directly would lose most updates: at lr 2e-5 an
AdamW step is far below a bf16 weight's rounding step.

Divergence: the loss and gradient norm are read on the host only at log
points (no sync per step; averaged over the processes, so every process logs the
same numbers and stops at the same step); a non-finite value there, or a
non-finite trainable parameter before any save, stops training with
`NonFiniteLossError` naming the stage, the step and the loss, before anything is
written.

The result is judged too, not only its finiteness: a learning rate of 1e6 trains every
number finite and the model into garbage (validation perplexity 33 -> 4e7). After the
last step, `exp(val loss after - val loss before)` must stay <= `max_val_ppl_ratio`
(2.0: for the causal-LM loss, the validation perplexity at most doubled; for KD's loss
the same bound on its exponential); else `TrainingDivergedError` (exit 2, the stage
writes nothing). Why a ratio of 2 and not "any increase": a short run at a sane rate
can end a little above where it started on a few validation rows, and that model is
still usable; a doubled perplexity never is. Without validation rows the first and
the last logged training losses are compared.

The loss hook
-------------
A method registers in `quant.methods` (kind `e2e`) with an options dataclass and a setup
function::

    @register("e2e-qp", kind="e2e", options=E2EQPOptions)
    def setup(model: nn.Module, options: E2EQPOptions, ctx: E2EContext) -> Objective: ...

`setup` prepares the student in place (E2E-QP: freeze every QuantLinear so only
step sizes train; KD: add activation/KV quantizers, load the teacher from
`ctx.teacher_dir`) and returns an `Objective`:

- `param_groups`: torch optimizer param groups, each with its own `lr`
  (`weight_decay` defaults to the trainer's). Only these parameters train and
  only these are saved in a step checkpoint.
- `loss(model, batch) -> (loss, logs)`: `model` is the student as prepared by
  accelerate (possibly DDP-wrapped or FSDP-sharded: call it, do not reach into it);
  `batch` is a dict of device tensors, at least `input_ids` [B, L] (long) and,
  when the data has it, `attention_mask` [B, L]. Return the scalar mean loss of
  this micro batch (the trainer scales it for accumulation) and a dict of
  *detached scalar tensors* to log. Never call `.item()` in a loss: the trainer
  reads logs only every `log_every` steps, so a step needs no host sync.
  The loss runs under the trainer's autocast (bf16 on GPU; see Precision).
- `frozen_modules`: modules the loss uses but that never train (a teacher). The
  trainer moves them to the device and puts them in eval mode; they are not
  wrapped by DDP or FSDP (every process holds its own copy) and not checkpointed.

Methods are found through `quant.methods.method(name, "e2e")`, so a new method is a new
module + one entry in `quant.methods.METHOD_MODULES`.

Resume: every `save_every` optimizer steps (and at the end) the trainer writes
`<work_dir>/step-XXXXXX/` atomically (quant/e2e/checkpoint.py): trainable
parameters and optimizer state (safetensors; under FSDP each process's shards
through torch.distributed.checkpoint), scheduler, every process's RNG states and
the step, then points `<work_dir>/latest` at it. A restarted run with the same
`fingerprint` (which should name the process count and strategy: a checkpoint
is resumed by the same layout) continues from there and ends with the same
parameters as an uninterrupted one (bitwise on CPU): the data order is a pure
function of (seed, epoch, position, rank). The finished model of an FSDP run is
gathered whole to the main process (`Trainer.unwrapped_model`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.config import Config, ConfigError, TrainingDivergedError
from quant.config.scheme import QuantScheme
from quant.e2e import checkpoint as ckpt
from quant.e2e import distributed as D
from quant.e2e.distributed import make_accelerator
from quant.io import write_text_atomic

log = logging.getLogger("quant.e2e.trainer")

LATEST = "latest"

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class E2EContext:
    """What a method's setup may need beyond the student model."""

    scheme: QuantScheme
    device: torch.device
    dtype: torch.dtype  # dtype of non-trainable weights (bf16 on GPU)
    teacher_dir: Path | None = None  # full-precision model directory (KD)
    seed: int = 0
    teacher: nn.Module | None = None  # or the full-precision teacher itself (in-memory API)
    where: str = "e2e.steps[0]"  # the step's field, for errors

    def has_teacher(self) -> bool:
        return self.teacher is not None or self.teacher_dir is not None

    def load_teacher(self, who: str) -> nn.Module:
        """The full-precision teacher on the CPU (the trainer moves it to the device)."""
        if self.teacher is not None:
            return self.teacher
        if self.teacher_dir is None:
            raise ConfigError(f"{who} needs the full-precision teacher model (artifacts/prepare/model)")
        from quant.checkpoint import load_quantized

        return load_quantized(self.teacher_dir, self.dtype, "cpu")[0]


@dataclass
class Objective:
    param_groups: list[dict[str, Any]]
    loss: LossFn
    frozen_modules: dict[str, nn.Module] = field(default_factory=dict)
    # Adds per-sample tensors to the training data before the loop (e.g. a teacher's
    # top-k logits, kd `teacher: topk`); they reach `loss` as keys of the batch.
    prepare_data: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


# ---------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class TrainConfig(Config):
    epochs: int = 1
    max_steps: int | None = None  # cap on optimizer steps (null = all epochs)
    batch_size: int = 4  # micro batch per process
    grad_accum: int = 1  # micro batches per optimizer step
    warmup_ratio: float = 0.03  # fraction of steps with linear warmup
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of each group's lr
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2); EfficientQAT/LLM-QAT: 0.9, 0.95
    max_grad_norm: float = 1.0  # 0 = no clipping
    grad_checkpointing: bool = True
    save_every: int = 50  # optimizer steps between checkpoints (0 = only at the end)
    log_every: int = 10
    # the run fails (nothing written) when exp(val loss after - before) exceeds this: the
    # validation perplexity more than doubled; null = off (see the module docstring)
    max_val_ppl_ratio: float | None = 2.0

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every}
        for name, v in positive.items():
            if v < 1:
                raise ConfigError(f"{name}={v} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps} must be >= 1 or null")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"adam_betas={list(self.adam_betas)} must be two numbers in [0, 1)")
        if self.max_val_ppl_ratio is not None and not self.max_val_ppl_ratio > 1.0:
            raise ConfigError(f"max_val_ppl_ratio={self.max_val_ppl_ratio} must be > 1 (2.0: the validation "
                              "perplexity may at most double) or null (off)")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.save_every < 0:
            raise ConfigError(
                f"weight_decay={self.weight_decay}, max_grad_norm={self.max_grad_norm} and "
                f"save_every={self.save_every} must be >= 0"
            )


class NonFiniteLossError(TrainingDivergedError):
    """Training diverged (a non-finite loss, gradient norm or parameter).

    A ConfigError because it follows from the inputs and settings (the run is
    deterministic): retrying the same params cannot help, so it is reported like
    a bad value, as one line naming the stage, the step and the loss."""


def no_full_step(samples: int, processes: int, cfg: TrainConfig, stage: str = "e2e") -> str | None:
    """The error when `samples` rows over `processes` make no optimizer step (None when they do)."""
    if samples // processes // (cfg.batch_size * cfg.grad_accum) >= 1:
        return None
    return (f"{stage}: {samples} training samples over {processes} process(es) "
            f"({stage}.distributed.processes) make no full step of {stage}.train.batch_size x grad_accum = "
            f"{cfg.batch_size} x {cfg.grad_accum} per process; use more {stage}.data.train_samples, "
            "a smaller batch or fewer processes")


def check_lr(lr: float, path: str) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"{path}={lr} must be a positive learning rate")


# ---------------------------------------------------------------------------
# Data


class PackedTokens(torch.utils.data.Dataset):
    """Rows of equally long packed token tensors: {"input_ids": [N, L], ...}."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        n = {k: v.shape[0] for k, v in tensors.items()}
        if "input_ids" not in tensors or len(set(n.values())) != 1:
            raise ValueError(f"expected 'input_ids' and equal first dimensions, got {n}")
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors["input_ids"].shape[0]

    def __getitem__(self, i: int) -> Batch:
        return {k: v[i] for k, v in self.tensors.items()}


class EpochSampler(torch.utils.data.Sampler):
    """Seeded permutation per epoch, sharded across ranks, starting at a sample offset.

    The order depends only on (seed, epoch), so resuming at step s replays
    exactly the samples an uninterrupted run would have seen."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.seed, self.epoch, self.rank, self.world, self.start = n, seed, epoch, rank, world, start

    def per_rank(self) -> int:
        return self.n // self.world

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + 1000003 * self.epoch))
        mine = perm[self.rank :: self.world][: self.per_rank()]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank() - self.start


def cosine_with_warmup(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward (transformers >= 5.2x names it activation
    checkpointing; older versions only have the gradient_checkpointing alias)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ---------------------------------------------------------------------------
# Precision


def _low_precision_dtype(model: nn.Module) -> torch.dtype | None:
    """bf16/fp16 when the model holds floating parameters of that dtype (loaded in half precision)."""
    low = {p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
    if len(low) > 1:
        raise ValueError(f"the model mixes half-precision dtypes {sorted(map(str, low))}")
    return low.pop() if low else None


def upcast_trainable(params) -> None:
    """fp32 master weights: every trainable half-precision parameter becomes fp32 in place.

    A bf16 parameter keeps 8 significant bits, so an AdamW update of ~lr = 2e-5
    on a weight of magnitude >~ 0.01 rounds away entirely; the fp32 master keeps
    it. Compute still runs in bf16 under autocast (matmuls cast their fp32
    weights per call), so only the trained parameters and their optimizer state
    cost fp32 memory. They stay fp32 in the saved model too (no rounding back)."""
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


# ---------------------------------------------------------------------------
# Trainer


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    train_loss: float  # mean loss over the last logging interval
    val_loss_before: float | None
    val_loss_after: float | None
    history: list[dict[str, float]]


class Trainer:
    """Lifecycle: created -> (resumed) -> fit() -> finished. `state()` says where it is."""

    def __init__(self, model: nn.Module, objective: Objective, cfg: TrainConfig, work_dir: str | Path,
                 accelerator=None, seed: int = 0, fingerprint: str = "",
                 log_fn: Callable[[int, dict[str, float]], None] | None = None, stage: str = "e2e") -> None:
        self.acc = accelerator or make_accelerator()
        self.stage = stage
        self.cfg, self.objective, self.seed, self.fingerprint = cfg, objective, seed, fingerprint
        self.work_dir = Path(work_dir)
        self.log_fn = log_fn
        self.step = 0
        self.resumed_from = 0
        self.phase = "created"
        self.history: list[dict[str, float]] = []
        for group in objective.param_groups:
            check_lr(group["lr"], f"lr of param group {group.get('name', '?')}")
            group.setdefault("weight_decay", cfg.weight_decay)
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt_ids = {id(p) for g in objective.param_groups for p in g["params"]}
        if opt_ids != {id(p) for p in self.trainable.values()}:
            raise ValueError("objective.param_groups must hold exactly the parameters with requires_grad")
        self.amp_dtype = _low_precision_dtype(model)
        if self.amp_dtype is None and self.acc.device.type == "cuda":
            self.amp_dtype = torch.bfloat16
        upcast_trainable(self.trainable.values())
        if cfg.grad_checkpointing:
            enable_checkpointing(model)
        for m in objective.frozen_modules.values():
            m.to(self.acc.device).eval().requires_grad_(False)
        model.train()
        self.sharded = D.is_sharded(self.acc)
        self._skeleton: nn.Module | None = None
        if self.sharded:  # FSDP2 shards `model` in place: keep its structure to gather into at the end
            D.set_wrap_class(self.acc, model)
            self._skeleton = D.meta_skeleton(model) if self.acc.is_main_process else None
        fused = self.acc.device.type == "cuda"
        optimizer = torch.optim.AdamW(objective.param_groups, betas=cfg.adam_betas, fused=fused or None)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        if self.sharded:  # the same names, now sharded DTensor parameters
            self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    # -- state -------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"phase": self.phase, "step": self.step, "resumed_from": self.resumed_from,
                "latest": self._latest_name()}

    def _latest_name(self) -> str | None:
        f = self.work_dir / LATEST
        if not f.exists():
            return None
        try:
            name = f.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ckpt.unreadable(f, exc) from None
        if not name.startswith("step-") or not (self.work_dir / name).is_dir():
            raise ckpt.unreadable(f, f"it names {name[:40]!r}, not a saved step directory of {self.work_dir}")
        return name

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

    def save(self) -> Path:
        """Checkpoint the current step (quant/e2e/checkpoint.py; every process takes part)."""
        name = f"step-{self.step:06d}"
        self._check_params_finite()
        meta = {"step": self.step, "fingerprint": self.fingerprint,
                "scheduler": self.scheduler.state_dict(), "history": self.history}
        ckpt.save_step(self.work_dir / name, self.acc, self.model, self._torch_optimizer(), self.trainable,
                       meta, self.sharded)
        if self.acc.is_main_process:
            write_text_atomic(self.work_dir / LATEST, name)
            for old in self.work_dir.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return self.work_dir / name

    # -- divergence ----------------------------------------------------------

    def _check_finite(self, loss: float, grad_norm: float) -> None:
        """Stop on a non-finite loss or gradient norm (called where the host has the numbers)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteLossError(
                f"{self.stage}: training diverged at step {self.step}: loss {loss}, gradient norm "
                f"{grad_norm}; nothing was saved for this step (lower {self.stage}.options.lr)")

    def _check_params_finite(self) -> None:
        """Refuse to checkpoint non-finite parameters (one device reduction per save; under
        FSDP each process checks its shards and the flags are summed over processes)."""
        bad_flags = torch.stack([~D.local(p.detach()).isfinite().all() for p in self.trainable.values()])
        if self.sharded:
            bad_flags = self.acc.reduce(bad_flags.int(), "sum")
        if bad_flags.any().item():
            bad = list(self.trainable)[int(bad_flags.nonzero()[0, 0])]
            raise NonFiniteLossError(
                f"{self.stage}: training diverged by step {self.step}: parameter {bad} is not finite; "
                f"nothing was saved (lower {self.stage}.options.lr)")

    def _autocast(self):
        """bf16 (or the model's low precision) autocast for compute; the trainable
        parameters themselves are fp32 masters (`upcast_trainable`)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.acc.device.type, dtype=self.amp_dtype)

    def _try_resume(self) -> None:
        name = self._latest_name()
        if name is None:
            return
        path = self.work_dir / name
        if ckpt.read_meta(path)["fingerprint"] != self.fingerprint:
            log.warning("ignoring checkpoint %s: it was made for other inputs or settings", path)
            return
        meta = ckpt.load_step(path, self.acc, self.model, self._torch_optimizer(), self.trainable, self.sharded)
        try:
            self.scheduler.load_state_dict(meta["scheduler"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ckpt.unreadable(path / ckpt.TRAINER_FILE, exc) from None
        self.step = self.resumed_from = meta["step"]
        self.history = meta["history"]
        self.phase = "resumed"
        log.info("resumed from %s (step %d)", path, self.step)

    def unwrapped_model(self) -> nn.Module | None:
        """The trained student as a plain module on the main process (None on the others).
        Under FSDP the parameters are gathered whole to the main process's CPU: every
        process must call this."""
        if self.sharded:
            return D.gather_full_model(self.model, self._skeleton, self.acc.is_main_process)
        if not self.acc.is_main_process:
            return None
        return self.acc.unwrap_model(self.model, keep_fp32_wrapper=False)

    # -- loop --------------------------------------------------------------

    def _loader(self, data: dict[str, torch.Tensor], epoch: int, start: int):
        sampler = EpochSampler(len(data["input_ids"]), self.seed, epoch, self.acc.process_index,
                               self.acc.num_processes, start)
        return torch.utils.data.DataLoader(PackedTokens(data), batch_size=self.cfg.batch_size,
                                           sampler=sampler, drop_last=True,
                                           pin_memory=self.acc.device.type == "cuda")

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.acc.device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate(self, data: dict[str, torch.Tensor]) -> float:
        """Mean loss over `data` (every process scores its shard; one host sync).

        Every process runs the same number of forward passes (FSDP all-gathers inside each):
        one that has no rows left in the last round scores one row with weight 0."""
        self.model.eval()
        n, bs = len(data["input_ids"]), self.cfg.batch_size
        rank, world = self.acc.process_index, self.acc.num_processes
        total = torch.zeros(2, device=self.acc.device)
        for r in range(math.ceil(n / (bs * world))):
            start = (r * world + rank) * bs
            rows = min(bs, max(0, n - start))
            batch = self._to_device({k: v[start : start + rows] if rows else v[:1] for k, v in data.items()})
            with self._autocast():
                loss, _ = self.objective.loss(self.model, batch)
            total += torch.stack([loss.float() * rows, torch.tensor(float(rows), device=self.acc.device)])
        self.model.train()
        total = self.acc.reduce(total, "sum")
        return (total[0] / total[1].clamp(min=1)).item()

    def fit(self, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor] | None = None) -> TrainResult:
        cfg = self.cfg
        if self.objective.prepare_data is not None:
            train = self.objective.prepare_data(train)
        per_rank = len(train["input_ids"]) // self.acc.num_processes
        steps_per_epoch = per_rank // (cfg.batch_size * cfg.grad_accum)
        if steps_per_epoch < 1:
            raise ConfigError(no_full_step(len(train["input_ids"]), self.acc.num_processes, cfg, self.stage))
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        warmup = int(cfg.warmup_ratio * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(total, warmup, cfg.min_lr_ratio))
        self._try_resume()
        val_before = None
        if val is not None and self.step == 0:
            val_before = self.evaluate(val)
        elif val is not None:
            val_before = next((h["val_loss_before"] for h in self.history if "val_loss_before" in h), None)
        if val_before is not None and self.step == 0:
            self.history.append({"step": 0, "val_loss_before": val_before})
        self.phase = "training"
        params = list(self.trainable.values())
        window = torch.zeros(2, device=self.acc.device)  # [loss sum, grad-norm sum] since last log
        last_loss = float("nan")
        while self.step < total:
            epoch, in_epoch = divmod(self.step, steps_per_epoch)
            micro = iter(self._loader(train, epoch, in_epoch * cfg.batch_size * cfg.grad_accum))
            for _ in range(in_epoch, steps_per_epoch):
                if self.step >= total:
                    break
                window += self._train_step(micro, params)
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == total:
                    n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                    w = self._window_mean(window, n)  # the only host sync of the interval
                    self._check_finite(w[0], w[1])
                    last_loss = w[0]
                    entry = {"step": self.step, "loss": w[0], "grad_norm": w[1],
                             "lr": self.scheduler.get_last_lr()[0]}
                    self.history.append(entry)
                    if self.log_fn and self.acc.is_main_process:
                        self.log_fn(self.step, entry)
                    window.zero_()
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == total:
                    if self.step % cfg.log_every:  # not checked at a log point just now
                        self._check_finite(*self._window_mean(window, self.step % cfg.log_every))
                    self.save()
        val_after = self.evaluate(val) if val is not None else None
        self._judge(val_before, val_after)
        self.phase = "finished"
        return TrainResult(self.step, self.resumed_from, last_loss, val_before, val_after, self.history)

    def _judge(self, val_before: float | None, val_after: float | None) -> None:
        """Refuse a result far worse than the start (see the module docstring)."""
        limit = self.cfg.max_val_ppl_ratio
        what = "validation loss"
        before, after = val_before, val_after
        if before is None:  # no validation rows: the first and last logged training losses
            losses = [h["loss"] for h in self.history if "loss" in h]
            before, after, what = (losses[0], losses[-1], "training loss") if losses else (None, None, what)
        if limit is None or before is None or after is None:
            return
        if not math.isfinite(after) or after - before > math.log(limit):
            ratio = math.exp(min(after - before, 700.0)) if math.isfinite(after) else float("inf")
            raise TrainingDivergedError(
                f"{self.stage}: training made the model far worse: {what} {before:.4f} -> {after:.4f} "
                f"(perplexity x{ratio:.3g} > {self.stage}.train.max_val_ppl_ratio={limit}); nothing was "
                f"written over the previous output (lower the learning rate of {self.stage}.steps[0])")

    def _window_mean(self, window: torch.Tensor, n: int) -> list[float]:
        """[mean loss, mean grad norm] over the last `n` steps and over all processes: every
        process logs the same numbers and stops together on a non-finite one."""
        if self.acc.num_processes > 1:
            window = self.acc.reduce(window, "mean")  # a copy
        return (window / n).tolist()

    def _train_step(self, micro: Iterator[Batch], params: list[nn.Parameter]) -> torch.Tensor:
        """One optimizer step over grad_accum micro batches; returns [loss, grad-norm] on device."""
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.acc.device)
        for k in range(cfg.grad_accum):
            batch = self._to_device(next(micro))
            sync = k == cfg.grad_accum - 1
            ctx = self.acc.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx, self._autocast():
                loss, _ = self.objective.loss(self.model, batch)
                self.acc.backward(loss / cfg.grad_accum)
            loss_sum += loss.detach().float() / cfg.grad_accum
        if cfg.max_grad_norm > 0:
            norm = D.full(self.acc.clip_grad_norm_(params, cfg.max_grad_norm))  # FSDP: a DTensor
        else:
            norm = torch.zeros((), device=self.acc.device)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss_sum, norm.detach().float().to(loss_sum.device)])



def train(model: nn.Module, steps, train_ids: torch.Tensor, val_ids: torch.Tensor, cfg: TrainConfig,
          ctx: E2EContext, work_dir: str | Path, accelerator=None, fingerprint: str = "",
          log_fn: Callable[[int, dict[str, float]], None] | None = None,
          path: str = "e2e.steps") -> tuple[TrainResult | None, nn.Module]:
    """Run the e2e `steps` of a recipe (none or one) on `model`: the method prepares the student
    and its objective, the trainer trains it. Returns (result or None, the trained model; under
    FSDP only the main process gets it, whole)."""
    from quant import methods
    from quant.recipe import check_steps

    steps = tuple(steps)
    check_steps("e2e", steps, path, ctx.scheme)
    if not steps:
        return None, model
    (step,) = steps
    ctx.where = f"{path}[0].{step.method}"
    objective = methods.method(step.method, "e2e").fn(model, step.options, ctx)
    trainer = Trainer(model, objective, cfg, work_dir, accelerator, ctx.seed, fingerprint, log_fn)
    val = {"input_ids": val_ids} if len(val_ids) else None
    result = trainer.fit({"input_ids": train_ids}, val)
    return result, trainer.unwrapped_model()
