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

from quant.data import windows
from quant.e2e.losses import next_token_nll


@dataclass(frozen=True)
class PPLResult:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens scored
    windows: int


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
) -> PPLResult:
    device = next(model.parameters()).device
    chunks = windows(ids, seq_len, max_windows)  # [W, seq_len]
    if chunks.shape[0] == 0:
        raise ValueError(f"text of {ids.numel()} tokens is shorter than one window of {seq_len}")
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, chunks.shape[0], batch_size):
        batch = chunks[start : start + batch_size].to(device)  # [B, S]
        logits = model(input_ids=batch, use_cache=False).logits  # [B, S, V]
        total_nll += next_token_nll(logits, batch, reduction="sum").item()
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return PPLResult(ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=chunks.shape[0])
