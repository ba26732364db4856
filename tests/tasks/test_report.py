"""Comparison report: rows from the eval.json / MLflow layout, the papers-shaped table, the
markdown, the plots, and gathering comparable runs from an MLflow store."""

from __future__ import annotations

import math

import pytest

from tasks.reporting import (
    BASE_METHOD,
    Row,
    comparison_table,
    rows_from_metrics,
    short_scheme,
    to_markdown,
    unflatten,
    write_report,
)

LABELS = {"piqa": "PIQA", "winogrande": "WinoGrande", "hellaswag": "HellaSwag"}


def eval_json(acc_piqa: float, ppl: float, bpw: float = 4.3125, base: bool = True) -> dict:
    m = {
        "ppl": {"embedded-wiki": ppl, "lee": 2 * ppl}, "tokens": {"lee": 10},
        "piqa": {"acc": acc_piqa, "acc_norm": 0.1, "acc_stderr": 0.1, "n": 10},
        "winogrande": {"acc": 0.5, "acc_stderr": 0.2, "n": 10},
        "acc_avg": (acc_piqa + 0.5) / 2, "size_gb": 0.114, "bits_per_weight": bpw,
    }
    if base:
        m.update(base_ppl={"embedded-wiki": 20.0, "lee": 40.0}, base_acc_avg=0.65,
                 base={"piqa": {"acc": 0.8}, "winogrande": {"acc": 0.5}, "size_gb": 0.269,
                       "bits_per_weight": 16.0})
    return m


def test_rows_from_metrics_quantized_and_base():
    q, b = rows_from_metrics(eval_json(0.6, 25.0), "rtn", "W4A16KV16g64", list(LABELS), run_id="r1")
    assert (q.method, q.scheme, q.bits_per_weight, q.avg) == ("rtn", "W4A16KV16g64", 4.3125, 0.55)
    assert q.acc == {"piqa": 0.6, "winogrande": 0.5} and q.ppl == {"embedded-wiki": 25.0, "lee": 50.0}
    assert (b.method, b.bits_per_weight, b.avg, b.size_gb) == (BASE_METHOD, 16.0, 0.65, 0.269)
    assert b.ppl == {"embedded-wiki": 20.0, "lee": 40.0}
    assert len(rows_from_metrics(eval_json(0.6, 25.0, base=False), "rtn", "W4", list(LABELS))) == 1


def test_unflatten_inverts_mlflow_names():
    flat = {"piqa/acc": 0.6, "base/piqa/acc": 0.8, "ppl/lee": 50.0, "acc_avg": 0.55}
    assert unflatten(flat) == {"piqa": {"acc": 0.6}, "base": {"piqa": {"acc": 0.8}},
                               "ppl": {"lee": 50.0}, "acc_avg": 0.55}


def test_table_shape_order_and_latest_run_wins():
    rows = (rows_from_metrics(eval_json(0.6, 25.0), "rtn", "W4A16KV16g64", list(LABELS), order=1)
            + rows_from_metrics(eval_json(0.7, 24.0), "rtn", "W4A16KV16g64", list(LABELS), order=2)
            + rows_from_metrics(eval_json(0.5, 60.0, bpw=3.3125), "rtn", "W3A16KV16g64", list(LABELS), order=3)
            + rows_from_metrics(eval_json(0.65, 23.0), "awq", "W4A16KV16g64", list(LABELS), order=4))
    df = comparison_table(rows, LABELS)
    # rows = method x bits (the base once), columns = tasks + Avg. + PPL per text + size + bits
    assert list(df.index) == [(BASE_METHOD, "W16A16KV16"), ("awq", "W4A16KV16g64"),
                              ("rtn", "W4A16KV16g64"), ("rtn", "W3A16KV16g64")]
    assert list(df.columns) == ["PIQA", "WinoGrande", "Avg.", "Avg. s.e.", "PPL embedded-wiki", "PPL lee",
                                "Size (GB)", "Bits/weight"]  # no HellaSwag: no run has it
    assert df.loc[("rtn", "W4A16KV16g64"), "PIQA"] == pytest.approx(70.0)  # order 2 beat order 1
    assert df.loc[("rtn", "W4A16KV16g64"), "Avg."] == pytest.approx(60.0)
    assert df.loc[(BASE_METHOD, "W16A16KV16"), "Bits/weight"] == 16.0

    md = to_markdown(df)
    lines = md.strip().splitlines()
    assert lines[0] == ("| Method | Bits | PIQA | WinoGrande | Avg. | Avg. s.e. | PPL embedded-wiki | PPL lee | "
                        "Size (GB) | Bits/weight |")
    assert len(lines) == 2 + 4
    # s.e. of the mean of two tasks with stderr 0.1 and 0.2: sqrt(0.01 + 0.04) / 2
    assert "| rtn | W3A16KV16g64 | 50.00 | 50.00 | 50.00 | 11.18 | 60.00 | 120.00 | 0.114 | 3.31 |" in lines
    assert math.isnan(df.loc[(BASE_METHOD, "W16A16KV16"), "Avg. s.e."])  # base rows carry no stderr


