"""register: log the evaluated quantized model to MLflow and register a version.
promote (`python -m tasks.register promote`, `make promote`): move the alias when gates pass.

What is registered is the model `evaluate` scored (`evaluate.model`), so the metrics
tagged on the version are that model's. It is logged through MLflow's transformers
flavour as a half-precision (`register.dtype`) text-generation pipeline: anything
with transformers loads `models:/<name>@champion` and generates, no project code
needed. The exact quantized form (integer weights, step sizes, zero points,
`quantization.json`) rides along as `quantized/` artifacts of the same run; the
packed low-bit model joins through a pyfunc once the convert stage exists.
Requirements are given explicitly: MLflow's inference of them imports the model
in a subprocess and wants torchvision.

Registering and promoting are separate on purpose. A version is bookkeeping of a DVC
stage (it reruns when the model or its metrics change); the alias decides what every
consumer loads. Promotion re-reads the gates (params.yaml `register.gates`) and the
champion *of that moment*, and reads the candidate's numbers from the version's own
tags, so it also works from another machine against the same server:

- `ppl_ratio`: quantized PPL / full-precision PPL on every evaluation text; the worst
  text must stay <= `max_ppl_ratio` (needs `evaluate.include_base: true`).
- `acc_drop`: full-precision minus quantized average zero-shot accuracy must stay
  <= `max_acc_drop`; skipped (and said so) when the metrics hold no accuracies.
- `champion`: the primary metric must be strictly better than the current champion's,
  measured under the same evaluation settings (same `eval_fingerprint`); with no
  champion yet it passes.

A gate set to null is off. Any failed gate leaves the alias where it is, and the
decision (and which gate failed, with the numbers) is printed and tagged on the version.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from quant.config import Config, ConfigError, flatten
from tasks.common import Params, load_params, main, read_json, stage_dir, write_json
from tasks.evaluate import EvaluateConfig

EVAL_METRICS = Path("metrics/eval.json")
REGISTER_METRICS = Path("metrics/register.json")
PROMOTION_REFUSED = 3  # exit code of `promote` when a gate failed (flows/pipeline.py reads it)


@dataclass(frozen=True)
class Gates(Config):
    max_ppl_ratio: float | None = 1.5  # worst quantized/full-precision PPL over eval texts; null = off
    max_acc_drop: float | None = 0.02  # full-precision minus quantized average accuracy; null = off
    beat_champion: bool = True  # primary metric strictly better than the current champion's

    def __post_init__(self) -> None:
        if self.max_ppl_ratio is not None and self.max_ppl_ratio < 1.0:
            raise ConfigError(f"max_ppl_ratio={self.max_ppl_ratio} must be >= 1.0 or null")
        if self.max_acc_drop is not None and self.max_acc_drop < 0:
            raise ConfigError(f"max_acc_drop={self.max_acc_drop} must be >= 0 or null")


@dataclass(frozen=True)
class RegisterConfig(Config):
    name: str = "quant-pipeline"  # registered model name
    alias: str = "champion"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # dtype of the logged checkpoint
    primary_metric: str = "ppl/embedded-wiki"  # key of metrics/eval.json, a/b path
    primary_goal: Literal["min", "max"] = "min"
    accuracy_metric: str = "acc_avg"  # quantized average accuracy in metrics/eval.json (if any)
    base_accuracy_metric: str = "base_acc_avg"  # full-precision average accuracy (if any)
    gates: Gates = field(default_factory=Gates)
    # refuse to register (exit 2) a model whose PPL on any evaluation text exceeds this many times
    # its baseline's (metrics/eval.json `baseline_ppl`, the model training started from): the
    # training stages' own rule (e2e.train.max_val_ppl_ratio); null = off
    max_baseline_ppl_ratio: float | None = 2.0

    def __post_init__(self) -> None:
        if self.max_baseline_ppl_ratio is not None and not self.max_baseline_ppl_ratio > 1.0:
            raise ConfigError(f"max_baseline_ppl_ratio={self.max_baseline_ppl_ratio} must be > 1 (2.0: at most "
                              "double the baseline's perplexity) or null (off)")
        if not self.name or any(c in self.name for c in "/@:"):
            raise ConfigError(f"name={self.name!r} must be non-empty without '/', '@' or ':'")
        if not self.alias.isidentifier():
            raise ConfigError(f"alias={self.alias!r} must be a plain identifier such as 'champion'")


# ---------------------------------------------------------------------------
# What a version carries: the numbers the gates need, as tags


@dataclass(frozen=True)
class Candidate:
    """The gate inputs of one model version, round-tripped through its tags."""

    version: str
    primary_metric: str
    primary_value: float | None
    ppl_ratio: float | None  # worst over eval texts
    ppl_ratio_text: str | None
    acc_drop: float | None
    eval_fingerprint: str

    def tags(self) -> dict[str, str]:
        return {k: "" if v is None else str(v) for k, v in dataclasses.asdict(self).items() if k != "version"}

    @classmethod
    def from_tags(cls, version: str, tags: dict[str, str]) -> Candidate:
        def num(k: str) -> float | None:
            return float(tags[k]) if tags.get(k) else None

        return cls(version, tags.get("primary_metric", ""), num("primary_value"), num("ppl_ratio"),
                   tags.get("ppl_ratio_text") or None, num("acc_drop"), tags.get("eval_fingerprint", ""))


def eval_fingerprint(params: Params) -> str:
    """Hash of what makes two evaluations comparable: model, eval data, eval settings
    (but not which stage's model was scored)."""
    ev = dict(params.sections.get("evaluate") or {})
    ev.pop("model", None)
    blob = json.dumps({"model": params.model.to_dict(), "prepare": params.sections.get("prepare"),
                       "evaluate": ev, "dtype": params.base.dtype}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def candidate_from_metrics(metrics: dict[str, Any], cfg: RegisterConfig, fingerprint: str) -> Candidate:
    flat = flatten(metrics, sep="/")
    if cfg.primary_metric not in flat:
        numeric = sorted(k for k, v in flat.items() if isinstance(v, int | float))
        raise ConfigError(f"register.primary_metric={cfg.primary_metric!r} is not in {EVAL_METRICS}; "
                          f"available: {numeric}")
    ratios = {t: flat[f"ppl/{t}"] / flat[f"base_ppl/{t}"]
              for t in metrics.get("ppl", {}) if f"base_ppl/{t}" in flat}
    worst = max(ratios, key=ratios.get) if ratios else None
    acc, base_acc = flat.get(cfg.accuracy_metric), flat.get(cfg.base_accuracy_metric)
    return Candidate(
        version="",
        primary_metric=cfg.primary_metric,
        primary_value=float(flat[cfg.primary_metric]),
        ppl_ratio=ratios[worst] if worst else None,
        ppl_ratio_text=worst,
        acc_drop=float(base_acc) - float(acc) if acc is not None and base_acc is not None else None,
        eval_fingerprint=fingerprint,
    )


# ---------------------------------------------------------------------------
# Gates


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool | None  # None: skipped (off, or nothing to judge)
    detail: str


def check_gates(cand: Candidate, champion: Candidate | None, cfg: RegisterConfig) -> list[GateResult]:
    g = cfg.gates
    out = []
    if g.max_ppl_ratio is None:
        out.append(GateResult("ppl_ratio", None, "off (register.gates.max_ppl_ratio: null)"))
    elif cand.ppl_ratio is None:
        out.append(GateResult("ppl_ratio", False, "no full-precision PPL in the metrics "
                                                  "(set evaluate.include_base: true)"))
    else:
        ok = cand.ppl_ratio <= g.max_ppl_ratio
        out.append(GateResult("ppl_ratio", ok, f"worst PPL ratio {cand.ppl_ratio:.4f} ({cand.ppl_ratio_text}) "
                                               f"{'<=' if ok else '>'} {g.max_ppl_ratio}"))
    if g.max_acc_drop is None:
        out.append(GateResult("acc_drop", None, "off (register.gates.max_acc_drop: null)"))
    elif cand.acc_drop is None:
        out.append(GateResult("acc_drop", None, f"no accuracies in the metrics ({cfg.accuracy_metric!r}, "
                                                f"{cfg.base_accuracy_metric!r})"))
    else:
        ok = cand.acc_drop <= g.max_acc_drop
        out.append(GateResult("acc_drop", ok, f"average accuracy drop {cand.acc_drop:.4f} "
                                              f"{'<=' if ok else '>'} {g.max_acc_drop}"))
    out.append(_champion_gate(cand, champion, cfg))
    return out


def _champion_gate(cand: Candidate, champ: Candidate | None, cfg: RegisterConfig) -> GateResult:
    if not cfg.gates.beat_champion:
        return GateResult("champion", None, "off (register.gates.beat_champion: false)")
    if champ is None:
        return GateResult("champion", True, f"no current @{cfg.alias}")
    if champ.version == cand.version:
        return GateResult("champion", True, f"v{cand.version} is already @{cfg.alias}")
    if champ.primary_metric != cand.primary_metric or champ.primary_value is None:
        return GateResult("champion", False, f"@{cfg.alias} v{champ.version} has no {cand.primary_metric!r} "
                                             f"to compare with (it was ranked on {champ.primary_metric!r})")
    if champ.eval_fingerprint != cand.eval_fingerprint:
        return GateResult("champion", False, f"@{cfg.alias} v{champ.version} was evaluated under other "
                                             f"settings (fingerprint {champ.eval_fingerprint} != "
                                             f"{cand.eval_fingerprint}); its numbers are not comparable")
    a, b = cand.primary_value, champ.primary_value
    better = a < b if cfg.primary_goal == "min" else a > b
    rel = "better than" if better else "not better than"
    return GateResult("champion", better, f"{cand.primary_metric} {a:.4f} {rel} @{cfg.alias} v{champ.version}'s "
                                          f"{b:.4f} ({cfg.primary_goal} is better)")


# ---------------------------------------------------------------------------
# The stage


def methods(params: Params, source_stage: str) -> str:
    """`calibrate=awq,block_ap=tesseraq,e2e=e2e-qp`: the steps of every stage section up to
    the stage whose model is registered (params.yaml lists sections in pipeline order; a
    stage of several steps joins them with `+`, as a recipe does). Read from the params as
    written (a name or a one-key mapping per step; the stages already checked them), not
    through quant.recipe, whose method discovery would make every method module a dep of
    this stage."""
    out = []
    for name, section in params.sections.items():
        steps = section.get("steps") if isinstance(section, dict) else None
        if isinstance(steps, list):
            names = [s if isinstance(s, str) else next(iter(s)) for s in steps if s]
            if names:
                out.append(f"{name}={'+'.join(names)}")
        if name == source_stage:
            break
    return ",".join(out)


def pip_requirements() -> list[str]:
    import accelerate
    import mlflow
    import safetensors
    import torch
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}", f"accelerate=={accelerate.__version__}",
            f"safetensors=={safetensors.__version__}"]


