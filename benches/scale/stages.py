"""A Llama-2-7B-shaped model through the pipeline's stages, one `python -m tasks.<stage>` each.

Wall time and peak GPU / host memory per stage for a random-initialised model of
`--shape` (default llama-2-7b: hidden 4096, MLP 11008, 32 heads, 32 layers), saved locally
with the embedded SmolLM2 tokenizer (so its vocabulary, 49152 instead of Llama-2's 32000). Random weights make the quality numbers meaningless (PPL is about
the vocabulary size); the point is what each stage costs at this size.

The stages run exactly as `dvc repro` runs them (same command, same params.yaml
sections, an MLflow run each), in a work directory of their own: it gets a params.yaml
built from this repository's, with the model pointed at the saved directory and the
settings below, and its own MLflow store. Each stage's peak host memory is its
process's maximum resident set (os.wait4), its peak GPU memory what torch allocated
(the `peak_gpu_gib` metric every stage logs, tasks/common.peak_memory).

Stages: prepare -> calibrate -> block_ap (reduced sample count) -> e2e (a few hundred
steps) -> evaluate (PPL only), running `--recipe` (quant.recipe text, default
rtn+block-ap+e2e-qp:W2g64; Block-AP with `--block-epochs` epochs, batch 2). Synthesis and
merge are left out (block_ap and e2e train on calibration-text windows); `--stages` can add
convert.

Usage (GPU machine with this project installed):
  python -m benches.scale.stages --work /tmp/scale7b
  python -m benches.scale.stages --small --work /tmp/scale-small      # CPU smoke run, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benches import common
from quant.recipe import Recipe

STAGES = ("prepare", "calibrate", "block_ap", "e2e", "evaluate")


def build_model(out: Path, shape: str, layers: int | None, device: str) -> dict:
    """Random-init `shape`, bf16 on GPU (fp32 on CPU), saved with the embedded tokenizer."""
    import torch

    tok = common.embedded_tokenizer()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.time()
    model = common.build_model(shape, layers=layers, vocab=len(tok), dtype=dtype, device=device,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    layers = model.config.num_hidden_layers
    del model
    return {"params": params, "layers": layers, "dtype": str(dtype), "seconds": time.time() - t0}


def _set(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = params
    for p in parents:
        node = node[p]
    node[last] = value


def stage_params(model_dir: Path, a: argparse.Namespace) -> dict:
    """This repository's params.yaml with the model, the recipe and the scale settings of this run."""
    p = yaml.safe_load((common.ROOT / "params.yaml").read_text())
    p["model"]["name_or_path"] = str(model_dir)
    p["base"]["device"] = "auto"
    options = {"block-ap": {"epochs": a.block_epochs, "batch_size": 2}} | json.loads(a.options)
    steps = a.recipe.partition(":")[0].split("+")
    recipe = Recipe.parse(a.recipe, {k: v for k, v in options.items() if k in steps})
    for key, value in recipe.params().items():
        _set(p, key, value)
    p["calibrate"].update(samples=a.calib_samples, seq_len=a.calib_seq_len)
    p["block_ap"]["data"].update(source="calib", train_samples=a.block_samples, val_samples=a.val_samples,
                                 seq_len=a.seq_len)
    # the calibration text holds ~290 windows of 2048 tokens: the steps come from epochs over them
    p["e2e"]["data"].update(source="calib", train_samples=a.block_samples, val_samples=a.val_samples,
                            seq_len=a.seq_len)
    epochs = -(-a.e2e_steps * a.e2e_batch // a.block_samples)
    p["e2e"]["train"].update(batch_size=a.e2e_batch, epochs=epochs, max_steps=a.e2e_steps,
                             grad_checkpointing=not a.small,
                             save_every=max(a.e2e_steps // 2, 1), log_every=10)
    p["evaluate"].update(model="convert" if "convert" in a.stages else "e2e", compare=[], include_base=True,
                         seq_len=a.seq_len, max_windows=a.eval_windows, tasks=[], report=False, reuse_scores=False)
    return p


def gpu_peak(db: Path, stage: str) -> float | None:
    """`peak_gpu_gib` of the stage's MLflow run (the stage logs it; read straight from sqlite)."""
    with sqlite3.connect(db) as con:
        row = con.execute(
            "SELECT m.value FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
            "WHERE m.key = 'peak_gpu_gib' AND r.name = ? ORDER BY r.start_time DESC LIMIT 1", (stage,)).fetchone()
    return None if row is None else float(row[0])


def run_stage(stage: str, work: Path, env: dict[str, str]) -> dict:
    log = work / "logs" / f"{stage}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", f"tasks.{stage}"], cwd=work, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    row = {"stage": stage, "seconds": round(time.time() - t0, 1), "exit": code,
           "peak_host_gib": round(usage.ru_maxrss / 2**20, 2),
           "peak_gpu_gib": gpu_peak(work / "mlflow" / "mlflow.db", stage)}
    if code != 0:
        row["error"] = log.read_text(errors="replace")[-2000:]
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="work directory (model, artifacts, MLflow store)")
    ap.add_argument("--shape", choices=sorted(common.SHAPES), default="llama-2-7b")
    ap.add_argument("--layers", type=int, help="fewer decoder layers than the shape has (stated in the output)")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny shapes and sample counts")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=[*STAGES, "convert"])
    ap.add_argument("--recipe", default="rtn+block-ap+e2e-qp:W2g64", help="quant.recipe text")
    ap.add_argument("--options", default="{}", help="JSON: method -> options")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--block-samples", type=int, default=256, help="Block-AP training samples (paper: 4096)")
    ap.add_argument("--block-epochs", type=int, default=1)
    ap.add_argument("--val-samples", type=int, default=16)
    ap.add_argument("--e2e-steps", type=int, default=300)
    ap.add_argument("--e2e-batch", type=int, default=1)
    ap.add_argument("--eval-windows", type=int, default=8)
    common.add_out_arg(ap, "scale-stages")
    a = ap.parse_args(argv)
    if a.small:
        a.shape, a.seq_len, a.block_samples, a.val_samples = "tiny", 64, 8, 2
        a.e2e_steps, a.e2e_batch, a.eval_windows, a.calib_samples, a.calib_seq_len = 4, 2, 2, 4, 64
    import torch

    device = "cuda" if torch.cuda.is_available() and not a.small else "cpu"
    work = a.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    model_dir = work / "base-model"
    built = build_model(model_dir, a.shape, a.layers, device)
    print(f"model: {a.shape} x {built['layers']} layers, {built['params'] / 1e9:.2f}B params, "
          f"built and saved in {built['seconds']:.0f} s", flush=True)
    (work / "params.yaml").write_text(yaml.safe_dump(stage_params(model_dir, a), sort_keys=False))
    (work / "mlflow").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")])),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow' / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    rows = []
    order = [s for s in (*STAGES[:4], "convert", "evaluate") if s in a.stages]
    for stage in order:
        row = run_stage(stage, work, env)
        rows.append(row)
        gpu = "-" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.1f}"
        failed = "" if row["exit"] == 0 else f"  FAILED (exit {row['exit']})"
        print(f"{stage:10s} {row['seconds']:8.1f} s  host {row['peak_host_gib']:6.1f} GiB  gpu {gpu} GiB{failed}",
              flush=True)
        if row["exit"] != 0:
            print(row["error"], file=sys.stderr)
            break
    ppl = None
    if (work / "metrics" / "eval.json").exists():
        ppl = json.loads((work / "metrics" / "eval.json").read_text()).get("ppl")
    out = {"shape": a.shape, "model": built, "stage_device": device, "stages": rows, "ppl": ppl,
           "total_seconds": round(sum(r["seconds"] for r in rows), 1)}
    print(json.dumps(out, indent=1, default=str))
    common.say("wrote", common.write_result(a, out))
    if any(r["exit"] != 0 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
