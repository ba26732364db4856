"""The sweep's comparison: table (markdown + CSV) and plots (PPL / accuracy against bits per
weight with the Pareto front marked; wall time against quality). pandas + matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS = ["recipe", "bits", "status", "rank_ppl", "ppl_ratio", "acc_avg", "bits_per_weight", "size_gb",
           "seconds", "gpu_hours", "pareto", "failed_gates", "promoted", "error"]


def table(rows: list[dict[str, Any]], text: str) -> pd.DataFrame:
    recs = []
    for r in rows:
        rec = {c: r.get(c) for c in COLUMNS}
        for t, v in (r.get("ppl") or {}).items():
            rec[f"ppl {t}"] = v
        for s, v in (r.get("stage_seconds") or {}).items():
            rec[f"s {s}"] = v
        rec["failed_gates"] = "; ".join(r.get("failed_gates") or []) or ("" if r.get("status") == "finished" else "-")
        recs.append(rec)
    df = pd.DataFrame(recs)
    return df.rename(columns={"rank_ppl": f"PPL {text} (ranks)", "ppl_ratio": f"x fp ({text})"})


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return ""
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(v) for v in row) + " |\n" for row in df.itertuples(index=False))


def _plot(rows: list[dict[str, Any]], x: str, y: str, xlabel: str, ylabel: str, path: Path, front: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("status") == "finished" and r.get(x) is not None and r.get(y) is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:
        ax.scatter(r[x], r[y], marker="o" if not r.get("failed_gates") else "x",
                   color="tab:red" if r.get("pareto") and front else "tab:blue")
        ax.annotate(r["recipe"][:40], (r[x], r[y]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if front:
        fr = sorted((r[x], r[y]) for r in pts if r.get("pareto"))
        if fr:
            ax.step([a for a, _ in fr], [b for _, b in fr], where="post", color="tab:red", label="Pareto front")
            ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: list[dict[str, Any]], text: str, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    df = table(rows, text)
    md = out / "sweep.md"
    md.write_text(f"Ranked on `{text}` (a text from another source than the calibration text); "
                  "x = failed a gate, red = on the Pareto front (bits per weight vs PPL).\n\n" + _markdown(df))
    csv = out / "sweep.csv"
    df.to_csv(csv, index=False)
    files = {"markdown": md, "csv": csv}
    files["ppl_plot"] = _plot(rows, "bits_per_weight", "rank_ppl", "bits per weight", f"PPL {text}",
                              out / "ppl_vs_bits.png", front=True)
    files["acc_plot"] = _plot(rows, "bits_per_weight", "acc_avg", "bits per weight", "average accuracy",
                              out / "acc_vs_bits.png", front=False)
    files["time_plot"] = _plot(rows, "seconds", "rank_ppl", "wall time of the recipe (s)", f"PPL {text}",
                               out / "time_vs_quality.png", front=False)
    return files
