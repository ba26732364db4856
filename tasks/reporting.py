"""Comparison report across evaluation runs: a papers-shaped table and plots.

Input is plain data, one `Row` per evaluated model (the quantized model of a
run, and the full-precision model where the run scored it too), built from the
`evaluate` metrics layout (metrics/eval.json, or MLflow's flattened `a/b`
metric names unflattened). Where the rows come from (MLflow, files) is the
caller's business; this module only shapes and draws them.

The table follows LLM-QAT / EfficientQAT: one row per method and bit setting,
one column per task (accuracy in %, `acc` as lm-eval reports it), the average,
then perplexity per text, model size in GB and effective bits per weight.
Plots put effective bits per weight on x (quant.eval.footprint), so that group-size
overhead shows, with the full-precision model as a dashed reference line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

BASE_METHOD = "FP16"
BASE_SCHEME = "W16A16KV16"


@dataclass(frozen=True)
class Row:
    """One evaluated model."""

    method: str  # e.g. "rtn", or BASE_METHOD for the full-precision model
    scheme: str  # e.g. "W4A16KV16g64"
    bits_per_weight: float
    size_gb: float | None = None
    acc: Mapping[str, float] = field(default_factory=dict)  # task -> accuracy in [0, 1]
    avg: float | None = None  # the papers' average of `acc`
    avg_stderr: float | None = None  # its standard error, from the tasks' (independent) ones
    ppl: Mapping[str, float] = field(default_factory=dict)  # text -> perplexity
    run_id: str = ""
    order: float = 0.0  # e.g. the run's start time: the latest row of a (method, scheme) wins

    @property
    def is_base(self) -> bool:
        return self.method == BASE_METHOD


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """`{"piqa/acc": 0.7}` -> `{"piqa": {"acc": 0.7}}` (MLflow metric names back to eval.json)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(sep)
        node = out
        for p in parents:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):  # a leaf and a branch of one name: keep the leaf
                break
            node = nxt
        else:
            node[leaf] = value
    return out


def _row(metrics: Mapping[str, Any], ppl: Any, avg: Any, tasks: Sequence[str], method: str,
         scheme: str, default_bpw: float | None, run_id: str, order: float) -> Row | None:
    acc = {t: float(metrics[t]["acc"]) for t in tasks
           if isinstance(metrics.get(t), Mapping) and "acc" in metrics[t]}
    se = [metrics[t].get("acc_stderr") for t in acc]
    avg_se = math.sqrt(sum(x * x for x in se)) / len(se) if se and None not in se else None
    bpw = metrics.get("bits_per_weight", default_bpw)
    if bpw is None or (not acc and not ppl):
        return None
    return Row(method=method, scheme=scheme, bits_per_weight=float(bpw),
               size_gb=metrics.get("size_gb"), acc=acc, avg=None if avg is None else float(avg),
               avg_stderr=avg_se if avg is not None else None,
               ppl=dict(ppl or {}), run_id=run_id, order=order)


def rows_from_metrics(metrics: Mapping[str, Any], method: str, scheme: str, tasks: Sequence[str],
                      run_id: str = "", order: float = 0.0) -> list[Row]:
    """The quantized model's row and, if the run scored it, the full-precision model's row.

    `metrics` has the evaluate layout: `ppl`, `acc_avg`, `<task>: {acc, ..}`, `size_gb`,
    `bits_per_weight`; the full-precision model's `base_ppl`, `base_acc_avg` and
    `base: {<task>: .., size_gb, bits_per_weight}`."""
    rows = []
    q = _row(metrics, metrics.get("ppl"), metrics.get("acc_avg"), tasks, method, scheme, None,
             run_id, order)
    if q is not None:
        rows.append(q)
    base = metrics.get("base") if isinstance(metrics.get("base"), Mapping) else {}
    b = _row(base, metrics.get("base_ppl"), metrics.get("base_acc_avg"), tasks, BASE_METHOD,
             BASE_SCHEME, 16.0, run_id, order)
    if b is not None:
        rows.append(b)
    return rows


