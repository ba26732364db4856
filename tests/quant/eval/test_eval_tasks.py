"""lm-eval metric extraction and renaming, the evaluate config, the eval.json layout, the
footprint arithmetic, and a tiny random Llama run through two generated tasks end to end."""

from __future__ import annotations

import pytest
import torch

from quant.config import ConfigError, flatten
from quant.config.scheme import QuantScheme, WeightSpec
from quant.eval import lm_tasks
from quant.eval.footprint import footprint
from quant.numerics.formats import IntFormat
from tasks.evaluate import EvaluateConfig, eval_metrics, task_markdown

# what simple_evaluate returns, trimmed to the parts read
LM_EVAL_RESULTS = {
    "results": {
        "piqa": {"alias": "piqa", "acc,none": 0.75, "acc_stderr,none": 0.25, "acc_norm,none": 0.5,
                 "acc_norm_stderr,none": 0.2886},
        "winogrande": {"alias": "winogrande", "acc,none": 0.5, "acc_stderr,none": "N/A",
                       "bleu,some_filter": 3.0},
    },
    "n-samples": {"piqa": {"original": 1838, "effective": 4}, "winogrande": {"original": 1267, "effective": 4}},
}


def test_extract_metrics_renames_and_drops_non_numbers():
    m = lm_tasks.extract_metrics(LM_EVAL_RESULTS, ["piqa", "winogrande"])
    assert m == {
        "piqa": {"acc": 0.75, "acc_stderr": 0.25, "acc_norm": 0.5, "acc_norm_stderr": 0.2886, "n": 4},
        "winogrande": {"acc": 0.5, "n": 4},  # "N/A" stderr and other filters dropped
    }
    assert lm_tasks.average(m) == pytest.approx(0.625)
    with pytest.raises(KeyError, match="no task 'boolq'"):
        lm_tasks.extract_metrics(LM_EVAL_RESULTS, ["boolq"])


def test_metric_names_are_mlflow_safe():
    """eval.json nests per task; MLflow gets `piqa/acc` (tasks.common.log_metrics flattens with /)."""
    res = {"ppl": {"lee": {"ppl": 30.0, "tokens": 100}}, "ppl_seconds": 1.0, "tasks_seconds": 2.0,
           "tasks": lm_tasks.extract_metrics(LM_EVAL_RESULTS, ["piqa", "winogrande"]),
           "footprint": {"size_gb": 0.1, "bits_per_weight": 4.3125}}
    base = {**res, "tasks": {"piqa": {"acc": 1.0}, "winogrande": {"acc": 1.0}},
            "footprint": {"size_gb": 0.2, "bits_per_weight": 16.0}}
    metrics = eval_metrics({"fp": base, "q": res}, "q", "fp", ["lee"], ("piqa", "winogrande"))
    flat = flatten(metrics, sep="/")
    assert flat["piqa/acc"] == 0.75 and flat["piqa/acc_norm"] == 0.5 and flat["winogrande/n"] == 4
    assert flat["acc_avg"] == pytest.approx(0.625) and flat["base_acc_avg"] == 1.0
    assert flat["base/piqa/acc"] == 1.0 and flat["base/bits_per_weight"] == 16.0
    assert flat["ppl/lee"] == 30.0 and flat["base_ppl/lee"] == 30.0 and flat["bits_per_weight"] == 4.3125
    import re

    assert all(re.fullmatch(r"[\w\-./ ]+", k) for k in flat)  # MLflow's accepted characters
    table = task_markdown({"fp": base["tasks"], "q": res["tasks"]}, ("piqa", "winogrande"), "acc")
    assert "| q | 75.00 | 50.00 | 62.50 |" in table


