"""One interface for every export format, found through a registry.

An exporter is a small class per file (`half.py`, `compressed_tensors.py`,
`gptq.py`), registered in `quant.methods` (kind `export`) under its format name, as
compressed-tensors keeps one compressor per format:

- `check(scheme, layers)` refuses, before any work, what the format cannot
  express, with a `ConfigError` naming the scheme field and what is accepted;
- `write(model, tokenizer, scheme, out, dtype)` writes the checkpoint into an
  empty directory (`export` wraps it in `atomic_dir`, so a failure leaves nothing);
- packed formats also `load_layer(tensors, name, linear)` -> `PackedLinear`, which
  `quant.export.loader` uses to load the checkpoint back;
- `load_snippets(path, scheme)` (optional) -> {runtime: code that loads the
  checkpoint}: what the model card shows (`load_snippets` below; a format without
  it gets none, a GGUF exporter returns its llama.cpp line here).

`export` is the entry point: it validates (a model without quantized linears, a
missing tokenizer, a non-empty target without `overwrite` are refused), converts,
writes atomically and measures the footprint on disk, against the fp16 model too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from quant.config import Config, ConfigError
from quant.config.scheme import QuantScheme
from quant.io import atomic_dir
from quant.methods import method, names
from quant.modules.linear import quant_linears

BYTES_PER_GB = 1e9


class CheckpointError(ConfigError):
    """A checkpoint on disk is not what its format promises (missing or mis-shaped tensor)."""


@dataclass(frozen=True)
class NoOptions(Config):
    """Exporters take no options: what they write follows from the scheme and dtype."""


@dataclass(frozen=True)
class DiskFootprint:
    bytes: int  # every file of the directory
    quantized_bytes: int  # tensors of the quantized linears (codes, scales, zero points, indices)
    quantized_weights: int
    bits_per_weight: float  # quantized linears: every stored bit of theirs per weight
    weights_bytes: int = 0  # the *.safetensors files (the whole model, not tokenizer/config)
    params: int = 0  # parameters of the unquantized model (tied tensors once)

    @property
    def fp16_bytes(self) -> int:
        """The same model in fp16 / bf16: 2 bytes per parameter."""
        return 2 * self.params

    def to_dict(self) -> dict[str, float]:
        out = {"size_bytes": self.bytes, "size_gb": self.bytes / BYTES_PER_GB,
               "quantized_bytes": self.quantized_bytes, "bits_per_weight": self.bits_per_weight,
               "weights_bytes": self.weights_bytes}
        if self.params:
            out.update(fp16_bytes=self.fp16_bytes, size_vs_fp16=self.weights_bytes / self.fp16_bytes,
                       bits_per_param=8 * self.weights_bytes / self.params)
        return out


def integer_state(ql) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes int32 [N, K], step sizes [N, G], integer zero points [N, G] or None) of a
    QuantLinear, exactly as its forward pass uses them (step sizes clamped by the grid)."""
    from quant.numerics import grid as P

    q, scale, zp = ql.integer_weight()
    scale = scale.float().clamp(P.SCALE_MIN, P.SCALE_MAX)
    return q, scale, None if zp is None else P.integer_zero_point(zp.float(), ql.spec.format)


def formats() -> list[str]:
    """The registered export formats."""
    return names("export")


def exporter(fmt: str, where: str = "convert.formats"):
    """An instance of the exporter registered as `fmt` (field-named error listing the known ones)."""
    return method(fmt, "export", where).fn()


def refuse_runtime_quant(scheme: QuantScheme, fmt: str) -> None:
    """Activation / KV-cache quantisation are not stored by formats that hold weights only."""
    for field in ("activation", "kv_cache"):
        if getattr(scheme, field) is not None:
            raise ConfigError(f"scheme.{field}={getattr(scheme, field).to_dict()} cannot be exported "
                              f"to {fmt!r}: the format stores weight-only quantisation; use "
                              f"scheme.{field}: null, or convert.formats: [half] (this project's "
                              "checkpoint keeps it)")


