"""Calibration time of AWQ, GPTQ and FP search on a Llama-2-7B-shaped random model (GPU).

The model has the sizes of `--shape` (default llama-2-7b) but only `--layers` decoder
blocks, random init, held on the host in `--dtype`; the method runs exactly as the
calibrate stage runs it, on `--samples` x `--seq-len` random calibration tokens, one block
on the device at a time:

- awq (quant.calibrate.awq.run_awq, the registered method's search): published defaults,
  a 20-point scale grid with duo scaling, clip search 1.0 -> 0.55 on 512 sampled tokens
  (AutoAWQ calibrates on 128 x 512 tokens);
- gptq (quant.calibrate.gptq.run_gptq): block size 128, percdamp 0.01, true sequential;
  `--options '{"act_order": true}'` for desc_act (GPTQ: 128 x 2048 tokens of C4; the
  calibrate stage's default 128 x 512 here);
- fp-search (the registered `fp-search` step through quant.calibrate.calibrate): LLM-FP4's
  format and exponent-bias search at W4A4 FP (E2M1) per channel, with and without the
  pre-shifted activation bias (default 32 x 1024 tokens).

Reported for awq and gptq: seconds to capture block 0's inputs, seconds per block, the
extrapolation capture + N x mean block seconds (block 0 left out of the mean: it carries
one-time kernel warm-up; N = the shape's layer count) and peak device memory; for
fp-search the wall time and its extrapolation to N layers (wall x N / layers, an upper
bound: the capture is counted N / layers times). Random weights have no outlier channels,
so only the timing (not the chosen scales) carries over to a real model.

    python -m benches.speed.calibrate --method awq            # GPU
    python -m benches.speed.calibrate --method gptq --options '{"act_order": true}'
    python -m benches.speed.calibrate --method fp-search --samples 32 --seq-len 1024
    python -m benches.speed.calibrate --small --method gptq    # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch

from benches import common
from quant import methods
from quant.config.scheme import QuantScheme

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# LLM-FP4's W4A4 row: E2M1 weights per output channel, per-tensor E2M1 activations
FP_W4A4 = {"weight": {"format": "fp4-e2m1", "group_size": -1},
           "activation": {"format": "fp4-e2m1", "granularity": "per_tensor"}}


def scheme_for(method: str, text: str | None) -> QuantScheme:
    if text is not None:
        return QuantScheme.parse(text)
    if method == "fp-search":
        return QuantScheme.from_dict(FP_W4A4, "scheme")
    return QuantScheme.parse("W4g128")


def blockwise_search(method: str, model, scheme: QuantScheme, ids: torch.Tensor, options,
                     dev: torch.device, full_layers: int) -> dict[str, Any]:
    """AWQ or GPTQ, block by block, with the per-block seconds the search records."""
    from quant.calibrate.saved import model_fingerprint

    if method == "awq":
        from quant.calibrate.awq import run_awq

        res = run_awq(model, scheme.weight, ids, options, model_fingerprint(model), device=dev)
        quality = {"mean_ratio": sum(res.ratios.values()) / max(1, len(res.ratios))}
    else:
        from quant.calibrate.gptq import run_gptq

        res = run_gptq(model, scheme.weight, ids, options, model_fingerprint(model), lm_head=False, device=dev)
        quality = {"mean_loss": sum(x.loss for x in res.layers.values()) / max(1, len(res.layers))}
    steady = res.block_seconds[1:] or res.block_seconds  # block 0 carries one-time warm-up
    mean = sum(steady) / len(steady)
    return {"capture_seconds": round(res.capture_seconds, 3),
            "block_seconds": [round(s, 3) for s in res.block_seconds],
            f"extrapolated_{full_layers}_blocks_seconds": round(res.capture_seconds + full_layers * mean, 1),
            **quality}


def fp_search(model, scheme: QuantScheme, ids: torch.Tensor, options, layers: int,
              full_layers: int) -> dict[str, Any]:
    """The registered fp-search step, with and without the pre-shift, each on a fresh copy."""
    from quant.calibrate import calibrate
    from quant.recipe import Step

    out = {}
    for pre_shift in (False, True):
        step = Step("fp-search", {**options.to_dict(), "pre_shift": pre_shift})
        wall, cal = common.timed(lambda s=step: calibrate(copy.deepcopy(model), scheme, (s,), ids))
        out[f"pre_shift={pre_shift}"] = {
            "seconds": round(wall, 1), "search_s": cal.metrics.get("search_s"),
            f"extrapolated_{full_layers}_layers_seconds": round(wall * full_layers / layers, 1)}
        common.say("fp-search", out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="awq", choices=["awq", "gptq", "fp-search"])
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(common.SHAPES))
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks built (the timing extrapolates)")
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (128; fp-search 32)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (512; fp-search 1024)")
    ap.add_argument("--scheme", default=None, help="scheme text (awq/gptq default W4g128; fp-search: W4A4 FP)")
    ap.add_argument("--options", default="{}", help="JSON options of the method (its options class)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="float16 (fp-search bfloat16)")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: small shape, a few tokens")
    common.add_out_arg(ap, "speed-calibrate")
    args = ap.parse_args(argv)
    fp = args.method == "fp-search"
    if args.small:
        args.shape, args.samples, args.seq_len, args.dtype = "small", 4, 64, "float32"
        args.scheme = args.scheme or ("W4g64" if not fp else None)
    common.require_cuda("speed.calibrate", args.small)
    samples = args.samples or (32 if fp else 128)
    seq_len = args.seq_len or (1024 if fp else 512)
    dtype = DTYPES[args.dtype or ("bfloat16" if fp else "float16")]
    m = methods.method(args.method, "calibrate")
    smoke = {"rounds": 1, "candidates": 4, "search_tokens": 64} if args.small and fp else {}
    options = m.parse_options(smoke | json.loads(args.options), "--options")
    scheme = scheme_for(args.method, args.scheme)
    dev = common.device()
    full_layers = common.model_config(args.shape).num_hidden_layers
    model = common.build_model(args.shape, layers=args.layers, dtype=dtype)  # on the host
    ids = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    common.reset_peak_memory()
    if fp:
        timing = fp_search(model, scheme, ids, options, args.layers, full_layers)
        total = None
    else:
        total, timing = common.timed(
            lambda: blockwise_search(args.method, model, scheme, ids, options, dev, full_layers))
    result = {"method": args.method, "scheme": scheme.to_dict(), "options": options.to_dict(),
              "shape": args.shape, "layers": args.layers, "calibration_tokens": [samples, seq_len],
              **timing, "total_seconds": total and round(total, 3), "peak_device_memory_gib": common.peak_memory_gib()}
    path = common.write_result(args, result)
    print(json.dumps(result, indent=2, default=str))
    common.say("wrote", path)


if __name__ == "__main__":
    main()
