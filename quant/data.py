"""Token data for calibration, training and perplexity: tokenise a text, cut or sample windows,
split rows into training and validation sets. Every stage and method takes its tokens from here."""

from __future__ import annotations

from quant.config import ConfigError


def tokenize_text(tokenizer, text: str):
    """The whole text as one 1-D LongTensor of ids (no special tokens added)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids, seq_len: int, max_windows: int | None = None):
    """A 1-D token stream [N] cut into non-overlapping windows [W, seq_len].

    The trailing partial window is dropped (the GPTQ/AWQ/EfficientQAT perplexity
    protocol); at most `max_windows` are kept. W may be 0: callers that need a
    window say so in their own terms."""
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}")
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


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


def split_samples(ids, n_train: int, n_val: int, seed: int, path: str = "samples"):
    """Disjoint (train [n_train, L], val [n_val, L]) rows of `ids`, chosen by a seeded permutation."""
    import torch

    if n_train < 1 or n_val < 0:
        raise ConfigError(f"{path}: train_samples={n_train} must be >= 1 and val_samples={n_val} >= 0")
    if n_train + n_val > ids.shape[0]:
        raise ConfigError(
            f"{path}: train_samples + val_samples = {n_train} + {n_val} is more than the "
            f"{ids.shape[0]} sequences of length {ids.shape[1]} the training data holds"
        )
    perm = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))
    return ids[perm[:n_train]].contiguous(), ids[perm[n_train : n_train + n_val]].contiguous()
