"""LLM-QAT: quantization-aware training by knowledge distillation (the e2e step `kd`).

Student = the quantized model (weights, activations and KV cache as the scheme
says), teacher = the full-precision model. The loss is the cross-entropy
between the teacher's softmax and the student's log-softmax over the whole
vocabulary at every position (`quant.e2e.losses.kd_loss`),

    L = T^2 * sum_tokens( -sum_v softmax(t / T)_v * log_softmax(s / T)_v ) / N,

with N = B, the number of sequences (`normalize: batch`, the default: what the
reference's `kl_div(reduction="batchmean")` on [B, L, V] logits computes, a sum
over the L positions averaged over sequences) or N = the number of counted
tokens (`normalize: token`, a per-token mean). No hard-label term by default
(LLM-QAT uses none; `hard_label_weight` adds `w * CE(labels)` if asked, a
per-token mean). The soft cross-entropy differs from the reference's
KL(teacher || student) by the teacher's entropy only, a constant for the
student, so at the same normalisation the gradients are the reference's; the
KL is logged too because it reads as "distance to the teacher" (0 =
identical). The T^2 factor keeps gradient magnitudes independent of T
(Hinton et al.); at the paper's T = 1 it is 1.

Teacher logits are computed on the fly by default (one no-grad teacher forward
per micro batch). `teacher: topk` instead runs the teacher once over the
training data before training and keeps its top-k logits and ids per token
(`topk` of them, bf16 + int32: 6k bytes per token instead of a forward pass
per step; the teacher scores `teacher_batch_size` sequences at a time); the loss then uses the teacher distribution renormalised over those
k tokens. That is an approximation (the tail mass is dropped); with k = V it
equals the full loss.

Weights: the scheme decides.
- `scheme.weight.dynamic_minmax: true` (the published LLM-QAT scheme, with
  `group_size: -1, symmetric: true`): per-output-channel symmetric min-max
  step sizes recomputed from the current weight at every step; the float
  weights train through the straight-through estimator.
- otherwise the learned step sizes (and zero points) of the Block-AP / E2E-QP
  path train together with the weights (`scale_lr`); if the model's
  QuantLinears are already frozen on the integer grid (after Block-AP) only
  the step sizes train, i.e. E2E-QP with the KD loss and A/KV quantization.
`trainable: all` (the reference trains the whole network: embeddings, norms
and the full-precision lm_head too) or `linears` (quantized linears only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from quant.config import Config, ConfigError
from quant.config.scheme import integer_weights_only
from quant.e2e.losses import NORMALIZE, Normalize, kd_loss, kd_loss_topk, next_token_nll
from quant.e2e.trainer import Batch, E2EContext, Objective, check_lr
from quant.methods import register
from quant.modules.linear import quant_linears
from quant.modules.runtime import apply_runtime_quantizers

TOPK_LOGITS = "teacher_topk_logits"
TOPK_IDS = "teacher_topk_ids"


@dataclass(frozen=True)
class KDOptions(Config):
    lr: float = 2e-5  # float weights (LLM-QAT: 2e-5)
    scale_lr: float = 1e-4  # learned step sizes / zero points (when not dynamic_minmax)
    temperature: float = 1.0
    hard_label_weight: float = 0.0  # LLM-QAT: 0 (soft labels only)
    teacher: Literal["online", "topk"] = "online"
    topk: int = 64  # teacher logits kept per token when teacher = topk
    teacher_batch_size: int = 4  # sequences per teacher forward when teacher = topk
    trainable: Literal["all", "linears"] = "all"
    train_weights: bool = True  # false: only step sizes train (E2E-QP with KD)
    normalize: Normalize = "batch"  # KD loss / number of sequences (reference) or / tokens

    def __post_init__(self) -> None:
        check_lr(self.lr, "lr")
        check_lr(self.scale_lr, "scale_lr")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0")
        if not self.hard_label_weight >= 0.0:
            raise ConfigError(f"hard_label_weight={self.hard_label_weight} must be >= 0")
        if self.topk < 1:
            raise ConfigError(f"topk={self.topk} must be >= 1")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"normalize={self.normalize!r} is not accepted; use one of {list(NORMALIZE)}")
        if self.teacher_batch_size < 1:
            raise ConfigError(f"teacher_batch_size={self.teacher_batch_size} must be >= 1")


# ---------------------------------------------------------------------------
# Teacher


@torch.no_grad()
def teacher_topk(
    teacher: nn.Module, ids: torch.Tensor, k: int, batch_size: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Top-k teacher logits (bf16) and ids (int32) for every position of `ids` [N, L]."""
    vals, idx = [], []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        logits = teacher(input_ids=batch, use_cache=False).logits  # [b, L, V]
        v, i = logits.float().topk(k, dim=-1)
        vals.append(v.to(torch.bfloat16).cpu())
        idx.append(i.to(torch.int32).cpu())
    return {TOPK_LOGITS: torch.cat(vals), TOPK_IDS: torch.cat(idx)}


