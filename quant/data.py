"""Token data for calibration, training and perplexity: tokenise a text, cut or sample windows,
split rows into training and validation sets, read a file of token ids. Every stage and method
takes its tokens from here.

Checked before any data is made (`check_windows`): a window no longer than the model's context
(`max_position_embeddings`: a longer one runs, through positions the model never saw, and
scores garbage), and an ids tensor that fits in half the host memory left (a billion windows
ends in MemoryError, or the OOM killer, long after the params were read). A token file
(`read_token_file`) holds integer ids [rows, seq_len] below the model's vocabulary size; any
other content is an `InputError` naming the file and what was expected.
"""

from __future__ import annotations

from pathlib import Path

from quant.config import ConfigError, InputError

ID_BYTES = 8  # int64, what the tokenizer and the stages hold ids in


def read_text(path: str | Path, hint: str = "re-run prepare") -> str:
    """A UTF-8 text file (calibration or evaluation text); an InputError naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found; {hint}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); {hint}") from None


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


def _cgroup_room() -> int | None:
    """Memory the cgroup still allows (v2, then v1), or None without a limit."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            usage = int(Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:
            return None
        return max(int(limit) - usage, 0)
    return None


def host_memory_room() -> int:
    """Host memory available now (psutil), capped by the cgroup's limit; bytes."""
    import psutil

    room = psutil.virtual_memory().available
    cg = _cgroup_room()
    return room if cg is None else min(room, cg)


def check_windows(rows: int, seq_len: int, context: int | None, rows_field: str, len_field: str,
                  room: int | None = None) -> None:
    """`rows` windows of `seq_len` tokens fit the model's `context` and half the host memory
    left (`room`, measured when None). Raises ConfigError naming the fields."""
    if context is not None and seq_len > context:
        raise ConfigError(f"{len_field}={seq_len} is longer than the model's context ({context} tokens, "
                          f"max_position_embeddings); use at most {context}")
    need = rows * seq_len * ID_BYTES
    room = host_memory_room() if room is None else room
    if need > room // 2:
        raise ConfigError(f"{rows_field} x {len_field} = {rows} x {seq_len} token ids need {need / 2**30:.3g} GiB "
                          f"of host memory; {room / 2**30:.3g} GiB is available and at most half of it may hold "
                          "them; use fewer or shorter windows")


def model_context(config: dict) -> int | None:
    """The context length of a model's config.json (None when it does not say)."""
    n = config.get("max_position_embeddings")
    return n if isinstance(n, int) and n > 0 else None


def read_token_file(path: str | Path, vocab_size: int | None, key: str = "input_ids") -> dict:
    """The tensors of a safetensors file of token ids: `key` integer [rows, seq_len] with every id
    in [0, vocab_size), an optional `attention_mask` of the same shape. Any other content is an
    InputError naming the file and what was expected."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, I/O errors alike
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path} is not a readable safetensors file ({reason}); re-run the stage that "
                         "wrote it (merge)") from None
    ids = tensors.get(key)
    if ids is None:
        raise InputError(f"{path} holds no {key!r} tensor (it holds {sorted(tensors)}); re-run merge")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(f"{path}: {key!r} is {str(ids.dtype).removeprefix('torch.')}; token ids must be "
                         "integers (int32 or int64); re-run merge")
    if ids.dim() != 2:
        raise InputError(f"{path}: {key!r} has shape {tuple(ids.shape)}; expected [rows, seq_len] (2-D); "
                         "re-run merge")
    if ids.numel() and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise InputError(f"{path}: {key!r} holds token id {bad}, outside the model's vocabulary "
                         f"[0, {vocab_size}); it was made with another tokenizer or is corrupt; re-run merge")
    mask = tensors.get("attention_mask")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise InputError(f"{path}: 'attention_mask' has shape {tuple(mask.shape)}, {key!r} "
                         f"{tuple(ids.shape)}; expected equal shapes; re-run merge")
    return tensors
