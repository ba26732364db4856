"""convert: half precision and packed low-bit checkpoints that runtimes load.

Reads artifacts/<convert.model>/model (a quantized checkpoint of calibrate, block_ap
or e2e), freezes it on its integer grid and casts its float parts to `convert.dtype`
(EfficientQAT's conversion; quant.export.half), then writes one checkpoint per
entry of `convert.formats` (quant.export: `compressed-tensors` pack-quantized,
`gptq` v2, `half` = this project's format in half precision, `gguf` = llama.cpp's
file, never first since evaluate/register load the first with transformers):

- the first format -> artifacts/convert/model (what `evaluate.model: convert` and
  `register` load; packed checkpoints load with PackedLinear layers),
- the others -> artifacts/convert/formats/<format>/, with a manifest.json.

Every format is checked against the scheme (and the input for its tokenizer) before
anything is written; each packed checkpoint is loaded back and its logits on a short
input compared with the half fake-quant model's (`max_logit_diff`, 0.0 on CPU;
gguf: in llama.cpp when llama-cpp-python is installed, else null).
Each output is a publishable folder: config.json, weights, tokenizer,
generation_config.json and a model card README.md (quant.export.card: recipe,
footprint, the load lines per runtime; perplexity and accuracy are left to evaluate /
register, which render the card again with them). metrics/convert.json, per format:
size on disk, size of the weights against the same model in fp16 (`size_vs_fp16`),
bits per weight of the quantized linears (step sizes and zero points included) and
bits per parameter of the whole model; the in-memory bytes before/after the half
conversion; the input checkpoint's size (`size_before_bytes`: a fake-quant fp32
directory, which is no baseline for ratios).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from quant.config import Config, ConfigError
from tasks.common import Params, log_artifact, main, setup_torch, stage_dir, write_json

CHECK_TOKENS = 16


@dataclass(frozen=True)
class ConvertConfig(Config):
    model: str = "e2e"  # the stage whose quantized model is converted
    formats: tuple[str, ...] = ("compressed-tensors", "gptq")  # first -> artifacts/convert/model
    dtype: Literal["float16", "bfloat16"] = "float16"

    def __post_init__(self) -> None:
        from quant.export.base import exporter, formats

        if not self.formats:
            raise ConfigError(f"formats=[] is not accepted; use a non-empty list of {formats()}")
        for i, fmt in enumerate(self.formats):
            exporter(fmt, f"formats[{i}]")
        if len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"formats={list(self.formats)} lists a format twice")
        if self.formats[0] == "gguf":  # evaluate / register load the first format with transformers
            raise ConfigError("formats[0]='gguf': the first format is the stage's model, which evaluate "
                              "and register load with transformers; list gguf after it, e.g. "
                              "[compressed-tensors, gguf]")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_card(target: Path, facts) -> None:
    """README.md and the card facts (quantization.json "card") into a written export."""
    from quant.checkpoint import SCHEME_FILE
    from quant.export.card import CARD_FILE, CARD_KEY, render_card
    from quant.io import write_json_atomic, write_text_atomic

    meta = json.loads((target / SCHEME_FILE).read_text())
    write_json_atomic(target / SCHEME_FILE, {**meta, CARD_KEY: facts.to_dict()})
    write_text_atomic(target / CARD_FILE, render_card(facts))


def run(params: Params) -> dict[str, Any]:
    import torch

    from quant.checkpoint import SCHEME_FILE, load_quantized, read_scheme
    from quant.export.base import export, exporter, unquantized_params
    from quant.export.card import CardFacts
    from quant.export.half import to_half
    from quant.export.loader import load_packed, packed_format
    from quant.modules.linear import quant_linears

    t0 = time.time()
    cfg = params.section("convert", ConvertConfig)
    src = stage_dir(cfg.model) / "model"
    if not src.is_dir():
        raise ConfigError(f"convert.model={cfg.model!r}: {src} does not exist; run that stage first")
    scheme = read_scheme(src)
    if scheme is None or scheme.weight is None:
        raise ConfigError(f"convert.model={cfg.model!r}: {src} is not a weight-quantized model; "
                          "convert the output of calibrate, block_ap or e2e")
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"convert.model={cfg.model!r}: {src} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); "
                          "every exported folder carries one: re-run that stage, which saves it")
    if json.loads((src / SCHEME_FILE).read_text()).get("rotations"):
        raise ConfigError(f"convert.model={cfg.model!r}: {src} carries QuaRot online rotations, "
                          "which the packed formats cannot hold yet; convert a model calibrated "
                          "with quarot's options norms: fuse and online: off, or without quarot")
    setup_torch(params.base)
    dtype = getattr(torch, cfg.dtype)
    model, tokenizer = load_quantized(src, torch.float32, "cpu")
    layers = dict(quant_linears(model))
    params_full = unquantized_params(model)  # before freezing: the fp16 baseline of the ratios
    for fmt in cfg.formats:  # every format refuses what it cannot hold before anything is written
        exporter(fmt).check(scheme, layers)
        if hasattr(exporter(fmt), "check_model"):  # gguf: architecture, RoPE, tokenizer
            exporter(fmt).check_model(model, tokenizer)
    memory = to_half(model, dtype)
    method = json.loads((src / SCHEME_FILE).read_text()).get("method", cfg.model)
    recipe = f"{method}:{scheme.text or scheme.name}"  # the recipe that made the model (model card)
    ids = torch.arange(CHECK_TOKENS).reshape(1, -1) % model.config.vocab_size
    with torch.no_grad():
        ref = model(ids).logits.float()
    out = stage_dir("convert")
    formats_dir = out / "formats"
    shutil.rmtree(formats_dir, ignore_errors=True)
    formats_dir.mkdir(parents=True)
    metrics: dict[str, Any] = {"input_model": cfg.model, "scheme": scheme.name, "dtype": cfg.dtype,
                               "primary_format": cfg.formats[0], "size_before_bytes": dir_bytes(src),
                               "memory_bytes_before": memory["bytes_before"],
                               "memory_bytes_after": memory["bytes_after"], "params": params_full,
                               "fp16_bytes": 2 * params_full, "formats": {}}
    for i, fmt in enumerate(cfg.formats):
        target = out / "model" if i == 0 else formats_dir / fmt
        packed_meta = {"scheme": scheme.to_dict(), "method": method, "format": fmt, "dtype": cfg.dtype}
        extra = None if fmt == "half" else {SCHEME_FILE: json.dumps(packed_meta, indent=2)}  # for labels
        fp = export(model, tokenizer, scheme, fmt, target, dtype, extra, overwrite=True)
        if packed_format(target) is not None:
            packed, _ = load_packed(target, dtype)
            with torch.no_grad():
                diff = (packed(ids).logits.float() - ref).abs().max().item()
            del packed
        elif hasattr(exporter(fmt), "max_logit_diff"):  # its own runtime (gguf: llama.cpp), None if absent
            diff = exporter(fmt).max_logit_diff(target, ids, ref)
        else:
            diff = 0.0  # this project's own format: restored exactly by load_quantized
        assert fp.params == params_full, (fp.params, params_full)
        write_card(target, CardFacts(fmt, scheme.to_dict(), recipe, cfg.dtype, params.model.name_or_path,
                                     fp.to_dict(), {"max_logit_diff": diff}))
        metrics["formats"][fmt] = {**fp.to_dict(), "size_bytes": dir_bytes(target), "max_logit_diff": diff,
                                   "path": str(target)}
    write_json(formats_dir / "manifest.json", metrics["formats"])
    primary = metrics["formats"][cfg.formats[0]]
    metrics.update(size_after_bytes=primary["size_bytes"], bits_per_weight=primary["bits_per_weight"],
                   size_vs_fp16=primary["size_vs_fp16"], seconds=round(time.time() - t0, 2))
    write_json("metrics/convert.json", metrics)
    log_artifact("metrics/convert.json")
    return metrics


if __name__ == "__main__":
    main("convert", run)