def check_int_weights(scheme: QuantScheme, fmt: str, bits: tuple[int, ...]) -> None:
    from quant.numerics.formats import IntFormat

    w = scheme.weight
    if w is None:
        raise ConfigError(f"scheme.weight=null: there are no quantized weights to pack into {fmt!r}")
    if not isinstance(w.format, IntFormat):
        raise ConfigError(f"scheme.weight.format={w.format.spec()!r} cannot be exported to {fmt!r}: "
                          f"it stores integer weights only (int{bits[0]}..int{bits[-1]})")
    if w.bits not in bits:
        raise ConfigError(f"scheme.weight.format=int{w.bits} cannot be exported to {fmt!r}; "
                          f"accepted: {[f'int{b}' for b in bits]}")


def export(model: nn.Module, tokenizer, scheme: QuantScheme, fmt: str, out: str | Path,
           dtype: torch.dtype = torch.float16, extra_files: dict[str, str] | None = None,
           overwrite: bool = False) -> DiskFootprint:
    """Write `model` (QuantLinear layers, half-converted) as `fmt` into `out`, atomically
    (with `extra_files`, name -> text, written beside it inside the same atomic step).
    A non-empty `out` is replaced only with `overwrite=True` (atomically: the old
    directory stays whole until the new one is complete)."""
    layers = dict(quant_linears(model))
    if not layers:
        raise ConfigError("convert.model: the model has no quantized linear layers (not a quantized "
                          "model); convert the output of calibrate, block_ap or e2e")
    exp = exporter(fmt)
    exp.check(scheme, layers)
    if tokenizer is None:
        raise ConfigError(f"export to {fmt!r}: no tokenizer was given; a published checkpoint carries "
                          "its tokenizer (load it with the model, e.g. quant.load_model)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"export to {fmt!r}: {out} exists and is not an empty directory; choose an "
                          "empty or new directory, or pass overwrite=True to replace it")
    with atomic_dir(out) as tmp:
        exp.write(model, tokenizer, scheme, tmp, dtype)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    if hasattr(exp, "disk_footprint"):  # formats that are not safetensors measure their own tensors
        return exp.disk_footprint(out, layers, unquantized_params(model))
    return disk_footprint(out, sorted(layers), {n: m.in_features * m.out_features for n, m in layers.items()},
                          unquantized_params(model))


def edit_config(out: Path, change) -> None:
    """Apply `change(dict)` to `out/config.json` in place (inside an export's temporary directory)."""
    f = Path(out) / "config.json"
    cfg = json.loads(f.read_text())
    change(cfg)
    f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_snippets(fmt: str, path: str, scheme: QuantScheme) -> dict[str, str]:
    """{runtime: code that loads a `fmt` checkpoint at `path`}; {} for a format that has none."""
    snippets = getattr(exporter(fmt), "load_snippets", None)
    return snippets(path, scheme) if snippets is not None else {}


def unquantized_params(model: nn.Module) -> int:
    """Parameters the model has in full precision: a quantized linear counts its weight matrix
    (however it stores it now) and bias, every other tensor its elements; tied tensors once."""
    from quant.modules.linear import QuantLinear
    from quant.modules.packed import PackedLinear

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear | PackedLinear):
            total += module.in_features * module.out_features
            if module.bias is not None:
                total += module.bias.numel()
            seen.update(id(t) for t in module.parameters())
            continue
        for t in module.parameters(recurse=False):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total


def disk_footprint(path: str | Path, layers: list[str], weights: dict[str, int], params: int = 0) -> DiskFootprint:
    """Bytes on disk, and the bytes of the quantized layers' tensors per weight (bias excluded);
    with `params` (the unquantized model's parameter count) also the size against fp16."""
    path = Path(path)
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    weights_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    qbytes = 0
    prefixes = tuple(f"{n}." for n in layers)
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                if k.startswith(prefixes) and not k.endswith(".bias"):
                    sl = st.get_slice(k)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    qbytes += numel * _DTYPE_BYTES[sl.get_dtype()]
    n = sum(weights.values())
    return DiskFootprint(total, qbytes, n, 8 * qbytes / n if n else 16.0, weights_bytes, params)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}


def expect(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...] | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """tensors[key], or a CheckpointError naming the tensor and what was expected."""
    if key not in tensors:
        raise CheckpointError(f"checkpoint tensor {key!r} is missing")
    t = tensors[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"checkpoint tensor {key!r} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(f"checkpoint tensor {key!r} has dtype {t.dtype}; expected {dtype}")
    return t
