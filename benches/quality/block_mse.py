"""Held-out block MSE of RTN, TesseraQ and Block-AP on the tests' tiny random Llama (CPU).

The tiny shape (hidden 64, 2 blocks) at W2 g32 asymmetric (`rtn:W2g32`), trained by the
block-wise steps `tesseraq` and `block-ap` through quant.blockwise.engine.reconstruct on 32
windows of 32 random tokens (8 validate); the MSE of each quantized block's output against
the full-precision block's, on 8 held-out windows, both blocks fed the full-precision
inputs. TesseraQ: thresholds [0.6, 0.3, 0.1] x 40 iterations, lr 1e-2, scale_lr 1e-2, batch
4; Block-AP: 3 epochs, batch 4, lr 1e-3 / 1e-3 (short schedules that move a 64-wide model).

    OMP_NUM_THREADS=1 python -m benches.quality.block_mse      # about a minute
    python -m benches.quality.block_mse --small                # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

from benches import common
from quant.blockwise.engine import BlockwiseContext, reconstruct
from quant.calibrate import calibrate
from quant.models.arch import decoder_layers
from quant.recipe import Recipe, Step

SCHEME = "W2g32"
TESSERAQ = {"thresholds": [0.6, 0.3, 0.1], "iterations": 40, "lr": 1e-2, "scale_lr": 1e-2, "batch_size": 4}
BLOCK_AP = {"epochs": 3, "batch_size": 4, "weight_lr": 1e-3, "qparam_lr": 1e-3}


def ids(n: int, vocab: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def block_mse(model, fp_model, held_out: torch.Tensor) -> list[float]:
    """Per block: MSE of the quantized block's output vs the full-precision block's, both fed the
    full-precision inputs of `held_out` (captured with forward pre-hooks)."""
    seen = []
    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"], kwargs)),
        with_kwargs=True) for layer in decoder_layers(fp_model)]
    fp_model(input_ids=held_out, use_cache=False)
    for h in hooks:
        h.remove()
    out = []
    for (x, kwargs), fp_layer, q_layer in zip(seen, decoder_layers(fp_model), decoder_layers(model), strict=True):
        target, got = fp_layer(x, **kwargs), q_layer(x, **kwargs)
        target, got = (t[0] if isinstance(t, tuple) else t for t in (target, got))
        out.append(F.mse_loss(got, target).item())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU smoke run: a few iterations and one epoch")
    ap.add_argument("--threads", type=int, default=1)
    common.add_out_arg(ap, "quality-block_mse")
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    tesseraq, block_ap = dict(TESSERAQ), dict(BLOCK_AP)
    if args.small:
        tesseraq["iterations"], block_ap["epochs"] = 2, 1
    fp = common.build_model("tiny")
    vocab = fp.config.vocab_size
    train, val, held_out = ids(32, vocab), ids(8, vocab, seed=1), ids(8, vocab, seed=123)
    rtn = copy.deepcopy(fp)
    calibrate(rtn, Recipe.parse(f"rtn:{SCHEME}").scheme, (Step("rtn"),))
    models, per_block = {"rtn": rtn}, {}
    with tempfile.TemporaryDirectory() as work:
        for name, options in (("tesseraq", tesseraq), ("block-ap", block_ap)):
            recipe = Recipe.parse(f"rtn+{name}:{SCHEME}", {name: options})
            model = copy.deepcopy(rtn)
            ctx = BlockwiseContext(torch.device("cpu"), Path(work) / name, 0, name, train_ids=train, val_ids=val,
                                   scheme=recipe.model_scheme)
            res = reconstruct(model, recipe.blockwise, ctx)
            models[name] = model
            per_block[name] = [{k: b.get(k) for k in ("val_loss_init", "val_loss_trained", "kept", "seconds")}
                               for b in res.per_block]
    out = {"setting": f"tiny random Llama (hidden 64, 2 blocks), {SCHEME} asym, 32 train / 8 val / 8 held-out "
                      f"windows of 32 tokens; tesseraq {tesseraq}; block-ap {block_ap}",
           "held_out_block_mse": {k: block_mse(m, fp, held_out) for k, m in models.items()},
           "per_block": per_block}
    print(json.dumps(out["held_out_block_mse"], indent=1))
    common.say("wrote", common.write_result(args, out))


if __name__ == "__main__":
    main()
