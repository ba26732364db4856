"""The registry's form of a packed checkpoint: an MLflow pyfunc that generates from it.

transformers cannot load every packed checkpoint this project writes (GPTQ needs
GPTQModel; asymmetric compressed-tensors fails in transformers 5.23 +
compressed-tensors 0.20, see docs/exports.md), so `register` logs a packed
model as a pyfunc: the checkpoint directory is the model's artifact, `quant/` and
`tasks/` ride along as code, and `load_context` loads it with
`quant.export.loader.load_packed` (PackedLinear layers; the CPU fallback computes
from the packed weights, `QUANT_PACKED_BACKEND=gemlite|torch-int4` picks a GPU kernel).
`predict` takes prompts (a list of strings or a one-column DataFrame) and returns the
greedy continuations, like the transformers flavour's text-generation pipeline.

On the `torch` backend (the CPU) every forward of a packed layer would unpack and
dequantize its weight again: 12 tokens took minutes. The model is used for inference
only, so `load_context` dequantizes each packed weight once
(`quant.modules.runtime.dequantize_once`, bit for bit what the forward computes), at the
cost of a float copy of the weights in memory (what the full-precision model takes);
`QUANT_PACKED_DEQUANTIZE=per-forward` keeps memory at the packed size instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 32


DEQUANTIZE_ENV = "QUANT_PACKED_DEQUANTIZE"  # once (default) | per-forward, for the `torch` backend


class PackedCausalLM(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from quant.export.loader import load_packed

        cuda = torch.cuda.is_available()
        backend = os.environ.get("QUANT_PACKED_BACKEND", "torch")
        self.model, self.tokenizer = load_packed(
            context.artifacts["model"], torch.float16 if cuda else torch.float32, "cuda" if cuda else "cpu",
            backend)
        mode = os.environ.get(DEQUANTIZE_ENV, "once")
        if mode not in ("once", "per-forward"):
            raise ValueError(f"${DEQUANTIZE_ENV}={mode!r}; accepted: once, per-forward")
        if backend == "torch" and mode == "once":
            _dequantize_for_good(self.model)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        import torch

        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        max_new = int((params or {}).get("max_new_tokens", MAX_NEW_TOKENS))
        device = next(self.model.buffers()).device
        out = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").to(device)
            with torch.no_grad():
                gen = self.model.generate(**ids, max_new_tokens=max_new, do_sample=False)
            out.append(self.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        return out


def _dequantize_for_good(model) -> int:
    """Enter `dequantize_once` for the model's lifetime; the cached weights are dropped when
    the model is collected, or at interpreter exit before module teardown."""
    import contextlib
    import weakref

    from quant.modules.runtime import dequantize_once

    stack = contextlib.ExitStack()
    n = stack.enter_context(dequantize_once(model))
    weakref.finalize(model, stack.close)
    return n


def log_packed_model(model_dir: Path, pip_requirements: list[str]):
    """Log `model_dir` (a packed checkpoint) as the run's `model` pyfunc; returns the ModelInfo."""
    from mlflow.models import infer_signature

    signature = infer_signature(["a prompt"], ["a continuation"], params={"max_new_tokens": MAX_NEW_TOKENS})
    return mlflow.pyfunc.log_model(
        name="model", python_model=PackedCausalLM(), artifacts={"model": str(model_dir)},
        code_paths=[str(ROOT / "quant"), str(ROOT / "tasks")], pip_requirements=pip_requirements,
        signature=signature)


def footprint_tags(model_dir: Path, convert_metrics: Path = Path("metrics/convert.json")) -> dict[str, str]:
    """Format, bytes on disk and bits per weight of the registered checkpoint, as version tags."""
    tags = {"size_bytes": str(sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()))}
    converted = model_dir.resolve() == Path("artifacts/convert/model").resolve()
    if converted and convert_metrics.is_file():
        m = json.loads(convert_metrics.read_text())
        entry = m["formats"].get(m["primary_format"], {})
        tags.update(format=m["primary_format"], bits_per_weight=f"{entry.get('bits_per_weight', 0):.4f}")
    return tags
