"""The registry's form of a packed checkpoint: an MLflow pyfunc that generates from it.

transformers alone does not load every packed checkpoint this project writes (GPTQ
needs GPTQModel + optimum; docs/compatibility.md), so `register` logs a packed
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


CONVERT_METRICS = Path("metrics/convert.json")


def _converted(model_dir: Path, convert_metrics: Path) -> dict | None:
    """metrics/convert.json when `model_dir` is the convert stage's model, else None."""
    if model_dir.resolve() == Path("artifacts/convert/model").resolve() and convert_metrics.is_file():
        return json.loads(convert_metrics.read_text())
    return None


def footprint_tags(model_dir: Path, convert_metrics: Path = CONVERT_METRICS) -> dict[str, str]:
    """Format, bytes on disk and bits per weight of the registered checkpoint, and every format
    the version carries (`formats`: the model first, then the `formats/<fmt>` artifacts), as tags."""
    tags = {"size_bytes": str(sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()))}
    m = _converted(model_dir, convert_metrics)
    if m is not None:
        entry = m["formats"].get(m["primary_format"], {})
        others = [f for f in m["formats"] if f != m["primary_format"]]
        tags.update(format=m["primary_format"], formats=",".join([m["primary_format"], *others]),
                    bits_per_weight=f"{entry.get('bits_per_weight', 0):.4f}")
        if "size_vs_fp16" in entry:
            tags["size_vs_fp16"] = f"{entry['size_vs_fp16']:.4f}"
    return tags


def card_metrics(eval_metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of metrics/eval.json a model card shows: PPL per text (and full precision's),
    average zero-shot accuracy (and full precision's)."""
    out = {}
    for group in ("ppl", "base_ppl"):
        for text, v in (eval_metrics.get(group) or {}).items():
            out[f"{'full-precision ' if group == 'base_ppl' else ''}perplexity, {text}"] = float(v)
    for key, label in (("acc_avg", "average zero-shot accuracy"), ("base_acc_avg", "full-precision average "
                                                                                  "zero-shot accuracy")):
        if isinstance(eval_metrics.get(key), int | float):
            out[label] = float(eval_metrics[key])
    return out


def log_formats(model_dir: Path, eval_metrics: dict[str, Any], convert_metrics: Path = CONVERT_METRICS) -> list[str]:
    """Log, on the active run, every other format of a converted model (`formats/<fmt>/`, with
    convert's manifest) and each format's model card rendered with evaluate's numbers
    (`model_card/<fmt>/README.md`); returns the formats, the registered one first."""
    import mlflow

    from quant.export.card import CARD_FILE, read_facts, render_card

    m = _converted(model_dir, convert_metrics)
    if m is None:
        return []
    measured = card_metrics(eval_metrics)
    dirs = {fmt: Path(e["path"]) for fmt, e in m["formats"].items()}
    for fmt, path in dirs.items():
        if fmt != m["primary_format"]:
            mlflow.log_artifacts(str(path), f"formats/{fmt}")
        facts = read_facts(path)
        if facts is not None:  # measured on the registered (first) format; the others hold the same codes
            source = "the evaluate stage" + ("" if fmt == m["primary_format"] else
                                             f" on the {m['primary_format']} export of the same integer weights")
            mlflow.log_text(render_card(facts, ".", measured, source), f"model_card/{fmt}/{CARD_FILE}")
    manifest = dirs[m["primary_format"]].parent / "formats" / "manifest.json"
    if manifest.is_file():
        mlflow.log_artifact(str(manifest), "formats")
    return [m["primary_format"], *[f for f in dirs if f != m["primary_format"]]]
