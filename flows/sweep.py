"""quant-sweep: try recipes side by side, draw the Pareto front, promote the best per bit width.

Each recipe of a grid (flows/recipes.py; params.yaml `sweep`) runs as a DVC experiment of
the same pipeline: `dvc exp run --temp --name sweep-<digest> -S k=v ... <targets>`. DVC's
own experiment machinery keeps every recipe reproducible from its params, leaves the
workspace (params.yaml included) untouched, and its run cache restores stages whose
deps and params a previous recipe already ran (prepare, synthesize and merge run once).

Prefect runs the recipes: one per GPU at a time on a GPU machine (each pinned with
CUDA_VISIBLE_DEVICES), one at a time otherwise; a failed recipe is retried
(`retries`), then marked failed in the table without stopping the others. The sweep
keeps its state in `.state/sweep/<name>/state.json`: a re-run of a half-finished sweep
runs only the recipes without a finished row.

MLflow: one parent run for the sweep, one nested run per recipe (tagged with the
recipe), under which the recipe's stage processes nest theirs. The numbers come from the
recipe's `evaluate` run; wall time per stage from its stage runs. The comparison (table
as markdown and CSV, PPL/accuracy against bits per weight with the Pareto front marked,
time against quality) goes to the parent run and to Prefect artifacts.

Promotion: for each weight bit width, the recipe with the lowest PPL on the ranking text
among those passing every gate gets the registry alias `w<bits>-best` (`sweep.alias`) on
the model version its `register` stage made, with the reason in the version's
description. A recipe that fails a gate is never promoted; the table says which gate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from flows import grid as R
from flows.dvc_stages import gpu_slots, stage_env
from flows.tracking import EXPERIMENT_ENV, PARENT_RUN_ENV, ParentRun, git_state
from quant.config import Config, ConfigError
from quant.io import write_text_atomic

FLOW_NAME = "quant-sweep"
STATE_DIR = Path(".state") / "sweep"


@dataclass(frozen=True)
class SweepGates(Config):
    max_ppl_ratio: float | None = 1.5  # PPL on the ranking text / full precision; null = off
    max_acc_drop: float | None = None  # full-precision minus quantized average accuracy; null = off


@dataclass(frozen=True)
class SweepConfig(Config):
    grid: str = "weight-only-int"
    grids: dict[str, Any] = field(default_factory=dict)
    rank_text: str = "auto"  # auto: an evaluation text from another corpus than the calibration text
    gates: SweepGates = field(default_factory=SweepGates)
    parallel: int | None = None  # recipes at a time; null: one per GPU, 1 without GPUs
    retries: int = 1
    experiment: str = "quant-sweep"
    alias: str = "w{bits}-best"
    promote: bool = True

    def __post_init__(self) -> None:
        if self.grid not in self.grids:
            raise ConfigError(f"grid={self.grid!r} is not a named grid; known: {sorted(self.grids)}")
        if self.parallel is not None and self.parallel < 1:
            raise ConfigError(f"parallel={self.parallel} must be >= 1 or null")
        if self.retries < 0:
            raise ConfigError(f"retries={self.retries} must be >= 0")
        if "{bits}" not in self.alias:
            raise ConfigError(f"alias={self.alias!r} must contain '{{bits}}' (one alias per bit width)")


# ---------------------------------------------------------------------------
# Validation of a recipe's effective params, as the stages validate them


def validate_params(effective: dict[str, Any], where: str) -> None:
    """Every stage's typed config, method options and the recipe as a whole, as the stages
    check them (tasks.common.check_params), from the effective params."""
    from tasks.common import load_params
    from tasks.params_check import check_params

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "params.yaml"
        f.write_text(yaml.safe_dump(effective, sort_keys=False))
        try:
            check_params(load_params(f))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def load_grid(root: Path, grid: str | None, extra: list[str]) -> tuple[SweepConfig, list[R.GridPoint], dict]:
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    raw = dict(params.get("sweep") or {})
    if grid is not None:
        raw["grid"] = grid
    cfg = SweepConfig.from_dict(raw, "sweep")
    spec = dict(cfg.grids[cfg.grid])
    if extra:  # -S style overrides added to the grid's base
        base = dict(spec.get("base") or {})
        for item in extra:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"sweep override {item!r} is not key=value")
            base[key.strip()] = yaml.safe_load(value)
        spec["base"] = base
    recipes = R.expand(spec, params, cfg.grid, validate_params)
    R.rank_text(cfg.rank_text, params.get("prepare") or {})  # fails now, not after the runs
    return cfg, recipes, params


# ---------------------------------------------------------------------------
# One recipe


def execute_recipe(recipe: R.GridPoint, root: Path, env: dict[str, str], log: Path) -> None:
    """`dvc exp run --temp` of the recipe; raises with the tail of its log on failure."""
    subprocess.run(["dvc", "exp", "remove", recipe.exp_name], cwd=root, env=env, capture_output=True)
    cmd = ["dvc", "exp", "run", "--temp", "--name", recipe.exp_name]
    for o in recipe.overrides:
        cmd += ["-S", o]
    cmd += list(recipe.targets)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"recipe {recipe.name} failed (dvc exit {proc.returncode}); log {log}:\n{tail}")


def collect_row(client, experiment_id: str, run_id: str, recipe: R.GridPoint, text: str) -> dict[str, Any]:
    """The recipe's numbers from its nested stage runs."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                              max_results=1000)
    row: dict[str, Any] = {"recipe": recipe.name, "digest": recipe.digest, "bits": R.weight_bits(recipe.effective),
                           "status": "finished", "stage_seconds": {}}
    for r in runs:
        stage = r.data.tags.get("stage", r.info.run_name)
        if r.info.end_time and r.info.start_time:
            row["stage_seconds"][stage] = round((r.info.end_time - r.info.start_time) / 1000, 1)
        if stage == "evaluate":
            m = r.data.metrics
            row["ppl"] = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("ppl/")}
            row["base_ppl"] = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("base_ppl/")}
            for k in ("acc_avg", "base_acc_avg", "bits_per_weight", "size_gb"):
                row[k] = m.get(k)
        if stage == "register":
            versions = client.search_model_versions(f"run_id = '{r.info.run_id}'")
            if versions:
                row["model"], row["version"] = versions[0].name, versions[0].version
    if "ppl" not in row:
        raise RuntimeError(f"recipe {recipe.name}: no evaluate run under MLflow run {run_id}")
    row["rank_text"] = text
    row["rank_ppl"] = row["ppl"].get(text)
    base = row["base_ppl"].get(text)
    row["ppl_ratio"] = row["rank_ppl"] / base if row["rank_ppl"] and base else None
    if row.get("acc_avg") is not None and row.get("base_acc_avg") is not None:
        row["acc_drop"] = row["base_acc_avg"] - row["acc_avg"]
    row["seconds"] = round(sum(row["stage_seconds"].values()), 1)
    return row


