"""The embedded model's exports, loaded by the runtimes that install here (CPU).

For the pipeline's default (RTN W4 g64 asymmetric, `artifacts/calibrate/model`) and its
symmetric twin (RTN W4 g64 symmetric of `artifacts/prepare/model`), both converted to
fp16 (quant.export.half): each packed format is written, measured on disk (bytes,
bits per weight, size against the same model in fp16) and loaded by every consumer
that installs here; each load is scored against the fake-quant model: max |logit
difference| on a 128-token check and perplexity on the first `--windows` windows of
the held-out Wikipedia text (float32 compute unless the consumer needs a half dtype).

Three steps, because GPTQModel lives in its own venv (scripts/compat_table.py says how
it was built):

    python -m tasks.prepare && python -m tasks.calibrate      # the embedded model, RTN W4 g64 asym
    python -m benches.quality.export_consumers export --work /tmp/ec-bench
    /work/venvs/gptqmodel/bin/python -m benches.quality.export_consumers gptqmodel --work /tmp/ec-bench
    python -m benches.quality.export_consumers report --work /tmp/ec-bench --out docs/results/export_consumers.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CHECK_TOKENS = 128
FORMATS = ("compressed-tensors", "gptq")


def score(load, work: Path, variant: str, consumer: str, dtype: torch.dtype, windows: int) -> dict:
    """Load with `load()`, then max |logit diff| against the fake-quant model and perplexity."""
    from safetensors.torch import load_file

    from quant.eval.ppl import perplexity

    ref = load_file(str(work / f"reference-{variant}.safetensors"))
    entry = {"consumer": consumer, "dtype": str(dtype)[6:]}
    t0 = time.perf_counter()
    try:
        model = load()
    except Exception as exc:  # noqa: BLE001 - a refusal is a result
        return {**entry, "loaded": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    entry.update(loaded=True, load_seconds=round(time.perf_counter() - t0, 2))
    with torch.no_grad():
        out = model(ref["check_ids"]).logits.float()
    entry["max_logit_diff"] = (out - ref["logits"]).abs().max().item()
    t0 = time.perf_counter()
    entry["ppl"] = perplexity(model, ref["ppl_ids"], seq_len=ref["ppl_ids"].numel() // windows,
                              max_windows=windows).ppl
    entry["ppl_seconds"] = round(time.perf_counter() - t0, 1)
    return entry


def export_step(args) -> None:
    import compressed_tensors
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from quant.calibrate.rtn import quantize_linears
    from quant.checkpoint import read_scheme
    from quant.config.scheme import QuantScheme, WeightSpec
    from quant.eval.ppl import perplexity
    from quant.export.base import disk_footprint, export, unquantized_params
    from quant.export.half import to_half
    from quant.export.loader import load_packed
    from quant.load import load_model
    from quant.modules.linear import quant_linears
    from quant.numerics.formats import IntFormat

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "artifacts/prepare/data/eval/embedded-wiki.txt").read_text()
    results = {"environment": {"python": platform.python_version(), "torch": torch.__version__,
                               "transformers": transformers.__version__,
                               "compressed_tensors": compressed_tensors.__version__},
               "windows": args.windows, "seq_len": args.seq_len, "variants": {}}
    for variant in ("w4g64-asym", "w4g64-sym"):
        if variant.endswith("asym"):
            model, tok = load_model(ROOT / "artifacts/calibrate/model", torch.float32)
            scheme = read_scheme(ROOT / "artifacts/calibrate/model")
        else:
            model, tok = load_model(ROOT / "artifacts/prepare/model", torch.float32)
            scheme = QuantScheme(weight=WeightSpec(IntFormat(4), 64, True))
            quantize_linears(model, scheme)
        to_half(model, torch.float16)
        ids = tok(text, return_tensors="pt").input_ids
        ppl_ids = ids[0, : args.windows * args.seq_len]  # [T]
        check_ids = ids[:, :CHECK_TOKENS]
        v = {"scheme": scheme.to_dict(), "formats": {}}
        layers = dict(quant_linears(model))
        for fmt in FORMATS:
            out = work / f"{variant}-{fmt}"
            if (out / "config.json").is_file() and not args.rewrite:  # an earlier run's export
                fp = disk_footprint(out, sorted(layers), {n: m.in_features * m.out_features
                                                          for n, m in layers.items()}, unquantized_params(model))
            else:
                fp = export(model, tok, scheme, fmt, out, torch.float16, overwrite=True)
            v["formats"][fmt] = {**fp.to_dict(), "path": str(out), "consumers": []}
        model.float()  # fp16-valued scales and norms, float32 compute: the reference
        with torch.no_grad():
            logits = model(check_ids).logits.float()
        save_file({"check_ids": check_ids.clone(), "logits": logits.contiguous(), "ppl_ids": ppl_ids.clone()},
                  str(work / f"reference-{variant}.safetensors"))
        t0 = time.perf_counter()
        v["fake_quant_ppl"] = perplexity(model, ppl_ids, seq_len=args.seq_len, max_windows=args.windows).ppl
        v["fake_quant_ppl_seconds"] = round(time.perf_counter() - t0, 1)
        del model
        for fmt in FORMATS:
            path = work / f"{variant}-{fmt}"
            loads = [("quant-pipeline load_packed", torch.float32, lambda p=path: load_packed(p, torch.float32)[0])]
            if fmt == "compressed-tensors":
                loads.append(("transformers AutoModelForCausalLM.from_pretrained", torch.float32,
                              lambda p=path: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)))
            for consumer, dtype, load in loads:
                entry = score(load, work, variant, consumer, dtype, args.windows)
                v["formats"][fmt]["consumers"].append(entry)
                print(variant, fmt, entry, flush=True)
        results["variants"][variant] = v
    (work / "results-main.json").write_text(json.dumps(results, indent=1))


def gptqmodel_step(args) -> None:
    import gptqmodel
    import optimum  # noqa: F401 - transformers' GPTQ path needs it
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    work = Path(args.work)
    results = {"environment": {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__}, "variants": {}}
    for variant in ("w4g64-asym", "w4g64-sym"):
        path = str(work / f"{variant}-gptq")
        loads = [
            ("GPTQModel backend=GPTQ_TORCH", torch.float16, BACKEND.GPTQ_TORCH),
            ("GPTQModel backend=AUTO", torch.float16, BACKEND.AUTO),
            ("GPTQModel backend=AUTO", torch.float32, BACKEND.AUTO),
        ]
        entries = []
        for consumer, dtype, backend in loads:
            kernel = []

            def load(b=backend, d=dtype, p=path, kernel=kernel):
                m = GPTQModel.load(p, backend=b, device="cpu", dtype=d).model
                kernel.append(type(m.get_submodule("model.layers.0.mlp.down_proj")).__name__)
                return m

            entry = score(load, work, variant, consumer, dtype, args.windows)
            entry["kernel"] = kernel[0] if kernel else None
            entries.append(entry)
            print(variant, entry, flush=True)
        entry = score(lambda p=path: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, device_map="cpu"),
                      work, variant, "transformers (GPTQModel + optimum)", torch.float32, args.windows)
        entries.append(entry)
        print(variant, entry, flush=True)
        results["variants"][variant] = entries
    (work / "results-gptqmodel.json").write_text(json.dumps(results, indent=1))


def report_step(args) -> None:
    work = Path(args.work)
    main = json.loads((work / "results-main.json").read_text())
    gq = json.loads((work / "results-gptqmodel.json").read_text()) if (work / "results-gptqmodel.json").is_file() else None
    out = {"what": "embedded SmolLM2-135M, RTN W4 g64 (asym: artifacts/calibrate/model; sym: RTN of "
                   "artifacts/prepare/model), fp16 conversion; each packed export loaded by each consumer; "
                   f"max |logit diff| on {CHECK_TOKENS} tokens and PPL on the first {main['windows']} windows of "
                   f"{main['seq_len']} tokens of the held-out Wikipedia text, against the fake-quant model "
                   "(float32 compute unless the load dtype says otherwise)",
           "commands": [line.strip() for line in __doc__.splitlines() if line.strip().startswith(("python", "/work"))],
           "environment": {"main": main["environment"], **({"gptqmodel": gq["environment"]} if gq else {})},
           "variants": main["variants"]}
    from safetensors.torch import load_file

    for variant, v in out["variants"].items():
        v["reference_max_abs_logit"] = load_file(str(work / f"reference-{variant}.safetensors"))["logits"].abs().max().item()
        for entry in (gq or {"variants": {}})["variants"].get(variant, []):
            v["formats"]["gptq"]["consumers"].append(entry)
        for f in v["formats"].values():
            f["path"] = Path(f["path"]).name
            for c in f["consumers"]:
                if "ppl" in c:
                    c["ppl_vs_fake_quant"] = c["ppl"] / v["fake_quant_ppl"]
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["export", "gptqmodel", "report"])
    ap.add_argument("--work", required=True, help="folder for the exports and the partial results")
    ap.add_argument("--out", default="docs/results/export_consumers.json")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rewrite", action="store_true", help="export again even where --work holds an export")
    args = ap.parse_args(argv)
    {"export": export_step, "gptqmodel": gptqmodel_step, "report": report_step}[args.step](args)


if __name__ == "__main__":
    main()
