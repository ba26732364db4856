"""The Python API: load a model, quantize it in memory with a recipe, measure it, export it.

    import quant

    model, tok = quant.load_model("embedded:smollm2-135m")
    recipe = quant.Recipe.parse("awq+block-ap+e2e-qp:W4g64", options={"block-ap": {"epochs": 1}})
    report = quant.quantize(model, recipe, tokenizer=tok, calib_text=text, train_text=text)
    quant.perplexity(model, tok, eval_text)
    quant.export_model(model, tok, recipe.scheme, "compressed-tensors", "out/")

It runs the same code as the stages (`tasks/`): `quant.calibrate.calibrate`,
`quant.blockwise.engine.reconstruct` and `quant.e2e.trainer.train`, which the stages call
between reading their inputs and writing their outputs. The stages save and reload the
model between steps; here it stays in memory (on CPU the result is the same, bit for
bit: tests/quant/test_api.py).

Data: calibration steps take `calib_ids` [samples, seq_len] (or `calib_text`, cut into
seeded random windows as the calibrate stage does); block-wise and end-to-end steps
take `train_ids` / `val_ids` [N, L] (or `train_text`, split as the stages split windows
of the calibration text).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.load import load_model  # noqa: F401 (the API's loader)
from quant.recipe import Recipe


def calibration_windows(tokenizer, text: str, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`samples` seeded random windows of `seq_len` tokens of `text` (the calibrate stage's data)."""
    from quant.data import sample_windows, tokenize_text

    return sample_windows(tokenize_text(tokenizer, text), samples, seq_len, seed)


@dataclass
class Report:
    """What `quantize` did: metrics per stage, files the calibrate steps produced."""

    recipe: Recipe
    calibrate: dict[str, Any] = field(default_factory=dict)
    blockwise: Any = None  # quant.blockwise.engine.BlockwiseResult or None
    e2e: Any = None  # quant.e2e.trainer.TrainResult or None
    files: dict[str, Any] = field(default_factory=dict)


