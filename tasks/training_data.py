"""What the training stages (block_ap, e2e) share: which sequences train them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from quant.checkpoint import load_tokenizer, read_config
from quant.config import Config, ConfigError
from quant.data import (
    check_windows,
    model_context,
    read_text,
    read_token_file,
    tokenize_text,
    windows,
)
from tasks.common import ARTIFACTS, stage_dir

MERGED = ARTIFACTS / "merge" / "train.safetensors"


@dataclass(frozen=True)
class DataConfig(Config):
    """Which sequences train a stage: shared by block_ap and e2e."""

    source: Literal["auto", "synthetic", "calib"] = "auto"  # auto: synthetic if merged, else calib
    train_samples: int = 32
    val_samples: int = 8
    seq_len: int = 128

    def __post_init__(self) -> None:
        if self.train_samples < 1:
            raise ConfigError(f"train_samples={self.train_samples} must be >= 1")
        if self.val_samples < 0:
            raise ConfigError(f"val_samples={self.val_samples} must be >= 0")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} must be >= 2")


def training_sequences(model_dir, data: DataConfig, section: str) -> tuple[torch.Tensor, str]:
    """All candidate sequences [N, seq_len] for the model in `model_dir` and where they came
    from. Checked first: the windows fit the model's context and the host's memory; merged ids
    are integers [rows, seq_len] inside the model's vocabulary (quant.data.read_token_file)."""
    config = read_config(model_dir)
    check_windows(data.train_samples + data.val_samples, data.seq_len, model_context(config),
                  f"{section}.data.train_samples + val_samples", f"{section}.data.seq_len")
    use_merged = data.source == "synthetic" or (data.source == "auto" and MERGED.exists())
    if use_merged:
        if not MERGED.exists():
            raise ConfigError(f"{section}.data.source='synthetic' but {MERGED} does not exist; "
                              "run the synthesize/merge stages or use 'calib'")
        tensors = read_token_file(MERGED, config.get("vocab_size"))
        ids = tensors["input_ids"]
        if ids.shape[1] < data.seq_len:
            raise ConfigError(f"{section}.data.seq_len={data.seq_len} is longer than the merged "
                              f"sequences of {MERGED} {tuple(ids.shape)}")
        ids = ids[:, : data.seq_len]
        if "attention_mask" in tensors:  # block-wise training needs full-length rows: drop padded ones
            ids = ids[tensors["attention_mask"][:, : data.seq_len].all(dim=1)]
        return ids.long().contiguous(), str(MERGED)
    calib = stage_dir("prepare") / "data" / "calib.txt"
    text = read_text(calib)
    return windows(tokenize_text(load_tokenizer(model_dir), text), data.seq_len), str(calib)
