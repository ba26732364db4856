"""The LLM-QAT table as a DVC experiment matrix (the pipeline's own stages).

For each published W-A-KV setting two experiments of the same pipeline:

  rtn-<w>-<a>-<kv>   calibrate (RTN weights + A/KV quantizers) -> evaluate
  qat-<w>-<a>-<kv>   calibrate -> e2e (method kd, from the calibrate model) -> evaluate

plus `qat-<w>-<a>-<kv>-real` trained on the calibration text (`e2e.data.source:
calib`) with the same number of tokens as the synthetic run (`--real`). The
scheme is the LLM-QAT one: weights per output channel, symmetric, min-max
recomputed every step; activations and KV cache per token, symmetric.

Every experiment is `dvc exp run --temp -n <name> -S ...`: it runs in a
temporary copy, so the shared workspace and its params.yaml stay untouched;
DVC's run cache reuses the calibrate stage between rtn-X and qat-X. `collect`
reads `dvc exp show --json`, writes the table (markdown + json) under
artifacts/llm_qat_matrix/ and logs it to MLflow as an artifact.

    python scripts/llm_qat_matrix.py run [--configs 4-8-4,4-6-16] [--scale smoke] [--dry]
    python scripts/llm_qat_matrix.py collect [--mlflow]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "artifacts" / "llm_qat_matrix"
# this interpreter's dvc, and its bin directory first on PATH so stages run `python` of the same venv
DVC = (sys.executable, "-m", "dvc")
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
       # stage runs of `--temp` experiments land in this repository's tracking store, not the temp copy's
       "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow' / 'mlflow.db'}")}
PUBLISHED = ("4-8-4", "4-8-8", "4-6-16", "4-8-16", "4-16-16", "8-8-4", "8-8-8", "8-8-16")

# Training / evaluation sizes. `smoke` proves the wiring on a 2-core CPU; `default`
# is what a GPU runs in minutes; paper scale is 100k synthetic sequences of 2048.
SCALES = {
    "smoke": {"e2e.data.train_samples": 8, "e2e.data.val_samples": 2, "e2e.data.seq_len": 64,
              "e2e.train.batch_size": 4, "e2e.train.max_steps": 2, "evaluate.max_windows": 1,
              "evaluate.seq_len": 256, "evaluate.tasks": "[]", "e2e.train.grad_checkpointing": "false"},
    "default": {"e2e.data.train_samples": 2048, "e2e.data.val_samples": 64, "e2e.data.seq_len": 256,
                "e2e.train.batch_size": 32, "e2e.train.max_steps": 64, "evaluate.max_windows": 16,
                "e2e.train.grad_checkpointing": "false"},
}


def _quantizer(bits: int) -> str:
    if bits == 16:
        return "null"
    return f"{{format: int{bits}, granularity: per_token, symmetric: true}}"


def overrides(config: str, kind: str, scale: str, lr: float) -> list[str]:
    w, a, kv = (int(x) for x in config.split("-"))
    sets = [f"scheme.weight.format=int{w}", "scheme.weight.group_size=-1", "scheme.weight.symmetric=true",
            "scheme.weight.dynamic_minmax=true", f"scheme.activation={_quantizer(a)}",
            f"scheme.kv_cache={_quantizer(kv)}", "calibrate.steps=[rtn]"]
    sets += [f"{k}={v}" for k, v in SCALES[scale].items() if not k.startswith("e2e.") or kind != "rtn"]
    if kind == "rtn":
        return [*sets, "evaluate.model=calibrate"]
    sets += [f"e2e.steps=[{{kd: {{lr: {lr}}}}}]", "e2e.model=calibrate",
             "e2e.train.warmup_ratio=0.0", "evaluate.model=e2e"]
    sets.append("e2e.data.source=" + ("calib" if kind == "real" else "synthetic"))
    return sets


def experiments(configs: list[str], real: str | None, scale: str, lr: float) -> list[tuple[str, list[str]]]:
    out = []
    for c in configs:
        out.append((f"rtn-{c}", overrides(c, "rtn", scale, lr)))
        out.append((f"qat-{c}", overrides(c, "qat", scale, lr)))
        if c == real:
            out.append((f"qat-{c}-real", overrides(c, "real", scale, lr)))
    return out


def run(args) -> None:
    configs = args.configs.split(",")
    for name, sets in experiments(configs, args.real or None, args.scale, args.lr):
        cmd = [*DVC, "exp", "run", "--temp", "-f", "-n", name]
        for s in sets:
            cmd += ["-S", s]
        cmd.append("evaluate")  # only the evaluate stage and what it depends on
        print(" ".join(repr(c) if " " in c else c for c in cmd), flush=True)
        if not args.dry:
            subprocess.run(cmd, cwd=ROOT, check=True, env=ENV)


def _ppl(exp: dict) -> dict | None:
    """PPL per text from one experiment's metrics/eval.json in `dvc exp show --json`."""
    data = (exp.get("data") or {})
    for path, m in (data.get("metrics") or {}).items():
        if path.endswith("eval.json"):
            d = m.get("data", {})
            return {"ppl": d.get("ppl"), "base_ppl": d.get("base_ppl"), "acc_avg": d.get("acc_avg")}
    return None


def collect(args) -> None:
    # -A: experiments of every baseline commit (HEAD moves while a matrix runs)
    shown = json.loads(subprocess.run([*DVC, "exp", "show", "--json", "-A"], cwd=ROOT, check=True, env=ENV,
                                      capture_output=True, text=True).stdout)
    found: dict[str, dict] = {}
    for commit in sorted(shown, key=lambda c: (c.get("data") or {}).get("timestamp") or ""):
        for exp in commit.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") in ("running", "queued", "failed"):
                continue  # a running experiment shows the workspace's metrics, not its own
            for rev in exp.get("revs") or []:
                name = rev.get("name")
                if name and (name.startswith("rtn-") or name.startswith("qat-")):
                    r = _ppl(rev)
                    if r:
                        found[name] = r
    rows, texts = [], None
    for c in PUBLISHED:
        rtn, qat, real = found.get(f"rtn-{c}"), found.get(f"qat-{c}"), found.get(f"qat-{c}-real")
        if not (rtn or qat):
            continue
        texts = texts or list((rtn or qat)["ppl"])
        rows.append((c, rtn, qat, real))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "matrix.json").write_text(json.dumps(found, indent=2))
    lines = ["| W-A-KV | " + " | ".join(f"RTN {t} | QAT {t} | QAT real {t}" for t in texts or []) + " |",
             "|---|" + "---:|" * (3 * len(texts or []))]
    for c, rtn, qat, real in rows:
        cells = []
        for t in texts:
            cells += [f"{x['ppl'][t]:.2f}" if x else "-" for x in (rtn, qat, real)]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (OUT / "matrix.md").write_text(table)
    print(table)
    if args.mlflow:
        sys.path.insert(0, str(ROOT))
        from tasks.common import log_artifact, stage_run

        with stage_run("llm_qat_matrix", {"experiments": ",".join(sorted(found))}):
            log_artifact(OUT / "matrix.md")
            log_artifact(OUT / "matrix.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--configs", default=",".join(PUBLISHED))
    r.add_argument("--real", default="4-8-4", help="also train this config on real text ('' = none)")
    r.add_argument("--scale", choices=sorted(SCALES), default="default")
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--dry", action="store_true", help="print the dvc commands only")
    c = sub.add_parser("collect")
    c.add_argument("--mlflow", action="store_true")
    args = p.parse_args()
    {"run": run, "collect": collect}[args.cmd](args)


if __name__ == "__main__":
    main()