def quantize(model: nn.Module, recipe: Recipe | str, *, tokenizer=None,
             calib_ids: torch.Tensor | None = None, calib_text: str | None = None,
             calib_samples: int = 128, calib_seq_len: int = 512,
             train_ids: torch.Tensor | None = None, val_ids: torch.Tensor | None = None,
             train_text: str | None = None, train_samples: int = 128, val_samples: int = 8,
             seq_len: int = 512, train=None, teacher: nn.Module | None = None,
             device: str | torch.device | None = None, seed: int = 0,
             work_dir: str | Path | None = None) -> tuple[nn.Module, Report]:
    """Quantize `model` with `recipe` (a `Recipe` or its text), in memory.

    Returns (the quantized model, a Report). The model is changed in place; the returned
    one is the same module (an end-to-end step under FSDP would return a gathered copy).
    It keeps no reference weights (GPTQ's full-precision weights, the targets of a
    block-wise step): they are dropped once no block-wise step is left.
    `train` is a `quant.e2e.trainer.TrainConfig` (defaults: one epoch). `teacher` is the
    full-precision model for knowledge distillation (`kd`); by default a copy of `model`
    taken before any step. `work_dir` keeps resumable state (default: a temporary dir)."""
    from quant.blockwise.engine import BlockwiseContext, reconstruct
    from quant.calibrate import calibrate
    from quant.calibrate.saved import model_fingerprint
    from quant.data import split_samples, tokenize_text, windows
    from quant.e2e.distributed import make_accelerator
    from quant.e2e.trainer import E2EContext, TrainConfig
    from quant.e2e.trainer import train as train_steps
    from quant.io import fingerprint
    from quant.modules.linear import drop_reference_weights

    if isinstance(recipe, str):
        recipe = Recipe.parse(recipe)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    needs_calib = any(s.method not in ("rtn", "quarot") for s in recipe.calibrate)
    if calib_ids is None and calib_text is not None:
        if tokenizer is None:
            raise ConfigError("quantize: calib_text needs tokenizer=")
        calib_ids = calibration_windows(tokenizer, calib_text, calib_samples, calib_seq_len, seed)
    if needs_calib and calib_ids is None:
        raise ConfigError(f"quantize: recipe {recipe} needs calibration data: calib_ids= or calib_text=")
    training = bool(recipe.blockwise or recipe.e2e)
    if training and train_ids is None:
        if train_text is None or tokenizer is None:
            raise ConfigError(f"quantize: recipe {recipe} trains: give train_ids= (and val_ids=) or "
                              "train_text= with tokenizer=")
        rows = windows(tokenize_text(tokenizer, train_text), seq_len)
        train_ids, val_ids = split_samples(rows, train_samples, val_samples, seed, "quantize")
    if val_ids is None and train_ids is not None:
        val_ids = train_ids[:0]
    if any(s.method == "kd" for s in recipe.e2e) and teacher is None:
        import copy

        teacher = copy.deepcopy(model)
    cfg = train if train is not None else TrainConfig()
    # resumable state in work_dir belongs to these inputs only (a different recipe, model or
    # data starts afresh, as the stages' fingerprints do)
    fp = fingerprint(recipe.params(), cfg.to_dict(), seed, model_fingerprint(model),
                     tensors=tuple(t for t in (calib_ids, train_ids, val_ids) if t is not None))
    report = Report(recipe)
    _seed(seed)  # each phase starts from the seed, as each stage process does
    cal = calibrate(model, recipe.scheme, recipe.calibrate, calib_ids, seed)
    report.calibrate, report.files = cal.metrics, cal.files
    if not recipe.blockwise:  # GPTQ's reference weights are the targets of block-wise steps only
        drop_reference_weights(model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        if recipe.blockwise:
            _seed(seed)
            device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
            model.to("cpu").float()  # the engine keeps fp32 master weights on the host
            ctx = BlockwiseContext(dev, root / "blockwise", seed, fp, train_ids=train_ids, val_ids=val_ids,
                                   scheme=cal.scheme)
            report.blockwise = reconstruct(model, recipe.blockwise, ctx)
            model.to(device, dtype)  # as the e2e stage loads block_ap's output: in the model's dtype
        if recipe.e2e:
            _seed(seed)
            acc = make_accelerator(str(dev))
            dtype = next(model.parameters()).dtype
            ctx = E2EContext(cal.scheme, acc.device, dtype, None, seed, teacher=teacher)
            report.e2e, model = train_steps(model, recipe.e2e, train_ids, val_ids, cfg, ctx,
                                            root / "e2e", acc, fp)
    return model, report


def _seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def perplexity(model: nn.Module, tokenizer, text: str | torch.Tensor, seq_len: int = 2048,
               max_windows: int | None = None, batch_size: int = 1) -> float:
    """Perplexity over non-overlapping `seq_len` windows of `text` (or of a 1-D id tensor)."""
    from quant.data import tokenize_text
    from quant.eval.ppl import perplexity as ppl

    ids = text if isinstance(text, torch.Tensor) else tokenize_text(tokenizer, text)
    with torch.no_grad():
        return ppl(model, ids, seq_len, batch_size, max_windows).ppl


def save(model: nn.Module, tokenizer, scheme: QuantScheme, out: str | Path) -> Path:
    """This project's checkpoint (fake-quant weights + integer qparams + scheme), atomically."""
    from quant.checkpoint import save_quantized

    save_quantized(model, tokenizer, scheme, out)
    return Path(out)


def export_model(model: nn.Module, tokenizer, scheme: QuantScheme, fmt: str, out: str | Path,
           dtype: torch.dtype = torch.float16):
    """Freeze `model` on its grid, cast its float parts to `dtype` and write it as `fmt`
    (`quant.export.base.formats()`: compressed-tensors, gptq, half, ...) into `out`.
    Returns the footprint on disk. The model is converted in place."""
    from quant.export.base import export as write
    from quant.export.half import to_half

    to_half(model, dtype)
    return write(model, tokenizer, scheme, fmt, out, dtype)