def test_missing_values_show_as_dash():
    rows = [Row("rtn", "W4", 4.5, acc={"piqa": 0.5}, avg=0.5, ppl={}),
            Row("gptq", "W4", 4.5, acc={}, avg=None, ppl={"lee": 30.0})]
    df = comparison_table(rows, LABELS)
    assert math.isnan(df.loc[("gptq", "W4"), "PIQA"])
    assert "| gptq | W4 | – | – | – | 30.00 | – | 4.50 |" in to_markdown(df)


def test_short_scheme():
    assert short_scheme("W4A16KV16g64") == "W4g64"
    assert short_scheme("W4A8KV4") == "W4A8KV4"
    assert short_scheme("W2A16KV16") == "W2"


def test_report_files_and_plots_written(tmp_path):
    rows = []
    for i, (bits, ppl, acc) in enumerate([(4, 25.0, 0.6), (3, 60.0, 0.5), (2, 3000.0, 0.4)]):
        rows += rows_from_metrics(eval_json(acc, ppl, bpw=bits + 0.3125), "rtn", f"W{bits}A16KV16g64",
                                  list(LABELS), order=i)
    files = write_report(rows, tmp_path, LABELS, chance=0.5)
    assert set(files) == {"markdown", "csv", "ppl_plot", "acc_plot"}
    for key in ("ppl_plot", "acc_plot"):
        data = files[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "| FP16 | W16A16KV16 |" in files["markdown"].read_text()
    assert files["csv"].read_text().splitlines()[0].startswith("Method,Bits,PIQA")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries

    # PPL only (tasks off): no accuracy plot
    ppl_only = [Row("rtn", "W4", 4.3, ppl={"lee": 30.0}), Row(BASE_METHOD, "W16", 16.0, ppl={"lee": 20.0})]
    files = write_report(ppl_only, tmp_path / "ppl", LABELS)
    assert set(files) == {"markdown", "csv", "ppl_plot"}


def test_collect_comparable_runs_from_mlflow(tmp_path, monkeypatch):
    """Only finished evaluate runs with the same evaluation settings and the method/scheme tags."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("QUANT_EXPERIMENT", "report-test")
    from quant.config import flatten
    from tasks import common
    from tasks.report import collect_rows, comparable_params

    settings = {"model.name_or_path": "embedded:smollm2-135m", "evaluate.limit": 10}

    def log_run(limit, scheme, acc, stage="evaluate", tags=True):
        with common.stage_run(stage, {**settings, "evaluate.limit": limit}) as ml:
            common.log_metrics(ml, eval_json(acc, 25.0))
            if tags:
                ml.set_tags({"method": "rtn", "scheme": scheme})

    log_run(10, "W4A16KV16g64", 0.6)
    log_run(10, "W3A16KV16g64", 0.5)
    log_run(20, "W2A16KV16g64", 0.4)  # other limit: not comparable
    log_run(10, "W8A16KV16g64", 0.7, stage="calibrate")  # not an evaluate run
    log_run(10, "W5A16KV16g64", 0.7, tags=False)  # no method/scheme tags
    mlflow = common._mlflow()
    match = comparable_params(settings)
    rows = collect_rows(mlflow, ["report-test", "no-such-experiment"], match)
    got = {(r.method, r.scheme): r for r in rows}
    assert set(got) == {("rtn", "W4A16KV16g64"), ("rtn", "W3A16KV16g64"), (BASE_METHOD, "W16A16KV16")}
    assert got[("rtn", "W4A16KV16g64")].acc["piqa"] == 0.6
    assert flatten(eval_json(0.6, 25.0), sep="/")["piqa/acc"] == 0.6
    assert len(collect_rows(mlflow, ["report-test"], None)) == 6  # --all: three runs x (q + base)
