"""Loading any model directory this project reads or writes, or a model by name.

Above `quant.checkpoint` (this project's fake-quant format and plain transformers
checkpoints) and `quant.export.loader` (packed exports): it tells them apart, so callers
need not know which stage wrote a directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_CACHE = Path.home() / ".cache" / "quant" / "models"


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", *,
               revision: str | None = None, trust_remote_code: bool = False,
               cache_dir: str | Path | None = None):
    """(model, tokenizer) from a directory (a Hugging Face checkpoint, this project's quantized
    checkpoint, or a packed export), or from a name (`embedded:smollm2-135m`, a Hugging Face id)
    converted once into `cache_dir` (default ~/.cache/quant/models)."""
    from quant.checkpoint import check_model_files, load_quantized
    from quant.export.loader import load_packed, packed_format
    from quant.models.hub import resolve_model

    path = Path(name_or_path)
    if not path.is_dir():
        name = str(name_or_path)
        slug = name.replace("/", "--").replace(":", "-") + (f"@{revision}" if revision else "")
        path = Path(cache_dir or DEFAULT_CACHE) / slug
        if not path.is_dir():
            resolve_model(name, path, revision, trust_remote_code)
    check_model_files(path)  # a corrupt file: an InputError naming it, before any format is read
    if packed_format(path) is not None:
        return load_packed(path, dtype, device)
    return load_quantized(path, dtype, device)