# ---------------------------------------------------------------------------
# Student preparation


def prepare_student(model: nn.Module, ctx: E2EContext, options: KDOptions) -> list[dict]:
    """Install the scheme's activation / KV quantizers and choose what trains.

    Returns optimizer param groups (weights at `lr`, step sizes / zero points at
    `scale_lr`); every other parameter gets requires_grad False."""
    scheme = ctx.scheme
    layers = [m for _, m in quant_linears(model)]
    if scheme.weight is not None:
        if not layers:
            raise ConfigError("kd with a weight scheme needs a quantized model (run calibrate first)")
        wrong = {str(m.spec) for m in layers if m.spec != scheme.weight}
        if wrong:
            raise ConfigError(f"the model's weight quantizers {sorted(wrong)} differ from scheme.weight="
                              f"{scheme.weight}; re-run calibrate with this scheme")
    apply_runtime_quantizers(model, scheme)
    model.requires_grad_(False)
    weights, qparams = [], []
    if options.train_weights:
        candidates = model.parameters() if options.trainable == "all" else (
            p for m in layers for p in (getattr(m, "weight", None), m.bias) if isinstance(p, nn.Parameter))
        seen = {id(m.scale) for m in layers} | {id(m.zero_point) for m in layers}
        for p in candidates:
            if id(p) not in seen and p.is_floating_point():
                weights.append(p)
    for m in layers:
        if m.spec.dynamic_minmax and not m.frozen:
            continue  # step sizes are recomputed from the weight every step
        qparams.append(m.scale)
        if isinstance(m.zero_point, nn.Parameter) and not m.frozen:
            qparams.append(m.zero_point)
    groups = []
    if weights:
        groups.append({"params": weights, "lr": options.lr, "weight_decay": 0.0, "name": "weight"})
    if qparams:
        groups.append({"params": qparams, "lr": options.scale_lr, "weight_decay": 0.0, "name": "qparams"})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    if not groups:
        raise ConfigError("e2e.steps[0].kd: nothing to train (train_weights=false and no learned step sizes)")
    return groups


@register("kd", kind="e2e", options=KDOptions, check=integer_weights_only)
def setup(model: nn.Module, options: KDOptions, ctx: E2EContext) -> Objective:
    """LLM-QAT: quantization-aware training with knowledge distillation from the fp teacher."""
    if not ctx.has_teacher():  # before the student is changed
        raise ConfigError("kd needs the full-precision teacher model (artifacts/prepare/model)")
    groups = prepare_student(model, ctx, options)
    teacher = ctx.load_teacher("kd")
    t, w, norm = options.temperature, options.hard_label_weight, options.normalize

    def loss(student: nn.Module, batch: Batch):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        s_logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, L, V]
        logs = {}
        if TOPK_LOGITS in batch:
            total = kd_loss_topk(s_logits, batch[TOPK_LOGITS], batch[TOPK_IDS], t, mask, norm)
        else:
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
            total, kl = kd_loss(s_logits, t_logits, t, mask, norm)
            logs["kl"] = kl.detach()
        logs["kd"] = total.detach()
        if w > 0:
            ce = next_token_nll(s_logits, ids, mask)
            total = total + w * ce
            logs["ce"] = ce.detach()
        return total, logs

    prepare = None
    if options.teacher == "topk":
        def prepare(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # the trainer has moved the teacher to its device by now; every rank scores all rows
            device = next(teacher.parameters()).device
            return {**data, **teacher_topk(teacher, data["input_ids"], options.topk,
                                               options.teacher_batch_size, device)}

    return Objective(groups, loss, {"teacher": teacher}, prepare)
