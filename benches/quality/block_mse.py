"""Held-out block MSE of RTN, TesseraQ and Block-AP on the tiny random Llama of the tests (CPU).

Writes the JSON behind docs/results/tesseraq_cpu_tiny.json:
`OMP_NUM_THREADS=1 python benches/tesseraq_heldout_cpu.py --out FILE` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from quant.blockwise.block_ap import BlockAP, BlockAPOptions, BlockwiseContext  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402
from tests.test_tesseraq import _block_mse, _ids, _model, _runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fp, held = make_tiny_llama(), _ids(8, seed=123)
    rtn, tq, bap = _model(), _model(), _model()
    with tempfile.TemporaryDirectory() as work:
        res = _runner(tq, Path(work) / "tq", _ids(32), _ids(8, seed=1), iterations=40).run()
        opts = BlockAPOptions.from_dict({"epochs": 3, "batch_size": 4, "weight_lr": 1e-3, "qparam_lr": 1e-3})
        BlockAP(bap, _ids(32), _ids(8, seed=1), opts, BlockwiseContext(torch.device("cpu"), Path(work) / "bap", 0, "b"),
                2).run()
    out = {"setting": "tiny random Llama (hidden 64, 2 blocks), W2 g32 asym, 32 train / 8 val / 8 held-out windows "
                      "of 32 tokens; TesseraQ thresholds [0.6,0.3,0.1] x 40 iterations, lr 1e-2, scale_lr 1e-2, "
                      "batch 4; Block-AP 3 epochs, batch 4, lr 1e-3/1e-3",
           "held_out_block_mse": {"rtn": _block_mse(rtn, fp, held), "tesseraq": _block_mse(tq, fp, held),
                                  "block_ap": _block_mse(bap, fp, held)},
           "tesseraq_per_block": [{k: b[k] for k in ("val_loss_init", "val_loss_trained", "kept", "steps", "seconds")}
                                  for b in res.per_block]}
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["held_out_block_mse"], indent=1))


if __name__ == "__main__":
    main()
