"""Packed export of the embedded model on CPU: size on disk per format, bits per weight,
and PPL of every checkpoint loaded back, against the fake-quant model it came from.

SmolLM2-135M (the embedded default, or `--model DIR`), RTN W4 g64 asymmetric, frozen
and converted to fp16 (quant.export.half); then each format is written and loaded back:
`compressed-tensors` through this project's loader and through compressed-tensors' own
`ModelCompressor.decompress_model` (transformers 5.23 cannot load the asymmetric
checkpoint, see docs/issues/issue-14.md), `gptq` through this project's loader, `half`
through `load_model`. PPL on the first `--windows` windows of the held-out Wikipedia
text, computed in float32 on every model.

    python benches/convert_quality.py --out docs/results/convert_cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


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


def main() -> None:
    from quant.calibrate.rtn import quantize_linears
    from quant.checkpoint import save_quantized
    from quant.config.scheme import QuantScheme, WeightSpec
    from quant.data import tokenize_text
    from quant.eval.ppl import perplexity
    from quant.export.base import export
    from quant.export.half import to_half
    from quant.export.loader import load_packed
    from quant.load import load_model
    from quant.models.hub import resolve_model
    from quant.numerics.formats import IntFormat
    from tasks.textdata import split_wiki

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="fp32 safetensors + tokenizer dir (default: embedded)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--formats", nargs="+", default=["compressed-tensors", "gptq", "half"])
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="convert-quality-"))
    src = Path(args.model) if args.model else resolve_model("embedded:smollm2-135m", work / "base")
    model, tok = load_model(src, torch.float32)
    ids = tokenize_text(tok, "\n\n".join(split_wiki(5)[1]))

    def ppl(m) -> float:
        return perplexity(m.float(), ids, args.seq_len, 1, args.windows).ppl

    result = {"model": str(src), "scheme": "W4A16KV16g64 asymmetric, RTN", "seq_len": args.seq_len,
              "windows": args.windows, "base_bytes": dir_bytes(src), "base_ppl": ppl(model)}
    scheme = QuantScheme(weight=WeightSpec(IntFormat(4), 64, False))
    quantize_linears(model, scheme)
    save_quantized(model, tok, scheme, work / "fake-quant-fp32")
    result["fake_quant_fp32_bytes"] = dir_bytes(work / "fake-quant-fp32")
    result["half"] = to_half(model, torch.float16)
    result["fake_quant_ppl"] = ppl(model)
    model.half()
    result["formats"] = {}
    for fmt in args.formats:
        t0 = time.time()
        fp = export(model, tok, scheme, fmt, work / fmt, torch.float16)
        entry = {**fp.to_dict(), "size_bytes": dir_bytes(work / fmt), "export_seconds": time.time() - t0}
        if fmt == "half":
            entry["ppl_load_model"] = ppl(load_model(work / fmt, torch.float32)[0])
        else:
            entry["ppl_own_loader"] = ppl(load_packed(work / fmt, torch.float32)[0])
        if fmt == "compressed-tensors":
            entry["ppl_compressed_tensors_library"] = ppl(ct_library_load(work / fmt))
        entry["ppl_equal_to_fake_quant"] = all(v == result["fake_quant_ppl"] for k, v in entry.items()
                                               if k.startswith("ppl_") and k != "ppl_equal_to_fake_quant")
        result["formats"][fmt] = entry
        print(fmt, json.dumps(entry), flush=True)
        model.half()  # export leaves the model as it was; keep the half weights for the next one
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
