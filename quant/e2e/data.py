"""Token data for training and calibration: tokenising a text, sampling windows."""

from __future__ import annotations

from quant.config import ConfigError


def tokenize_text(tokenizer, text: str):
    """The whole text as one 1-D LongTensor of ids (no special tokens added)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids, n: int, seq_len: int, seed: int):
    """`n` random windows of `seq_len` tokens from a 1-D id stream -> [n, seq_len].

    The GPTQ/AWQ calibration protocol: uniform random start positions, drawn from
    a generator seeded with `seed` (reproducible, independent of global RNG state)."""
    import torch

    if ids.numel() <= seq_len:
        raise ConfigError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
