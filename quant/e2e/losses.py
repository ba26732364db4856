"""Losses of end-to-end training: one causal-LM loss, one knowledge-distillation loss.

Every trainer, method, evaluation and script computes next-token cross-entropy
and distillation through these functions, so the shift, the ignored positions
and the normalisation are decided once.

Normalisation of the KD loss
----------------------------
LLM-QAT's published code computes
`F.kl_div(log_softmax(s / T), softmax(t / T), reduction="batchmean")` on
logits shaped [B, L, V]: `batchmean` divides the sum over *every* element by
the first dimension B only, so the loss is the per-token divergence **summed
over the L positions** and averaged over sequences. `normalize="batch"` does
exactly that (the default of the `kd` step); `normalize="token"` divides by
the number of counted positions instead (a per-token mean, L times smaller at
full masks, the scale of the causal-LM loss, which E2E-QP mixes it with). With
AdamW the two differ mainly through gradient clipping and epsilon: the step
direction is the same.

The soft cross-entropy `-sum_v p_v log q_v` and the KL `sum_v p_v (log p_v -
log q_v)` differ by the teacher's entropy, a constant for the student: their
gradients are identical. Both are returned, both T^2-scaled (Hinton et al.:
keeps the gradient scale independent of T).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Normalize = Literal["batch", "token"]
NORMALIZE = ("batch", "token")
IGNORE = -100


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None,
                   reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Next-token negative log-likelihood of `ids` [B, L] under `logits` [B, L, V].

    Position t predicts token t+1; targets whose `mask` [B, L] is 0 are ignored.
    `mean`: over the predicted tokens that count; `sum`: their total (fp32)."""
    labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),  # [B*(L-1), V]
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction=reduction)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on `batch` (input_ids, optional attention_mask)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, L, V]
    return next_token_nll(logits, ids, mask)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, normalize: Normalize) -> torch.Tensor:
    """[B, L] -> scalar: the sum over counted positions divided by B (batch) or by their number (token)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r}; accepted: {list(NORMALIZE)}")
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    total = per_token.sum()
    if normalize == "batch":
        return total / per_token.shape[0]
    count = per_token.numel() if mask is None else mask.sum().clamp(min=1)
    return total / count


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None, normalize: Normalize = "batch"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft cross-entropy, KL(teacher || student)), both T^2-scaled and differentiable.

    logits: [B, L, V]; mask: [B, L] (1 = position counts) or None; `normalize`
    as in the module docstring. The teacher side carries no gradient."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)  # [B, L, V] student
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
        p = log_p.exp()
        entropy = _reduce(-(p * log_p).sum(-1), mask, normalize) * t * t
    ce = _reduce(-(p * log_q).sum(-1), mask, normalize) * t * t
    return ce, ce - entropy


def kd_loss_topk(student_logits: torch.Tensor, topk_logits: torch.Tensor, topk_ids: torch.Tensor,
                 temperature: float = 1.0, mask: torch.Tensor | None = None,
                 normalize: Normalize = "batch") -> torch.Tensor:
    """Soft cross-entropy against a teacher known only by its top-k logits per token.

    The teacher distribution is softmax(topk_logits / T) over those k tokens (the
    tail dropped and the rest renormalised); the student's log-probabilities are
    the full-vocabulary log-softmax gathered at `topk_ids` [B, L, k]."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, topk_ids.long())  # [B, L, k]
    p = F.softmax(topk_logits.float() / t, dim=-1)
    return _reduce(-(p * log_q).sum(-1), mask, normalize) * t * t