def test_evaluate_config_validation():
    cfg = EvaluateConfig.from_dict({"tasks": ["piqa"], "limit": 5, "task_batch_size": "auto"}, "evaluate")
    assert cfg.task_run("cpu").batch_size == 8 and cfg.task_run("cuda").batch_size == "auto"
    assert EvaluateConfig.from_dict({"task_batch_size": 4}).task_run("cuda").batch_size == 4
    assert EvaluateConfig.from_dict({"tasks": []}).tasks == ()
    with pytest.raises(ConfigError, match=r"evaluate.tasks: unknown task\(s\) \['arc'\]"):
        EvaluateConfig.from_dict({"tasks": ["arc"]}, "evaluate")
    with pytest.raises(ConfigError, match="evaluate.limit=0 must be >= 1 or null"):
        EvaluateConfig.from_dict({"limit": 0}, "evaluate")
    with pytest.raises(ConfigError, match="task_batch_size"):
        EvaluateConfig.from_dict({"task_batch_size": "big"}, "evaluate")
    with pytest.raises(ConfigError, match="task_source"):
        EvaluateConfig.from_dict({"task_source": "hub"}, "evaluate")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['evaluate.limits'\]"):
        EvaluateConfig.from_dict({"limits": 3}, "evaluate")


def test_footprint_counts_bits_exactly(tiny_llama):
    from quant.calibrate.rtn import quantize_linears
    from quant.modules.linear import quant_linears

    n_all = sum(p.numel() for p in tiny_llama.parameters())
    fp = footprint(tiny_llama)
    assert fp.bits_per_weight == 16.0 and fp.size_gb == pytest.approx(n_all * 2 / 1e9)

    scheme = QuantScheme(weight=WeightSpec(IntFormat(4), group_size=32, symmetric=False))
    quantize_linears(tiny_llama, scheme)
    linears = dict(quant_linears(tiny_llama))
    n_q = sum(m.in_features * m.out_features for m in linears.values())
    fq = footprint(tiny_llama)
    # 4-bit weights + per group of 32 an fp16 step size and a 4-bit zero point
    assert fq.bits_per_weight == pytest.approx(4 + (16 + 4) / 32)
    assert fq.quantized_weights == n_q and fq.parameters == n_all
    assert fq.size_gb == pytest.approx(((n_all - n_q) * 16 + n_q * (4 + 20 / 32)) / 8 / 1e9)


def test_tiny_model_two_generated_tasks_end_to_end(embedded_tokenizer, tmp_path):
    """A random tiny Llama over the embedded tokenizer through simple_evaluate, limit 3."""
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(vocab=len(embedded_tokenizer), max_positions=2048)
    run = lm_tasks.TaskRun(names=("piqa", "winogrande"), limit=3, batch_size=4)
    results = lm_tasks.run_tasks(model, embedded_tokenizer, run, tmp_path)
    m = lm_tasks.extract_metrics(results, run.names)
    assert m["piqa"]["n"] == m["winogrande"]["n"] == 3
    assert set(m["piqa"]) >= {"acc", "acc_norm"} and "acc_norm" not in m["winogrande"]
    for task in m.values():
        assert task["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert (tmp_path / "piqa.yaml").exists() and len((tmp_path / "piqa.jsonl").read_text().splitlines()) == 3

    # the same accuracies from log-likelihoods computed here, without lm-eval's batching
    assert m["piqa"]["acc"] == pytest.approx(_reference_acc(model, embedded_tokenizer, "piqa", 3))
    assert m["winogrande"]["acc"] == pytest.approx(_reference_acc(model, embedded_tokenizer, "winogrande", 3))


@torch.no_grad()
def _loglik(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context), split into tokens as lm-eval does: encode the whole
    string and the context, the continuation is the difference."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def _reference_acc(model, tok, name: str, limit: int) -> float:
    right = 0
    for row in lm_tasks.hf_rows(name, limit):
        doc = lm_tasks.TASKS[name].render(row)
        if "contexts" in doc:  # partial scoring: options fill the blank, the rest is scored
            scores = [_loglik(model, tok, c, " " + doc["continuation"]) for c in doc["contexts"]]
        else:
            scores = [_loglik(model, tok, doc["query"], " " + c) for c in doc["choices"]]
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
    return right / limit
