"""Perplexity by the standard protocol.

The text is tokenized once and concatenated; the stream is cut into
non-overlapping windows of `seq_len` tokens (a trailing partial window is
dropped, as in GPTQ/AWQ/EfficientQAT); each window is scored independently and
the PPL is exp(mean token NLL) over every predicted token (seq_len - 1 per
window). Windows are scored in batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class PPLResult:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens scored
    windows: int


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[N] token ids -> [W, seq_len] non-overlapping windows."""
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}")
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text of {ids.numel()} tokens is shorter than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
) -> PPLResult:
    device = next(model.parameters()).device
    chunks = windows(ids, seq_len, max_windows)
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, chunks.shape[0], batch_size):
        batch = chunks[start : start + batch_size].to(device)  # [B, S]
        logits = model(input_ids=batch, use_cache=False).logits  # [B, S, V]
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="sum",
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return PPLResult(ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=chunks.shape[0])
