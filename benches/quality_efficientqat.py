"""PPL of the init (RTN, or --calibrate awq), Block-AP and Block-AP + E2E-QP on the embedded SmolLM2-135M (GPU).

For each bit width (g64, asymmetric): RTN init -> PPL; Block-AP (quant.blockwise.block_ap,
as the block_ap stage runs it) -> PPL; E2E-QP (quant.e2e.trainer.Trainer + the
e2e-qp method, as the e2e stage runs it) -> PPL. PPL is quant.eval.ppl.perplexity
at seq_len 2048 on the held-out evaluation texts (embedded-wiki articles
disjoint from the calibration articles, and lee), fp32 forward.

Training data: random windows (quant.e2e.data.sample_windows, the GPTQ protocol)
from the first 95% of the calibration token stream; validation windows from
the last 5%. The E2E-QP learning rate is chosen among --e2e-lrs by that
validation loss (never by the evaluation texts).

Usage (device): python benches/quality_efficientqat.py --model DIR --data DIR --out results.json
`--calibrate quarot --act 4 --kv 4 --bits 4 --init-only`: QuaRot + RTN at W4A4KV4, no training.
Imports only quant.*, torch, transformers (and gguf to convert the embedded GGUF).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.blockwise.engine import BlockwiseContext, blockwise_methods  # noqa: E402
from quant.calibrate import CALIBRATE  # noqa: E402
from quant.config.scheme import QuantScheme  # noqa: E402
from quant.data import sample_windows, tokenize_text, windows  # noqa: E402
from quant.e2e.trainer import (  # noqa: E402
    E2EContext,
    TrainConfig,
    Trainer,
    e2e_methods,
    make_accelerator,
)
from quant.eval.ppl import perplexity  # noqa: E402
from quant.modules.runtime import apply_runtime_quantizers  # noqa: E402

T0 = time.time()
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def say(*a) -> None:
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def load_fp(model_dir: Path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return m.eval()


def ppl_all(model, evals: dict[str, torch.Tensor], seq_len: int, windows: int) -> dict[str, float]:
    model.to(DEV).eval()
    out = {k: perplexity(model, ids, seq_len, batch_size=4, max_windows=windows).ppl for k, ids in evals.items()}
    model.cpu()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="fp32 safetensors model directory")
    ap.add_argument("--data", type=Path, required=True, help="calib.txt + eval/*.txt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--act", type=int, default=16, help="activation bits (16 = not quantized)")
    ap.add_argument("--kv", type=int, default=16, help="KV-cache bits (16 = not quantized)")
    ap.add_argument("--init-only", action="store_true", help="stop after calibrate (no training)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--train-samples", type=int, default=256)
    ap.add_argument("--val-samples", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--e2e-epochs", type=int, default=1)
    ap.add_argument("--e2e-batch", type=int, default=4)
    ap.add_argument("--e2e-lrs", default="")  # empty: paper lr and 5x
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp"))
    ap.add_argument("--blockwise", default="block-ap", help="block-wise method by registry name "
                    f"(quant.blockwise: {', '.join(blockwise_methods().names())})")
    ap.add_argument("--blockwise-options", default="{}", help="JSON overrides of that method's options "
                    "(block-ap: epochs from --epochs, batch 2; tesseraq: its published defaults)")
    ap.add_argument("--calibrate", default="rtn", help="init method from CALIBRATE, default options")
    ap.add_argument("--calib-samples", type=int, default=128)  # AWQ: 128 x 512 (AutoAWQ)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    args = ap.parse_args()
    init = CALIBRATE.get(args.calibrate, "--calibrate")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    calib = tokenize_text(tok, (args.data / "calib.txt").read_text())
    cut = int(calib.numel() * 0.95)
    train = sample_windows(calib[:cut], args.train_samples, args.seq_len, seed=0)
    val = windows(calib[cut:], args.seq_len)[: args.val_samples]
    calib_windows = sample_windows(calib[:cut], args.calib_samples, args.calib_seq_len, seed=0)
    evals = {p.stem: tokenize_text(tok, p.read_text()) for p in sorted((args.data / "eval").glob("*.txt"))}
    results: dict[str, object] = {"settings": vars(args) | {"model": str(args.model), "data": str(args.data),
                                                            "out": str(args.out), "val_windows": len(val)}}

    def dump() -> None:
        args.out.write_text(json.dumps(results, indent=2, default=str))

    fp = load_fp(args.model)
    results["fp"] = ppl_all(fp, evals, args.seq_len, args.eval_windows)
    say("fp", results["fp"])
    dump()
    acc = make_accelerator()
    bap = blockwise_methods().get(args.blockwise, "--blockwise")
    bkey = args.blockwise.replace("-", "_")  # result key: block_ap | tesseraq
    bopts = {"epochs": args.epochs, "batch_size": 2} if args.blockwise == "block-ap" else {}
    bopts |= {"cache": "gpu"} | json.loads(args.blockwise_options)  # caches on the device
    e2e = e2e_methods().get("e2e-qp")
    for bits in [int(b) for b in args.bits.split(",")]:
        r: dict[str, object] = {}
        ak = "" if args.act == args.kv == 16 else f"a{args.act}kv{args.kv}"
        results[f"w{bits}{ak}g{args.group}"] = r
        scheme = QuantScheme.from_name(f"W{bits}A{args.act}KV{args.kv}", preset="efficientqat",
                                       group_size=args.group)
        model = copy.deepcopy(fp)
        t = time.time()
        init_metrics = init.fn(model.to(DEV), scheme, calib_windows.to(DEV), init.options()) or {}
        model.cpu()
        apply_runtime_quantizers(model, scheme)  # activation / KV quantizers (none for W-only)
        r["init_seconds"] = round(time.time() - t, 1)
        r["init_metrics"] = {k: v for k, v in init_metrics.items() if k != "files"}
        r[args.calibrate] = ppl_all(model, evals, args.seq_len, args.eval_windows)
        say(bits, args.calibrate, r[args.calibrate])
        if args.init_only:
            dump()
            continue
        opts = bap.options.from_dict(bopts, "--blockwise-options")
        t = time.time()
        ctx = BlockwiseContext(DEV, args.work / f"{bkey}-w{bits}", 0, f"{bkey}{bits}")
        res = bap.fn(model, train, val, opts, ctx, bits)
        r[f"{bkey}_seconds"] = round(time.time() - t, 1)
        r["block_val_mse_init"] = [b["val_loss_init"] for b in res.per_block]
        r["block_val_mse"] = [b["val_loss_final"] for b in res.per_block]
        r["blocks_kept_init"] = sum(b["kept"] == "init" for b in res.per_block)
        r[bkey] = ppl_all(model, evals, args.seq_len, args.eval_windows)
        say(bits, args.blockwise, r[bkey], f"{r[f'{bkey}_seconds']}s")
        dump()
        paper_lr = 2e-5 if bits <= 2 else 1e-5
        lrs = [float(x) for x in args.e2e_lrs.split(",")] if args.e2e_lrs else [paper_lr, 5 * paper_lr]
        best = None
        for lr in lrs:
            student = copy.deepcopy(model)
            ectx = E2EContext(scheme, acc.device, torch.float32)
            objective = e2e.fn(student, e2e.options.from_dict({"lr": lr}), ectx)
            cfg = TrainConfig(epochs=args.e2e_epochs, batch_size=args.e2e_batch, save_every=0, log_every=20)
            t = time.time()
            trainer = Trainer(student, objective, cfg, args.work / f"e2e-w{bits}-{lr}", acc, 0, f"{bits}{lr}")
            out = trainer.fit({"input_ids": train}, {"input_ids": val})
            student = acc.unwrap_model(trainer.model, keep_fp32_wrapper=False)
            r[f"e2e_lr{lr}"] = {"val_loss_before": out.val_loss_before, "val_loss": out.val_loss_after,
                                "steps": out.steps, "seconds": round(time.time() - t, 1)}
            say(bits, "e2e lr", lr, r[f"e2e_lr{lr}"])
            if best is None or out.val_loss_after < best[0]:
                best = (out.val_loss_after, lr, student)
        r["e2e_lr"] = best[1]
        r["e2e_qp"] = ppl_all(best[2], evals, args.seq_len, args.eval_windows)
        say(bits, "e2e-qp", r["e2e_qp"])
        dump()
    print("\n| scheme | method | " + " | ".join(f"PPL {k}" for k in evals) + " |")
    print("|---|---|" + "---:|" * len(evals))
    print("| fp16 | - | " + " | ".join(f"{results['fp'][k]:.2f}" for k in evals) + " |")
    for key, r in results.items():
        if key.startswith("w"):
            for m in (args.calibrate, "block_ap", "tesseraq", "e2e_qp"):
                if m in r:
                    print(f"| {key} | {m} | " + " | ".join(f"{r[m][k]:.2f}" for k in evals) + " |")


if __name__ == "__main__":
    main()