def latest(rows: Iterable[Row]) -> list[Row]:
    """One row per (method, scheme): the one with the largest `order`."""
    best: dict[tuple[str, str], Row] = {}
    for r in rows:
        key = (r.method, r.scheme)
        if key not in best or r.order >= best[key].order:
            best[key] = r
    return list(best.values())


def comparison_table(rows: Iterable[Row], task_labels: Mapping[str, str]) -> pd.DataFrame:
    """Rows = (Method, Bits), columns = tasks (acc %), Avg. and its standard error, PPL per
    text, Size (GB), Bits/weight.

    `task_labels` maps task name -> column title and fixes the column order."""
    rows = sorted(latest(rows), key=lambda r: (not r.is_base, r.method, -r.bits_per_weight, r.scheme))
    tasks = [t for t in task_labels if any(t in r.acc for r in rows)]
    texts = sorted({s for r in rows for s in r.ppl})
    records = []
    for r in rows:
        rec: dict[str, Any] = {"Method": r.method, "Bits": r.scheme}
        for t in tasks:
            rec[task_labels[t]] = 100 * r.acc[t] if t in r.acc else float("nan")
        rec["Avg."] = 100 * r.avg if r.avg is not None else float("nan")
        rec["Avg. s.e."] = 100 * r.avg_stderr if r.avg_stderr is not None else float("nan")
        for s in texts:
            rec[f"PPL {s}"] = r.ppl.get(s, float("nan"))
        rec["Size (GB)"] = r.size_gb if r.size_gb is not None else float("nan")
        rec["Bits/weight"] = r.bits_per_weight
        records.append(rec)
    columns = ["Method", "Bits", *(task_labels[t] for t in tasks), "Avg.", "Avg. s.e.",
               *(f"PPL {s}" for s in texts), "Size (GB)", "Bits/weight"]
    return pd.DataFrame.from_records(records, columns=columns).set_index(["Method", "Bits"])


