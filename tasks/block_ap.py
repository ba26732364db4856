"""block_ap: block-wise reconstruction of the calibrated model (method `block-ap`; `tesseraq` later).

Reads artifacts/calibrate/model (QuantLinears with float weights and initial
qparams) and the training data: artifacts/merge/train.safetensors (`input_ids`
[N, L], synthesized) when present, else non-overlapping windows of
artifacts/prepare/data/calib.txt (`data` decides). Writes artifacts/block_ap/model
(frozen on the integer grid), artifacts/block_ap/block_loss.png and
metrics/block_ap.json; per-block validation MSE goes to MLflow as step metrics.
A killed run resumes at the next unfinished block from .state/block_ap.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from quant.blockwise.block_ap import BlockwiseContext, blockwise_methods
from quant.config import Config, ConfigError
from quant.e2e.data import tokenize_text, windows
from quant.e2e.trainer import split_samples
from quant.models.checkpoint import FLOAT_WEIGHTS_FILE, load_model, read_scheme, save_quantized
from tasks import tracking
from tasks.common import ARTIFACTS, Params, log_artifact, main, setup_torch, stage_dir, write_json

MERGED = ARTIFACTS / "merge" / "train.safetensors"
STATE_DIR = Path(".state") / "block_ap"


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


@dataclass(frozen=True)
class BlockAPStageConfig(Config):
    method: str = "block-ap"
    data: DataConfig = field(default_factory=DataConfig)
    options: dict[str, Any] = field(default_factory=dict)  # validated by the method

    def __post_init__(self) -> None:
        blockwise_methods().get(self.method, "method")


def training_sequences(tokenizer, data: DataConfig, section: str) -> tuple[torch.Tensor, str]:
    """All candidate sequences [N, seq_len] and where they came from."""
    use_merged = data.source == "synthetic" or (data.source == "auto" and MERGED.exists())
    if use_merged:
        if not MERGED.exists():
            raise ConfigError(f"{section}.data.source='synthetic' but {MERGED} does not exist; "
                              "run the synthesize/merge stages or use 'calib'")
        tensors = load_file(str(MERGED))
        ids = tensors["input_ids"]
        if ids.dim() != 2 or ids.shape[1] < data.seq_len:
            raise ConfigError(f"{section}.data.seq_len={data.seq_len} is longer than the merged "
                              f"sequences {tuple(ids.shape)}")
        ids = ids[:, : data.seq_len]
        if "attention_mask" in tensors:  # Block-AP needs full-length rows: drop padded ones
            ids = ids[tensors["attention_mask"][:, : data.seq_len].all(dim=1)]
        return ids.long().contiguous(), str(MERGED)
    calib = stage_dir("prepare") / "data" / "calib.txt"
    return windows(tokenize_text(tokenizer, calib.read_text()), data.seq_len), str(calib)


def fingerprint(*parts: Any, files: tuple[Path, ...] = (), tensors: tuple[torch.Tensor, ...] = ()) -> str:
    """Identity of a run's settings and inputs (a resumed run must match it)."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for f in files:
        if f.exists():
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    h.update(chunk)
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_log_step = tracking.log_step  # tasks.e2e imports it under this name


def plot_block_losses(per_block: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [b["block"] for b in per_block]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(blocks, [b["val_loss_init"] for b in per_block], "o-", label="before (calibrated init)")
    ax.plot(blocks, [b["val_loss"][-1] for b in per_block], "o-", label="after Block-AP")
    ax.set(xlabel="decoder block", ylabel="validation MSE vs full precision", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(params: Params) -> dict[str, Any]:
    cfg = params.section("block_ap", BlockAPStageConfig)
    entry = blockwise_methods().get(cfg.method, "block_ap.method")
    options = entry.options.from_dict(cfg.options, "block_ap.options")
    src = stage_dir("calibrate") / "model"
    scheme = read_scheme(src)
    if scheme is None or scheme.weight is None:
        raise ConfigError(f"block_ap needs a weight-quantized model in {src}; run calibrate first")
    scheme.require_integer_weights("block_ap")
    if not (src / FLOAT_WEIGHTS_FILE).exists():
        raise ConfigError(f"{src} holds no {FLOAT_WEIGHTS_FILE} (the float weights Block-AP trains "
                          "and reconstructs); re-run calibrate with this version")
    device, _ = setup_torch(params.base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    seqs, source = training_sequences(tokenizer, cfg.data, "block_ap")
    train_ids, val_ids = split_samples(seqs, cfg.data.train_samples, cfg.data.val_samples,
                                       params.base.seed, "block_ap.data")
    model, tokenizer = load_model(src, torch.float32, "cpu")  # fp32 master weights on the host
    fp = fingerprint(cfg.to_dict(), scheme.to_dict(), params.base.seed,
                     files=(src / "quantization.json", src / "qparams.safetensors"),
                     tensors=(train_ids, val_ids))

    def on_block(i: int, info: dict[str, Any]) -> None:
        _log_step({"block_val_mse": info["val_loss"][-1], "block_val_mse_init": info["val_loss_init"],
                   "block_train_mse": info["train_loss"][-1], "block_seconds": info["seconds"]}, i)

    ctx = BlockwiseContext(torch.device(device), STATE_DIR, params.base.seed, fp, on_block)
    result = entry.fn(model, train_ids, val_ids, options, ctx, scheme.weight.bits)
    out = stage_dir("block_ap")
    save_quantized(model, tokenizer, scheme, out / "model", extra={"method": cfg.method})
    png = plot_block_losses(result.per_block, out / "block_loss.png", f"{cfg.method} {scheme.name}")
    init = [b["val_loss_init"] for b in result.per_block]
    final = [b["val_loss"][-1] for b in result.per_block]
    metrics = {
        "method": cfg.method, "scheme": scheme.name, "data": source,
        "train_samples": len(train_ids), "val_samples": len(val_ids), "seq_len": int(train_ids.shape[1]),
        "blocks": result.blocks, "resumed_at_block": result.resumed_at,
        "val_mse_init_mean": sum(init) / len(init), "val_mse_mean": sum(final) / len(final),
        "val_mse_last_block": final[-1], "blocks_improved": sum(f < i for f, i in zip(final, init, strict=True)),
        "block_seconds_total": round(sum(b["seconds"] for b in result.per_block), 2),
    }
    write_json("metrics/block_ap.json", metrics)
    log_artifact(png)
    log_artifact("metrics/block_ap.json")
    shutil.rmtree(STATE_DIR, ignore_errors=True)  # the output exists: nothing left to resume
    return metrics


if __name__ == "__main__":
    main("block_ap", run)
