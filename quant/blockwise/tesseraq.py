"""TesseraQ: progressive adaptive rounding and dequantisation-scale tuning, per block.

The method of Li & Panda (2024, arXiv 2410.19103), as its reference
implementation in the llmc toolkit runs it, plugged into the block-wise engine
(quant.blockwise.engine: capture, caches, resume, keep-the-better, freeze).
Per decoder block:

- Step sizes and zero points are taken once and frozen: by default the
  calibrate output's QuantLinear qparams (`qparams: init`, so RTN min-max or
  AWQ's clip-searched ranges, whatever calibrate wrote), or min-max of the
  float weight (`qparams: minmax`). The float weights do not train.
- Every weight gets a rounding variable alpha, h(alpha) = clamp(1.2 *
  sigmoid(alpha) - 0.1, 0, 1) initialised to the fractional part of W/s; the
  code is clamp(floor(W/s) + h(alpha) + z, qmin, qmax)
  (quant.numerics.rounding).
- Progressive adaptive rounding (PAR): for each threshold t_k of the schedule,
  per layer, the variables with the largest |h - 0.5| are hardened to 0 or 1
  until a fraction t_k stays soft (the t_k-quantile rule, by ranking, so the
  hardened fraction is exactly 1 - t_k up to rounding of t_k * n); then the soft
  ones train `iterations` steps with a fresh Adam (lr `lr`) on the block-output
  MSE against the full-precision block, on random batches of `batch_size`.
  After the last step every variable is hardened (alpha > 0 rounds up).
- Dequantisation-scale tuning (`tune_scale`): per group a factor 2 *
  sigmoid(v), v = 0 at start, multiplies the step size in dequantisation only
  (codes use the original step size); trained with the rounding variables by
  Adam with its own lr (`scale_lr`) and L2 weight decay `scale_weight_decay`.
- Bake: the decisions become the workspace QuantLinear's state: weight =
  (q - z) * s', scale = s' (the tuned step size), zero point = z, so the
  engine's final freeze puts exactly the codes q on the integer grid and the
  model saves, packs and loads like any Block-AP model.

Engineering: one soft-rounding copy of the workspace block lives on the device
for the whole run (compiled once on GPU); the batch indices of a step are drawn
up front from a seeded generator and the batches fetched one step ahead; the
per-iteration losses stay on the device and are read once per threshold step
(the loss mean and a non-finite check: a diverging block stops naming block,
step and iteration). After each threshold step the rounding and scale variables
are saved (engine `SubSteps`), so a killed run resumes inside the block; a
fresh optimiser per step means no optimiser state needs saving.

Differences from the reference, by choice: the hardening ranks |h - 0.5|
instead of comparing against np.quantile with interpolation (same set up to
ties, exact fractions); the scale factor is 2 * sigmoid(v) as the paper writes
it (llmc applies its rectified sigmoid there; both are 1 at v = 0); the loss is
the plain MSE; bf16 autocast on GPU instead of fp16 with a loss scaler.
Not implemented: llmc's on-the-fly loading of AWQ scales/clips (here AWQ runs
in `calibrate` and its clipped qparams arrive through `qparams: init`), the
`aug_loss` variant, and activation quantization during the reconstruction.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

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
from quant.blockwise.passes import first_nonfinite, make_loss_fn, mean_loss
from quant.config import ConfigError
from quant.config.scheme import integer_weights_only
from quant.methods import register
from quant.models.arch import get_module, set_module
from quant.modules.linear import QuantLinear
from quant.modules.rotation import move_input_rotation
from quant.numerics import grid as P
from quant.numerics.formats import IntFormat
from quant.numerics.rounding import (
    grid_split,
    hard_alpha,
    hard_codes,
    rectified_sigmoid,
    rectified_sigmoid_inverse,
    soft_dequantize,
)

# TesseraQ's published schedule (paper and reference configs, Llama-2 W2/W3/W4)
PUBLISHED_THRESHOLDS = (0.8, 0.65, 0.5, 0.43, 0.38, 0.34, 0.3, 0.27, 0.24, 0.21, 0.18, 0.15, 0.12,
                        0.10, 0.08, 0.06, 0.04, 0.02, 0.01, 0.005)


@dataclass(frozen=True)
class TesseraQOptions(EngineOptions):
    batch_size: int = 4
    thresholds: tuple[float, ...] = PUBLISHED_THRESHOLDS  # fraction left soft after each step
    iterations: int = 250  # Adam steps per threshold step
    lr: float = 1e-3  # rounding variables
    tune_scale: bool = True  # dequantisation-scale factors 2 * sigmoid(v) per group
    scale_lr: float = 1e-3
    scale_weight_decay: float = 1e-4
    qparams: Literal["init", "minmax"] = "init"  # step sizes/zero points: calibrate's, or min-max

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.thresholds
        if not t or any(not 0.0 < x < 1.0 for x in t) or any(b >= a for a, b in zip(t, t[1:], strict=False)):
            raise ConfigError(f"thresholds={list(t)} must be a non-empty, strictly decreasing list of "
                              "fractions in (0, 1) (published: 0.8, 0.65, ..., 0.005)")
        if self.iterations < 1:
            raise ConfigError(f"iterations={self.iterations} must be >= 1")
        for name in ("lr", "scale_lr"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name}={v} must be a positive learning rate")
        if not (self.scale_weight_decay >= 0 and math.isfinite(self.scale_weight_decay)):
            raise ConfigError(f"scale_weight_decay={self.scale_weight_decay} must be >= 0")


class RoundingLinear(nn.Module):
    """A QuantLinear during PAR: frozen float weight split into floor(W/s) and rounding
    variables, frozen step size and zero point, optional dequantisation-scale factors."""

    def __init__(self, ql: QuantLinear, tune_scale: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = ql.in_features, ql.out_features
        self.fmt, self.group_size = ql.spec.format, ql.spec.group_size
        dev = ql.weight.device
        n_groups = ql.scale.shape[-1]
        g = self.in_features // n_groups
        self.register_buffer("base", torch.zeros(self.out_features, n_groups, g, device=dev))
        self.register_buffer("scale", torch.ones(self.out_features, n_groups, device=dev))
        self.register_buffer("zero_point", None if ql.zero_point is None else torch.zeros_like(self.scale))
        self.register_buffer("bias", None if ql.bias is None else torch.zeros_like(ql.bias))
        self.alpha = nn.Parameter(torch.zeros_like(self.base))
        self.v = nn.Parameter(torch.zeros_like(self.scale)) if tune_scale else None
        self.input_quantizer = ql.input_quantizer
        move_input_rotation(ql, self)  # QuaRot's online rotation (a pre-hook) stays on the input

    @torch.no_grad()
    def load(self, ql: QuantLinear, qparams: str) -> None:
        """Take block i's layer: qparams (frozen), h(alpha) = frac(W/s), v = 0."""
        w = ql.weight.detach().float()
        if qparams == "minmax":
            scale, zp = P.choose_qparams(w, self.fmt, self.group_size, ql.spec.symmetric)
        else:
            scale, zp = ql.scale.detach().float(), ql.zero_point
        self.scale.copy_(scale.reshape(self.scale.shape))
        if self.zero_point is not None:
            self.zero_point.copy_(P.integer_zero_point(zp.detach().float(), self.fmt).reshape(self.scale.shape))
        base, frac = grid_split(w, self.scale, self.group_size)
        self.base.copy_(base)
        self.alpha.copy_(rectified_sigmoid_inverse(frac))
        if self.v is not None:
            self.v.zero_()
        if self.bias is not None:
            self.bias.copy_(ql.bias)

    def tuned_scale(self) -> torch.Tensor:
        return self.scale if self.v is None else self.scale * (2 * torch.sigmoid(self.v))

    def weight(self) -> torch.Tensor:
        out_scale = None if self.v is None else 2 * torch.sigmoid(self.v)
        w = soft_dequantize(self.base, rectified_sigmoid(self.alpha), self.scale, self.zero_point, self.fmt,
                            out_scale)
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def hardened(self) -> torch.Tensor:
        return self.alpha.detach().abs() == hard_alpha()

    @torch.no_grad()
    def harden(self, soft_fraction: float) -> None:
        """Harden the variables farthest from 0.5 until `soft_fraction` of them stay soft."""
        n = self.alpha.numel()
        hard = self.hardened()
        new = (n - round(soft_fraction * n)) - int(hard.sum())
        if new <= 0:
            return
        score = (rectified_sigmoid(self.alpha) - 0.5).abs().masked_fill(hard, -1.0).flatten()
        idx = torch.topk(score, new, sorted=False).indices
        flat = self.alpha.view(-1)
        flat[idx] = torch.where(flat[idx] > 0, hard_alpha(), -hard_alpha())

    @torch.no_grad()
    def bake(self, ql: QuantLinear) -> None:
        """Write the hard decisions into `ql`: weight (q - z) * s', scale s', zero point z."""
        q = hard_codes(self.base, self.alpha > 0, self.zero_point, self.fmt)
        scale = self.tuned_scale()
        w = P.dequantize(q.reshape(self.out_features, self.in_features), scale, self.zero_point, self.fmt,
                         self.group_size)
        ql.weight.copy_(w)
        ql.scale.copy_(scale)
        if self.zero_point is not None:
            ql.zero_point.copy_(self.zero_point)