def fold_saved_rotations(model, model_dir: Path) -> int:
    """A checkpoint with online rotations (QuaRot) is a plain transformers model only once
    they are folded back into the weights (quant.modules.rotation.fold_input_rotations)."""
    from quant.checkpoint import SCHEME_FILE
    from quant.modules.rotation import fold_input_rotations, install_rotations

    f = model_dir / SCHEME_FILE
    rotations = json.loads(f.read_text()).get("rotations") if f.exists() else None
    if not rotations:
        return 0
    install_rotations(model, rotations)
    return fold_input_rotations(model)


def check_finite(metrics: dict[str, Any], model_dir: Path) -> None:
    """Refuse (ConfigError: exit 2, not retried) metrics or a model holding NaN/inf, so a
    diverged run can never reach the registry, whichever stage produced it."""
    import math

    from safetensors import safe_open

    bad = [k for k, v in flatten(metrics, sep="/").items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ConfigError(f"register: {EVAL_METRICS} has non-finite values {bad[:5]}; the evaluated "
                          "model diverged or is broken, it is not registered")
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                x = st.get_tensor(key)
                if x.is_floating_point() and not bool(x.isfinite().all()):
                    raise ConfigError(f"register: {f.name} tensor {key!r} holds NaN/inf; the model "
                                      f"in {model_dir} diverged or is broken, it is not registered")


def check_baseline(metrics: dict[str, Any], cfg: RegisterConfig) -> None:
    """Refuse (ConfigError: exit 2) a model whose PPL on some text is more than
    `max_baseline_ppl_ratio` times its baseline's: a training stage made it far worse."""
    limit = cfg.max_baseline_ppl_ratio
    base = metrics.get("baseline_ppl")
    if limit is None:
        return
    if not isinstance(base, dict) or not base:
        raise ConfigError(f"register: {EVAL_METRICS} has no baseline_ppl to judge the model against; re-run "
                          "evaluate (it writes them) or set register.max_baseline_ppl_ratio: null")
    worse = {t: metrics["ppl"][t] / b for t, b in base.items() if t in metrics.get("ppl", {}) and b > 0
             and metrics["ppl"][t] / b > limit}
    if worse:
        t, r = max(worse.items(), key=lambda kv: kv[1])
        raise ConfigError(f"register: the evaluated model's PPL on {t} is {metrics['ppl'][t]:.4g}, {r:.3g} times "
                          f"its baseline's {base[t]:.4g} (more than register.max_baseline_ppl_ratio={limit}); a "
                          "training stage made it far worse, it is not registered")


def run(params: Params) -> dict[str, Any]:
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from quant.checkpoint import (
        QPARAMS_FILE,
        SCHEME_FILE,
        check_model_files,
        load_tokenizer,
        read_scheme,
    )

    cfg = params.section("register", RegisterConfig)
    source = params.section("evaluate", EvaluateConfig).model
    model_dir = stage_dir(source) / "model"
    if not model_dir.is_dir():
        raise ConfigError(f"evaluate.model={source!r}: {model_dir} does not exist; run that stage first")
    if not EVAL_METRICS.is_file():
        raise ConfigError(f"{EVAL_METRICS} not found; run the evaluate stage first")
    check_model_files(model_dir)  # a corrupt or inconsistent model directory: one line naming the file
    metrics = read_json(EVAL_METRICS)
    check_finite(metrics, model_dir)  # whatever produced them: never register NaN/inf
    check_baseline(metrics, cfg)  # nor a model training made far worse than where it started
    cand = candidate_from_metrics(metrics, cfg, eval_fingerprint(params))
    scheme = read_scheme(model_dir)
    run_ = mlflow.active_run()
    if run_ is None:
        raise RuntimeError("register.run needs an active MLflow run (python -m tasks.register opens it)")

    # The dequantized checkpoint is an ordinary transformers model: load it plainly (no
    # QuantLinear) in half precision, which is what the transformers flavour can save.
    # A packed checkpoint (convert) is logged as itself, through a pyfunc (tasks/packed_model.py).
    from quant.export.loader import packed_format
    from tasks.packed_model import footprint_tags, log_formats, log_packed_model

    dtype = getattr(torch, cfg.dtype)
    if packed_format(model_dir) is not None:
        info = log_packed_model(model_dir, pip_requirements())
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = load_tokenizer(model_dir)
        fold_saved_rotations(model, model_dir)  # QuaRot's online rotations, into the weights
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            torch_dtype=dtype,
            pip_requirements=pip_requirements(),
            model_config={"max_new_tokens": 32, "do_sample": False},
        )
    for f in (QPARAMS_FILE, SCHEME_FILE):
        if (model_dir / f).exists():
            mlflow.log_artifact(str(model_dir / f), "quantized")
    mlflow.log_artifact(str(EVAL_METRICS), "metrics")
    formats = log_formats(model_dir, metrics)  # every converted format + its model card, on this run

    tags = {"scheme": scheme.name if scheme else "none", "methods": methods(params, source),
            "source_stage": source, "dtype": cfg.dtype, **cand.tags(), **footprint_tags(model_dir)}
    client = MlflowClient()
    if not _registered_model_exists(client, cfg.name):
        client.create_registered_model(cfg.name, description="Quantized models of the quant-pipeline")
    # register_model (not client.create_model_version): a `models:/m-...` source needs the
    # logged model's id, which only register_model passes on to a tracking server
    mv = mlflow.register_model(info.model_uri, cfg.name, tags=tags)
    mlflow.set_tags({"registered_model": cfg.name, "registered_version": mv.version})

    decision = preview(client, cfg, Candidate.from_tags(mv.version, tags))
    out = {"name": cfg.name, "version": int(mv.version), "store": mlflow.get_tracking_uri(),  # where v lives
           "run_id": run_.info.run_id, "model_uri": info.model_uri,
           "scheme": tags["scheme"], "methods": tags["methods"], cfg.primary_metric: cand.primary_value,
           "ppl_ratio": cand.ppl_ratio, "gates_pass": decision["pass"], "gates": decision["gates"]}
    write_json(REGISTER_METRICS, out)
    print(f"registered {cfg.name} v{mv.version} ({tags['scheme']}, {tags['methods']}"
          + (f"; formats {', '.join(formats)}" if formats else "") + "); gates "
          + "; ".join(f"{g} {v}: {decision['details'][g]}" for g, v in decision["gates"].items()))
    return {"version": int(mv.version), "primary_value": cand.primary_value, "ppl_ratio": cand.ppl_ratio,
            "acc_drop": cand.acc_drop, "gates_pass": int(decision["pass"])}


