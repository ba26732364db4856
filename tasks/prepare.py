"""prepare: resolve the base model to local safetensors + tokenizer; write text files.

Outputs (each written atomically):
- artifacts/prepare/model/        safetensors weights, config, tokenizer files
- artifacts/prepare/data/calib.txt            calibration text
- artifacts/prepare/data/eval/<name>.txt      one file per evaluation text
- metrics/prepare.json
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quant.config import Config, ConfigError
from quant.io import atomic_dir
from quant.models.hub import EMBEDDED_PREFIX, embedded_gguf_path, resolve_model
from tasks import textdata as data
from tasks.common import Params, main, stage_dir, write_json

EVAL_SOURCES = ("embedded-wiki", "lee", "wikitext2", "c4")
CALIB_SOURCES = ("embedded-wiki", "wikitext2", "c4")


@dataclass(frozen=True)
class PrepareConfig(Config):
    calib_source: str = "embedded-wiki"
    eval_sets: tuple[str, ...] = ("embedded-wiki", "lee")
    wiki_eval_every: int = 5  # every 5th article of the embedded sample is held out
    c4_docs: int = 2000  # documents of c4 used (calibration and evaluation)

    def __post_init__(self) -> None:
        if self.calib_source not in CALIB_SOURCES:
            raise ConfigError(
                f"calib_source={self.calib_source!r} is not accepted; use one of {list(CALIB_SOURCES)}"
            )
        bad = [s for s in self.eval_sets if s not in EVAL_SOURCES]
        if bad or not self.eval_sets:
            raise ConfigError(
                f"eval_sets={list(self.eval_sets)} is not accepted; use a non-empty list of {list(EVAL_SOURCES)}"
            )
        if self.wiki_eval_every < 2:
            raise ConfigError(f"wiki_eval_every={self.wiki_eval_every} must be >= 2")


def _texts(cfg: PrepareConfig) -> tuple[str, dict[str, str]]:
    wiki_calib, wiki_eval = (None, None)
    if "embedded-wiki" in (cfg.calib_source, *cfg.eval_sets):
        wiki_calib, wiki_eval = data.split_wiki(cfg.wiki_eval_every)
    if cfg.calib_source == "embedded-wiki":
        calib = "\n\n".join(wiki_calib)
    else:
        calib = "\n\n".join(data.hf_texts(cfg.calib_source, "train", cfg.c4_docs))
    evals = {}
    for name in cfg.eval_sets:
        if name == "embedded-wiki":
            evals[name] = "\n\n".join(wiki_eval)
        elif name == "lee":
            evals[name] = data.lee_text()
        else:
            evals[name] = "\n\n".join(data.hf_texts(name, "eval", cfg.c4_docs))
    return calib, evals


def run(params: Params) -> dict[str, Any]:
    cfg = params.section("prepare", PrepareConfig)
    name = params.model.name_or_path
    if name.startswith(EMBEDDED_PREFIX):
        embedded_gguf_path(name[len(EMBEDDED_PREFIX):])  # fail early: unknown key / missing package
    out = stage_dir("prepare")
    calib, evals = _texts(cfg)
    resolve_model(name, out / "model", params.model.revision, params.model.trust_remote_code)
    with atomic_dir(out / "data") as tmp:
        (tmp / "calib.txt").write_text(calib)
        (tmp / "eval").mkdir()
        for k, text in evals.items():
            (tmp / "eval" / f"{k}.txt").write_text(text)
    metrics = {"calib_chars": len(calib), "eval_chars": {k: len(v) for k, v in evals.items()}}
    write_json("metrics/prepare.json", metrics)
    return metrics


if __name__ == "__main__":
    main("prepare", run)
