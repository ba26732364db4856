"""Load time and CPU generation speed of the registered packed model, as a consumer sees it.

What `register` logs for a packed checkpoint (the pyfunc of tasks/packed_model.py) is logged
here to a sqlite MLflow store in a temporary directory and loaded back the way consumers
load `models:/quant-pipeline@champion`: `mlflow.pyfunc.load_model`, then `predict` of
`--tokens` greedy tokens from one prompt. Once per variant of the CPU path:

- `per-forward`: every forward of a packed layer unpacks and dequantizes its weight
  (`QUANT_PACKED_DEQUANTIZE=per-forward`; how the pyfunc ran before it dequantized once);
- `once`: each weight dequantized once at load (the default).

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

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    mlflow.set_experiment("packed-pyfunc")
    with mlflow.start_run():
        return log_packed_model(checkpoint, pip_requirements=[]).model_uri


def measure(model_uri: str, variant: str, tokens: int) -> dict:
    import mlflow

    from tasks.packed_model import DEQUANTIZE_ENV

    os.environ[DEQUANTIZE_ENV] = variant
    load_s, model = common.timed(lambda: mlflow.pyfunc.load_model(model_uri))
    gen_s, out = common.timed(lambda: model.predict([PROMPT], params={"max_new_tokens": tokens}))
    tok = model.unwrap_python_model().tokenizer
    n = len(tok(out[0], add_special_tokens=False)["input_ids"])
    common.say(f"{variant}: load {load_s:.1f}s, {n} tokens in {gen_s:.1f}s ({n / gen_s:.2f} tokens/s): {out[0]!r}")
    return {"variant": variant, "load_seconds": round(load_s, 2), "generate_seconds": round(gen_s, 2),
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