def _quant_linears(block: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in block.named_modules() if isinstance(m, QuantLinear)]


class TesseraQStep(BlockMethod):
    """TesseraQ's per-block math for the engine."""

    name = "tesseraq"

    def __init__(self, options: TesseraQOptions) -> None:
        self.opt = options
        self.soft: nn.Module | None = None
        self._for: nn.Module | None = None
        self._step_fn: Callable | None = None
        self._eval_fn: Callable | None = None

    # -- the soft-rounding block ---------------------------------------------

    def _build(self, ws: nn.Module, data: BlockData) -> None:
        soft = copy.deepcopy(ws)
        for name, m in _quant_linears(soft):
            set_module(soft, name, RoundingLinear(m, self.opt.tune_scale))
        for p in soft.parameters():
            p.requires_grad_(False)
        for m in self.layers(soft):
            m.alpha.requires_grad_(True)
            if m.v is not None:
                m.v.requires_grad_(True)
        self.soft, self._for = soft, ws
        self._step_fn = make_loss_fn(soft, data.kwargs, data.device, data.amp, data.compile)
        self._eval_fn = make_loss_fn(soft, data.kwargs, data.device, data.amp, False)

    @staticmethod
    def layers(soft: nn.Module) -> list[RoundingLinear]:
        return [m for m in soft.modules() if isinstance(m, RoundingLinear)]

    @torch.no_grad()
    def _load(self, ws: nn.Module) -> None:
        qnames = {n for n, _ in _quant_linears(ws)}
        soft_state = self.soft.state_dict()
        for key, value in ws.state_dict().items():  # norms and any other non-quantized state
            if key.rpartition(".")[0] not in qnames:
                soft_state[key].copy_(value)
        for name, ql in _quant_linears(ws):
            get_module(self.soft, name).load(ql, self.opt.qparams)

    def _variables(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.soft.state_dict().items() if k.endswith((".alpha", ".v"))}

    def hardened_fraction(self) -> float:
        layers = self.layers(self.soft)
        return sum(int(m.hardened().sum()) for m in layers) / sum(m.alpha.numel() for m in layers)

    # -- training ------------------------------------------------------------

    def train_block(self, workspace: nn.Module, data: BlockData, block: int,
                    substeps: SubSteps) -> dict[str, Any]:
        if self._for is not workspace:
            self._build(workspace, data)
        self._load(workspace)
        steps: list[dict[str, Any]] = []
        start = 0
        saved = substeps.load()
        if saved is not None:  # resume inside the block, after the last finished threshold step
            k, tensors, info = saved
            with torch.no_grad():
                for key, value in self._variables().items():
                    value.copy_(tensors[key])
            steps, start = info["steps"], k + 1
        for k in range(start, len(self.opt.thresholds)):
            t = self.opt.thresholds[k]
            for m in self.layers(self.soft):
                m.harden(t)
            loss = self._train_step(data, block, k)
            steps.append({"step": k, "threshold": t, "hardened": self.hardened_fraction(), "loss": loss,
                          "val_loss": mean_loss(self._eval_fn, data.val_inputs, data.val_targets,
                                                self.opt.batch_size, data.prefetch)})
            substeps.save(k, self._variables(), {"steps": steps})
        for m in self.layers(self.soft):
            m.harden(0.0)
        for name, ql in _quant_linears(workspace):
            get_module(self.soft, name).bake(ql)
        return {"steps": steps, "train_loss": [s["loss"] for s in steps],
                "hardened_final": self.hardened_fraction()}

    def _optimizer(self, device: torch.device) -> torch.optim.Optimizer:
        layers = self.layers(self.soft)
        groups = [{"params": [m.alpha for m in layers], "lr": self.opt.lr, "weight_decay": 0.0}]
        if self.opt.tune_scale:
            groups.append({"params": [m.v for m in layers], "lr": self.opt.scale_lr,
                           "weight_decay": self.opt.scale_weight_decay})
        return torch.optim.Adam(groups, fused=(device.type == "cuda") or None)

    def _train_step(self, data: BlockData, block: int, k: int) -> float:
        """`iterations` Adam steps on random batches; returns the mean loss (one host sync)."""
        n, bs, iters = len(data.inputs), self.opt.batch_size, self.opt.iterations
        g = torch.Generator().manual_seed(data.seed + 7919 * (k + 1))
        idx = torch.stack([torch.randperm(n, generator=g)[:bs] for _ in range(iters)])  # [iters, bs]
        plan = list(idx)  # every step's rows known up front: host gathers and disk reads run ahead
        optimizer = self._optimizer(data.device)  # fresh per step, as published
        losses = torch.zeros(iters, device=data.device)
        self.soft.train()
        for it, (x, y) in enumerate(data.prefetch.batches((data.inputs, data.targets), plan)):
            loss = self._step_fn(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[it] = loss.detach()
        self.soft.eval()
        mean = losses.mean().item()
        if not math.isfinite(mean):
            it = first_nonfinite(losses)
            raise BlockDivergedError(
                f"tesseraq: block {block} diverged: loss {losses[it].item()} at threshold step {k} "
                f"(t={self.opt.thresholds[k]}), iteration {it}; nothing of this block is written; "
                "lower block_ap.steps[0].tesseraq.lr / scale_lr")
        return mean


def check_model(model: nn.Module, options: TesseraQOptions, n_train: int) -> None:
    """Everything TesseraQ needs of its input, checked before any block is touched."""
    layers = _quant_linears(model)
    if not layers:
        raise ConfigError("tesseraq needs a weight-quantized model (QuantLinear layers); "
                          "run calibrate first")
    for name, m in layers:
        spec = m.spec
        if not isinstance(spec.format, IntFormat):
            raise ConfigError(f"tesseraq learns rounding on integer grids; {name} uses "
                              f"{spec.format.spec()} (scheme.weight.format must be intN)")
        if spec.dynamic_minmax:
            raise ConfigError("tesseraq needs static step sizes; scheme.weight."
                              "dynamic_minmax=true recomputes them from the weight")
        if m.frozen:
            raise ConfigError(f"{name} is frozen on its grid; tesseraq needs the "
                              "calibrated (trainable) model")
        if options.qparams == "init":
            bad = ~torch.isfinite(m.scale) | (m.scale <= 0)
            if m.zero_point is not None:
                bad = bad | ~torch.isfinite(m.zero_point)
            if bool(bad.any()):
                raise ConfigError(f"block_ap.steps[0].tesseraq.qparams='init': {name} has non-finite or non-positive "
                                  "step sizes / zero points in the calibrated model; use 'minmax' or "
                                  "re-run calibrate")
    if n_train < options.batch_size:
        raise ConfigError(f"block_ap.steps[0].tesseraq.batch_size={options.batch_size} is larger than the {n_train} "
                          "training samples")


class TesseraQ(BlockwiseEngine):
    """The engine running TesseraQ (lifecycle and state() as BlockwiseEngine)."""

    def __init__(self, model: nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor,
                 options: TesseraQOptions, ctx: BlockwiseContext) -> None:
        check_model(model, options, len(train_ids))
        super().__init__(model, train_ids, val_ids, TesseraQStep(options), options, ctx)


@register("tesseraq", kind="blockwise", options=TesseraQOptions, check=integer_weights_only)
def tesseraq(model: nn.Module, options: TesseraQOptions, ctx: BlockwiseContext) -> BlockwiseResult:
    """TesseraQ: progressive adaptive rounding (PAR) plus dequantisation-scale tuning, per block."""
    train_ids, val_ids = ctx.data()
    return TesseraQ(model, train_ids, val_ids, options, ctx).run()
