"""Load time and CPU generation speed of the registered packed model, as a consumer sees it.

What `register` logs for a packed checkpoint (the pyfunc of tasks/packed_model.py) is logged
here to a sqlite MLflow store in a temporary directory and loaded back the way consumers
load `models:/quant-pipeline@champion`: `mlflow.pyfunc.load_model`, then `predict` of
`--tokens` greedy tokens from one prompt. Once per variant of the CPU path:

- `per-forward`: every forward of a packed layer unpacks and dequantizes its weight
  (`QUANT_PACKED_DEQUANTIZE=per-forward`; how the pyfunc ran before it dequantized once);
- `once`: each weight dequantized once at load (the default).

Each variant loads in a fresh interpreter (a consumer's cold start: imports, the model
built from its config, the packed layers read, the weights dequantized).

The checkpoint is `--checkpoint` (a packed export), or built first: the embedded
SmolLM2-135M, RTN W4g64, compressed-tensors (about a minute on 2 cores). Reported per
variant: seconds to load, seconds and tokens/s to generate, the continuation (the
variants must agree: the dequantized weight is the one the forward computes).

    python -m benches.speed.packed_pyfunc                 # docs/results/speed-packed-pyfunc.json
    python -m benches.speed.packed_pyfunc --tokens 4 --variants once --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benches import common

PROMPT = "The capital of France is"
VARIANTS = ("per-forward", "once")


def build_checkpoint(out: Path) -> Path:
    import quant

    model, tok = quant.load_model("embedded:smollm2-135m")
    recipe = quant.Recipe.parse("rtn:W4g64")
    model, _ = quant.quantize(model, recipe, tokenizer=tok)
    quant.export_model(model, tok, recipe.model_scheme, "compressed-tensors", out)
    return out


def log_model(checkpoint: Path, store: Path) -> str:
    """The checkpoint logged as `register` logs it; returns the model URI."""
    import mlflow

    from tasks.packed_model import log_packed_model

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"  # the measuring processes' too
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    # artifacts beside the store, in the temporary directory (the default is ./mlruns)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("packed-pyfunc", (store / "artifacts").as_uri()))
    with mlflow.start_run():
        return log_packed_model(checkpoint, pip_requirements=[]).model_uri


def measure(model_uri: str, variant: str, tokens: int) -> dict:
    """One variant in a fresh interpreter (spawned), so that its load is a cold start."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (model_uri, variant, tokens, os.environ.get("MLFLOW_TRACKING_URI")))


def _measure(model_uri: str, variant: str, tokens: int, tracking_uri: str | None) -> dict:
    t0 = time.perf_counter()
    import mlflow

    from tasks.packed_model import DEQUANTIZE_ENV

    os.environ[DEQUANTIZE_ENV] = variant
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    imports_s = time.perf_counter() - t0
    load_s, model = common.timed(lambda: mlflow.pyfunc.load_model(model_uri))
    gen_s, out = common.timed(lambda: model.predict([PROMPT], params={"max_new_tokens": tokens}))
    tok = model.unwrap_python_model().tokenizer
    n = len(tok(out[0], add_special_tokens=False)["input_ids"])
    common.say(f"{variant}: imports {imports_s:.1f}s, load {load_s:.1f}s, {n} tokens in {gen_s:.1f}s "
               f"({n / gen_s:.2f} tokens/s): {out[0]!r}")
    return {"variant": variant, "imports_seconds": round(imports_s, 2), "load_seconds": round(load_s, 2),
            "generate_seconds": round(gen_s, 2),
            "new_tokens": n, "tokens_per_second": round(n / gen_s, 3), "text": out[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="a packed export (default: build one)")
    ap.add_argument("--tokens", type=int, default=12, help="greedy tokens to generate")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    common.add_out_arg(ap, "speed-packed-pyfunc")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            build_s, checkpoint = common.timed(lambda: build_checkpoint(Path(tmp) / "packed"))
            common.say(f"built a packed checkpoint in {build_s:.0f}s")
        t0 = time.perf_counter()
        uri = log_model(checkpoint, Path(tmp))
        common.say(f"logged {uri} in {time.perf_counter() - t0:.1f}s")
        rows = [measure(uri, v, args.tokens) for v in args.variants]
    path = common.write_result(args, {"prompt": PROMPT, "load_avg": os.getloadavg(), "variants": rows})
    common.say(f"wrote {path}")


if __name__ == "__main__":
    main()
