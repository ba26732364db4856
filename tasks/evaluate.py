"""evaluate: perplexity of the base and the quantized model on every evaluation text.

Reads artifacts/prepare/{model,data/eval} and artifacts/<evaluate.model>/model.
Writes metrics/eval.json (dvc metrics), artifacts/evaluate/results.md, prints
the table, and logs both to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quant.config import Config, ConfigError
from quant.data import tokenize_text
from quant.model_io import load_model, read_scheme
from quant.ppl import perplexity
from tasks.common import Params, log_artifact, main, setup_torch, stage_dir, write_json


@dataclass(frozen=True)
class EvaluateConfig(Config):
    model: str = "calibrate"  # the stage whose model is evaluated
    include_base: bool = True  # also score the full-precision model
    seq_len: int = 2048
    batch_size: int = 1
    max_windows: int | None = 16  # per text; null = the whole text

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} must be >= 2")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"max_windows={self.max_windows} must be >= 1 or null")


def eval_texts() -> dict[str, str]:
    d = stage_dir("prepare") / "data" / "eval"
    return {p.stem: p.read_text() for p in sorted(d.glob("*.txt"))}


def ppl_table(model_dir: Path, texts: dict[str, str], cfg: EvaluateConfig, device, dtype) -> dict[str, Any]:
    model, tokenizer = load_model(model_dir, dtype, device)
    out = {}
    for name, text in texts.items():
        r = perplexity(model, tokenize_text(tokenizer, text), cfg.seq_len, cfg.batch_size, cfg.max_windows)
        out[name] = {"ppl": r.ppl, "tokens": r.tokens}
    del model
    return out


def markdown(rows: dict[str, dict[str, Any]], texts: list[str]) -> str:
    head = "| model | " + " | ".join(f"PPL {t}" for t in texts) + " |"
    sep = "|---|" + "---:|" * len(texts)
    lines = [head, sep]
    for label, res in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{res[t]['ppl']:.3f}" for t in texts) + " |")
    return "\n".join(lines) + "\n"


def run(params: Params) -> dict[str, Any]:
    cfg = params.section("evaluate", EvaluateConfig)
    qdir = stage_dir(cfg.model) / "model"
    if not qdir.exists():
        raise ConfigError(f"evaluate.model={cfg.model!r}: {qdir} does not exist; run that stage first")
    device, dtype = setup_torch(params.base)
    texts = eval_texts()
    scheme = read_scheme(qdir)
    label = f"{cfg.model} {scheme.name if scheme else 'fp'}"
    rows = {}
    if cfg.include_base:
        rows["full precision"] = ppl_table(stage_dir("prepare") / "model", texts, cfg, device, dtype)
    rows[label] = ppl_table(qdir, texts, cfg, device, dtype)
    table = markdown(rows, list(texts))
    out = stage_dir("evaluate")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    print("\n" + table)
    metrics = {"ppl": {t: rows[label][t]["ppl"] for t in texts}, "tokens": {t: rows[label][t]["tokens"] for t in texts}}
    if cfg.include_base:
        metrics["base_ppl"] = {t: rows["full precision"][t]["ppl"] for t in texts}
    write_json("metrics/eval.json", metrics)
    log_artifact(out / "results.md")
    log_artifact("metrics/eval.json")
    return metrics


if __name__ == "__main__":
    main("evaluate", run)