def _registered_model_exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def _champion(client, cfg: RegisterConfig) -> Candidate | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(cfg.name, cfg.alias)
    except MlflowException:
        return None
    return Candidate.from_tags(str(mv.version), mv.tags)


def preview(client, cfg: RegisterConfig, cand: Candidate) -> dict[str, Any]:
    """The gates as they stand at registration (promotion re-checks them)."""
    results = check_gates(cand, _champion(client, cfg), cfg)
    verdict = {r.gate: "pass" if r.passed else "skipped" if r.passed is None else "FAIL" for r in results}
    return {"pass": all(r.passed is not False for r in results), "gates": verdict,
            "details": {r.gate: r.detail for r in results}}


# ---------------------------------------------------------------------------
# Promotion


def promote(cfg: RegisterConfig, version: str, client=None) -> dict[str, Any]:
    """Set `cfg.alias` on `version` if every gate passes; otherwise leave it and say why."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    mv = client.get_model_version(cfg.name, version)
    cand = Candidate.from_tags(str(mv.version), mv.tags)
    champ = _champion(client, cfg)
    results = check_gates(cand, champ, cfg)
    failed = [r for r in results if r.passed is False]
    already = champ is not None and champ.version == cand.version
    if failed:
        message = (f"{cfg.name} v{version} not promoted; @{cfg.alias} stays "
                   f"{'v' + champ.version if champ else 'unset'}: "
                   + "; ".join(f"gate '{r.gate}' failed: {r.detail}" for r in failed))
        client.set_model_version_tag(cfg.name, version, "promotion", "refused: " + "; ".join(r.gate for r in failed))
    elif already:
        message = f"{cfg.name} v{version} is already @{cfg.alias}"
    else:
        client.set_registered_model_alias(cfg.name, cfg.alias, version)
        client.set_model_version_tag(cfg.name, version, "promotion", "promoted")
        message = f"{cfg.name} v{version} promoted to @{cfg.alias} (" + "; ".join(r.detail for r in results) + ")"
    return {"name": cfg.name, "version": str(version), "alias": cfg.alias, "promoted": not failed and not already,
            "champion": cfg.alias if not failed else None, "failed_gates": [r.gate for r in failed],
            "gates": [dataclasses.asdict(r) for r in results], "message": message}


def promote_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.register promote",
                                 description="Set the champion alias on a registered version if the gates pass.")
    ap.add_argument("--version", help=f"model version (default: the one in {REGISTER_METRICS})")
    ap.add_argument("--json", action="store_true", help="print the decision as one JSON line")
    args = ap.parse_args(argv)
    import mlflow

    from tasks.common import tracking_uri

    store = tracking_uri()  # as the stages: $MLFLOW_TRACKING_URI or the repo's sqlite store
    print(f"registry: {store}", file=sys.stderr if args.json else sys.stdout, flush=True)
    try:
        cfg = load_params().section("register", RegisterConfig)
        version = args.version
        if version is None:
            version = _recorded_version(store)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mlflow.set_tracking_uri(store)
    missing = _missing_version(cfg, version)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    decision = {**promote(cfg, version), "store": store}
    print(json.dumps(decision) if args.json else decision["message"])
    return PROMOTION_REFUSED if decision["failed_gates"] else 0


def _recorded_version(store: str) -> str:
    """The version metrics/register.json holds, if it was registered in `store`: a version
    number means nothing in another registry (v1 of the local sqlite store is not v1 of the
    server), so promoting it there would promote another model."""
    if not REGISTER_METRICS.is_file():
        raise ConfigError(f"{REGISTER_METRICS} not found: run the register stage or pass --version")
    recorded = json.loads(REGISTER_METRICS.read_text())
    version, where = str(recorded["version"]), recorded.get("store")
    if where is None:
        raise ConfigError(f"{REGISTER_METRICS} (v{version}) does not say which registry it was registered in "
                          f"(written before stores were recorded): run the register stage again, or pass "
                          f"--version N to promote a version of {store}")
    if where.rstrip("/") != store.rstrip("/"):
        raise ConfigError(f"{REGISTER_METRICS} holds v{version} of the registry at {where}, but this promotion "
                          f"acts on {store}: {_store_hint(where, store)}")
    return version


def _store_hint(where: str, store: str) -> str:
    if where.startswith("http") and not store.startswith("http"):
        return (f"start the servers (`make servers-up`) to promote it there, or pass --version N to promote "
                f"a version of {store}")
    if store.startswith("http"):
        return (f"register this model on the server first (`make flow-run` registers it again when its "
                f"version lives elsewhere), or pass --version N to promote a version of {store}")
    return f"point MLFLOW_TRACKING_URI at {where}, or pass --version N to promote a version of {store}"


def _missing_version(cfg: RegisterConfig, version: str) -> str | None:
    """Why `version` cannot be promoted (no such model or version), or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if not version.isdigit():
        return f"--version {version!r} must be a version number"
    if not _registered_model_exists(client, cfg.name):
        return f"no registered model {cfg.name!r} at {mlflow_uri()}: run the register stage first"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{cfg.name}'"))
    if int(version) not in versions:
        have = ", ".join(map(str, versions)) or "none"
        return f"{cfg.name} has no version {version} (versions: {have})"
    return None


def mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


if __name__ == "__main__":
    if sys.argv[1:2] == ["promote"]:
        sys.exit(promote_cli(sys.argv[2:]))
    main("register", run)