@task(cache_policy=NO_CACHE)
def run_recipe(recipe: R.GridPoint, root: str, env: dict[str, str], parent_run_id: str, experiment_id: str,
               uri: str, text: str, log: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=f"recipe:{recipe.name}",
                            tags={**recipe.tags(), "mlflow.parentRunId": parent_run_id, "stage": "recipe"})
    gpu = env.get("CUDA_VISIBLE_DEVICES", "")
    try:
        execute_recipe(recipe, Path(root), {**env, PARENT_RUN_ENV: run.info.run_id}, Path(log))
        row = collect_row(client, experiment_id, run.info.run_id, recipe, text)
    except BaseException as exc:
        client.set_tag(run.info.run_id, "error", str(exc)[:4000])
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    row["gpu_hours"] = round(row["seconds"] / 3600, 4) if gpu else 0.0
    row["mlflow_run_id"] = run.info.run_id
    client.set_terminated(run.info.run_id, "FINISHED")
    return row


# ---------------------------------------------------------------------------
# The flow


class SweepState:
    """Finished rows by recipe digest, written atomically after every recipe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def done(self, recipe: R.GridPoint) -> bool:
        return self.rows.get(recipe.digest, {}).get("status") == "finished"

    def put(self, row: dict[str, Any]) -> None:
        self.rows[row["digest"]] = row
        write_text_atomic(self.path, json.dumps(self.rows, indent=2, default=str))


@flow(name=FLOW_NAME, log_prints=True)
def sweep(grid: str | None = None, overrides: list[str] | None = None, name: str | None = None,
          promote: bool | None = None, max_parallel: int | None = None) -> dict[str, Any]:
    """Run every recipe of the grid (those not finished in an earlier run of this sweep),
    then compare, draw the Pareto front and promote per bit width."""
    root = Path.cwd()
    logger = get_run_logger()
    cfg, recipes, params = load_grid(root, grid, list(overrides or []))
    text = R.rank_text(cfg.rank_text, params.get("prepare") or {})
    name = name or cfg.grid
    out = root / STATE_DIR / name
    state = SweepState(out / "state.json")
    todo = [r for r in recipes if not state.done(r)]
    logger.info("sweep %s: %d recipes, %d to run, ranking on %r", name, len(recipes), len(todo), text)
    os.environ.setdefault(EXPERIMENT_ENV, cfg.experiment)
    parent = ParentRun(root, cfg.experiment, run_name=f"sweep:{name}",
                       tags={"sweep": name, "grid": cfg.grid, "rank_text": text})
    parent.log_params({"grid": cfg.grid, "recipes": len(recipes), "rank_text": text, **git_state(root)})
    env = stage_env(dict(os.environ), MLFLOW_TRACKING_URI=parent.uri, **{EXPERIMENT_ENV: cfg.experiment})
    gpus = gpu_slots()
    limit = max_parallel or cfg.parallel or max(1, len(gpus))
    task_fn = run_recipe.with_options(retries=cfg.retries, retry_delay_seconds=5)
    ok = False
    try:
        for start in range(0, len(todo), limit):
            chunk = todo[start : start + limit]
            futures = []
            for i, r in enumerate(chunk):
                pin = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {}
                futures.append(task_fn.submit(r, str(root), {**env, **pin}, parent.run_id, parent.experiment_id,
                                              parent.uri, text, str(out / "logs" / f"{r.exp_name}.log")))
            wait(futures)
            for r, fut in zip(chunk, futures, strict=True):
                if fut.state.is_completed():
                    state.put(fut.result())
                else:
                    err = str(fut.state.message or "failed")
                    state.put({"recipe": r.name, "digest": r.digest, "bits": R.weight_bits(r.effective),
                               "status": "failed", "error": err[-500:]})
                    logger.warning("recipe %s failed: %s", r.name, err[-300:])
        rows = [state.rows[r.digest] for r in recipes if r.digest in state.rows]
        summary = compare(rows, cfg, text, out, parent, promote if promote is not None else cfg.promote)
        ok = True
        return summary
    finally:
        parent.end(ok)


def compare(rows: list[dict[str, Any]], cfg: SweepConfig, text: str, out: Path, parent: ParentRun,
            promote: bool) -> dict[str, Any]:
    """Gates, Pareto front, promotions; table, plots and artifacts."""
    from tasks.sweep_report import write_report

    for r in rows:
        if r.get("status") == "finished":
            r["failed_gates"] = R.check_gates(r, cfg.gates.max_ppl_ratio, cfg.gates.max_acc_drop)
    front = R.pareto_front([r for r in rows if r.get("status") == "finished"])
    for r in rows:
        r["pareto"] = r["recipe"] in front
    chosen = R.choose_promotions(rows) if promote else {}
    aliases = {}
    for bits, r in chosen.items():
        if not r.get("version"):
            continue
        alias = cfg.alias.format(bits=bits)
        reason = (f"sweep {out.name}: lowest PPL on {text} ({r['rank_ppl']:.3f}, {r['ppl_ratio']:.3f}x full "
                  f"precision) among the W{bits} recipes passing every gate; recipe {r['recipe']}")
        parent.client.set_registered_model_alias(r["model"], alias, r["version"])
        parent.client.update_model_version(r["model"], r["version"], description=reason)
        aliases[alias] = {"recipe": r["recipe"], "version": r["version"], "reason": reason}
        r["promoted"] = alias
    files = write_report(rows, text, out / "report")
    for f in files.values():
        parent.log_artifact(f, "sweep")
    parent.set_tags({f"alias.{k}": v["recipe"] for k, v in aliases.items()})
    (out / "report" / "sweep.json").write_text(json.dumps({"rank_text": text, "rows": rows, "aliases": aliases},
                                                          indent=2, default=str))
    parent.log_artifact(out / "report" / "sweep.json", "sweep")
    try:
        create_markdown_artifact(key="quant-sweep", markdown=files["markdown"].read_text(),
                                 description=f"sweep {out.name}, ranked on {text}")
        create_table_artifact(key="quant-sweep-rows", table=[_flat_row(r) for r in rows])
    except Exception as exc:  # artifacts are a view; the files and MLflow hold the result
        get_run_logger().warning("Prefect artifacts not published: %s", exc)
    return {"rank_text": text, "rows": rows, "aliases": aliases, "report": {k: str(v) for k, v in files.items()}}


def _flat_row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in r.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="run a recipe sweep in-process (temporary Prefect API)")
    ap.add_argument("--grid", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--no-promote", action="store_true")
    args = ap.parse_args(argv)
    t = time.time()
    summary = sweep(grid=args.grid, overrides=args.overrides, name=args.name,
                    promote=False if args.no_promote else None)
    print(json.dumps({"aliases": summary["aliases"], "report": summary["report"],
                      "seconds": round(time.time() - t, 1)}, indent=2))


if __name__ == "__main__":
    main()