def _fmt(value: Any, column: str) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:.3f}" if column == "Size (GB)" else f"{value:.2f}"
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table of `comparison_table`'s frame (no optional dependency)."""
    flat = df.reset_index()
    head = "| " + " | ".join(flat.columns) + " |"
    n_index = df.index.nlevels
    sep = "|" + "---|" * n_index + "---:|" * (len(flat.columns) - n_index)
    lines = [head, sep]
    for _, rec in flat.iterrows():
        lines.append("| " + " | ".join(_fmt(rec[c], c) for c in flat.columns) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Plots


def short_scheme(scheme: str) -> str:
    """`W4A16KV16g64` -> `W4g64`: drop the parts left in 16 bits."""
    return re.sub(r"(A16|KV16)(?=\D|$)", "", scheme) or scheme


def _plot_vs_bits(ax, df: pd.DataFrame, column: str, ylabel: str, err: str | None = None) -> None:
    flat = df.reset_index()
    base = flat[flat["Method"] == BASE_METHOD]
    quant = flat[(flat["Method"] != BASE_METHOD) & flat[column].notna()]
    for method, group in quant.groupby("Method", sort=True):
        group = group.sort_values("Bits/weight")
        yerr = group[err] if err is not None and group[err].notna().all() else None
        ax.errorbar(group["Bits/weight"], group[column], yerr=yerr, marker="o", capsize=3, label=method)
    if not base.empty and base[column].notna().any():
        value = float(base[column].iloc[0])
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label=f"{BASE_METHOD} ({value:.2f})")
        if err is not None and base[err].notna().any():
            e = float(base[err].iloc[0])
            ax.axhspan(value - e, value + e, color="black", alpha=0.08, linewidth=0)
    # one tick per bit setting, named once even when several methods share it
    ticks = quant.groupby(quant["Bits/weight"].round(2))["Bits"].agg(
        lambda s: "\n".join(sorted({short_scheme(b) for b in s})))
    if len(ticks):
        ax.set_xticks(list(ticks.index), [f"{x:.2f}\n{name}" for x, name in ticks.items()], fontsize=8)
        lo, hi = min(ticks.index), max(ticks.index)
        pad = max(0.25, 0.08 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("effective bits per weight")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_ppl(df: pd.DataFrame, path: str | Path) -> Path:
    """Perplexity against effective bits per weight, one panel per text (log scale when the
    values span more than a factor of 10, as low-bit collapse does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = [c for c in df.columns if c.startswith("PPL ")]
    if not texts:
        raise ValueError("the table holds no PPL column to plot")
    fig, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4.2), squeeze=False)
    for ax, col in zip(axes[0], texts, strict=True):
        _plot_vs_bits(ax, df, col, "perplexity")
        values = df[col].dropna()
        if len(values) and values.max() > 10 * values.min():
            ax.set_yscale("log")
        ax.set_title(col)
        ax.legend(fontsize=8)
    fig.suptitle("Perplexity vs bits per weight (lower is better)")
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy(df: pd.DataFrame, path: str | Path, chance: float | None = None) -> Path:
    """Average zero-shot accuracy (%) against effective bits per weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _plot_vs_bits(ax, df, "Avg.", "average accuracy (%)", err="Avg. s.e.")
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle=":", linewidth=1,
                   label=f"chance ({100 * chance:.1f})")
    ax.set_title("Average zero-shot accuracy (higher is better; bars: ±1 s.e.)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(rows: Iterable[Row], out_dir: str | Path, task_labels: Mapping[str, str],
                 chance: float | None = None, title: str = "Comparison") -> dict[str, Path]:
    """comparison.md, comparison.csv, ppl_vs_bits.png and (when tasks ran) acc_vs_bits.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = comparison_table(rows, task_labels)
    files = {}
    md = out / "comparison.md"
    md.write_text(f"## {title}\n\nAccuracy in % (lm-eval `acc`); Avg. = mean over the tasks, s.e. its standard error; "
                  "size in GB (1e9 bytes) as deployed.\n\n" + to_markdown(df))
    files["markdown"] = md
    df.to_csv(out / "comparison.csv")
    files["csv"] = out / "comparison.csv"
    if any(c.startswith("PPL ") for c in df.columns) and len(df):
        files["ppl_plot"] = plot_ppl(df, out / "ppl_vs_bits.png")
    if df["Avg."].notna().any():
        files["acc_plot"] = plot_accuracy(df, out / "acc_vs_bits.png", chance)
    return files


def plot_block_losses(per_block: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """Block-wise training: validation MSE per block before and after (the state kept); when
    the method reports sub-steps (TesseraQ: loss and hardened fraction per threshold step),
    a second panel shows them per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [b for b in per_block if b.get("steps")]
    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(13 if steps else 7, 4), squeeze=False)
    ax = axes[0][0]
    blocks = [b["block"] for b in per_block]
    ax.plot(blocks, [b["val_loss_init"] for b in per_block], "o-", label="before (calibrated init)")
    ax.plot(blocks, [b["val_loss_final"] for b in per_block], "o-", label="after (state kept)")
    ax.set(xlabel="decoder block", ylabel="validation MSE vs full precision", yscale="log", title=title)
    ax.legend()
    if steps:
        ax, twin = axes[0][1], axes[0][1].twinx()
        cmap = plt.get_cmap("viridis")
        for k, b in enumerate(steps):
            color = cmap(k / max(1, len(steps) - 1))
            xs = range(1, len(b["steps"]) + 1)
            ax.plot(xs, [s["loss"] for s in b["steps"]], "-", color=color, label=f"block {b['block']}")
            twin.plot(xs, [s["hardened"] for s in b["steps"]], ":", color=color)
        ax.set(xlabel="threshold step", ylabel="train MSE (solid, log)", yscale="log",
               title="per step: loss and hardened fraction")
        twin.set(ylabel="hardened fraction (dotted)", ylim=(0, 1.02))
        if len(steps) <= 12:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
