"""Packed export on CPU: size on disk per format, bits per weight, and PPL of every
checkpoint loaded back, against the fake-quant model it came from.

SmolLM2-135M (the embedded default, or `--model`), the `rtn` step at W4 g64 asymmetric
(`rtn:W4g64`), frozen and converted to fp16 (quant.export.half); then each format is
written (quant.export.base.export) and loaded back:
`compressed-tensors` through this project's loader and through compressed-tensors' own
`ModelCompressor.decompress_model` (which consumers load which export:
docs/compatibility.md), `gptq` through this project's loader, `half`
through `load_model`. PPL on the first `--windows` windows of the held-out Wikipedia
text, computed in float32 on every model.

    python -m benches.quality.convert
    python -m benches.quality.convert --small     # CPU smoke run: tiny random model
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benches import common


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ct_library_load(path: Path):
    """compressed-tensors' own decompression of the checkpoint into a plain model."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_quantization_config(model, qc)
    compressor = ModelCompressor(quantization_config=qc)
    compressor.compress_model(model)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("lm_head")]:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    compressor.decompress_model(model)
    model.tie_weights()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    from quant.calibrate import calibrate
    from quant.checkpoint import save_quantized
    from quant.eval.ppl import perplexity
    from quant.export.base import export
    from quant.export.half import to_half
    from quant.export.loader import load_packed
    from quant.load import load_model
    from quant.recipe import Recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(ap)
    ap.add_argument("--recipe", default="rtn:W4g64", help="a calibrate-only recipe (no data: rtn, quarot+rtn)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--eval-text", default="embedded-wiki", help="which evaluation text (--small: lee)")
    ap.add_argument("--formats", nargs="+", default=["compressed-tensors", "gptq", "half"])
    common.add_out_arg(ap, "quality-convert")
    args = ap.parse_args(argv)
    if args.small:
        args.seq_len, args.windows, args.eval_text = 64, 2, "lee"
    common.set_threads(args.threads)
    recipe = Recipe.parse(args.recipe)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="convert-quality-") as tmp:
        work = Path(tmp)
        model, tok = common.load_fp_model(args.model, args.small)
        model.save_pretrained(work / "base")  # the base checkpoint as safetensors: its size on disk
        tok.save_pretrained(work / "base")
        ids = common.eval_ids(tok, {args.eval_text: common.texts(args.data, args.small)[1][args.eval_text]})
        ids = ids[args.eval_text]

        def ppl(m) -> float:
            return perplexity(m.float(), ids, args.seq_len, 1, args.windows).ppl

        result = {"recipe": str(recipe), "scheme": recipe.scheme.to_dict(), "base_bytes": dir_bytes(work / "base"),
                  "base_ppl": ppl(model)}
        calibrate(model, recipe.scheme, recipe.calibrate)
        save_quantized(model, tok, recipe.scheme, work / "fake-quant-fp32")
        result["fake_quant_fp32_bytes"] = dir_bytes(work / "fake-quant-fp32")
        result["half"] = to_half(model, torch.float16)
        result["fake_quant_ppl"] = ppl(model)
        model.half()
        result["formats"] = {}
        for fmt in args.formats:
            seconds, footprint = common.timed(
                lambda fmt=fmt: export(model, tok, recipe.scheme, fmt, work / fmt, torch.float16))
            entry = {**footprint.to_dict(), "size_bytes": dir_bytes(work / fmt), "export_seconds": seconds}
            if fmt == "half":
                entry["ppl_load_model"] = ppl(load_model(work / fmt, torch.float32)[0])
            else:
                entry["ppl_own_loader"] = ppl(load_packed(work / fmt, torch.float32)[0])
            if fmt == "compressed-tensors":
                entry["ppl_compressed_tensors_library"] = ppl(ct_library_load(work / fmt))
            entry["ppl_equal_to_fake_quant"] = all(v == result["fake_quant_ppl"] for k, v in entry.items()
                                                   if k.startswith("ppl_"))
            result["formats"][fmt] = entry
            print(fmt, json.dumps(entry), flush=True)
            model.half()  # export leaves the model as it was; keep the half weights for the next one
    path = common.write_result(args, result)
    print(json.dumps(result, indent=2))
    common.say("wrote", path)


if __name__ == "__main__":
    main()
