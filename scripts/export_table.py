"""Write docs/results/export.json: one row per export format and scheme, from the raw records
of the two export benches (nothing is re-measured here).

- docs/results/export_consumers.json (`python -m benches.quality.export_consumers`):
  compressed-tensors and GPTQ exports, each loaded by every consumer that installs here;
- docs/results/export_gguf.json (`python -m benches.quality.gguf_llamacpp`): GGUF files run
  in llama.cpp itself.

Per row: size on disk, bits per weight, size against fp16, which consumers loaded it (and
which did not, or loaded it wrongly), the max logit difference and the PPL against the
fake-quant model, and for GGUF the CPU decode tokens/s against llama.cpp's F16 file.

    python scripts/export_table.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def consumer_rows(raw: dict) -> list[dict]:
    rows = []
    for variant, v in raw["variants"].items():
        for fmt, f in v["formats"].items():
            rows.append({
                "format": fmt, "scheme": variant, "size_bytes": f["size_bytes"],
                "bits_per_weight": round(f["bits_per_weight"], 3),
                "size_vs_fp16": round(f["size_vs_fp16"], 4),
                "consumers": [{k: c.get(k) for k in ("consumer", "dtype", "loaded", "max_logit_diff",
                                                     "ppl_vs_fake_quant", "load_seconds", "error")
                               if k in c} for c in f["consumers"]],
                "source": "export_consumers.json"})
    return rows


def gguf_rows(raw: dict) -> list[dict]:
    rows, ppl, decode = [], raw["ppl"], raw["decode"]["per_file"]
    f16 = decode["f16"]["per_cpu_second_median"]
    for key, gtype in raw["gguf_types"].items():
        logits = raw["logits_vs_ours"].get(key, {})
        rows.append({
            "format": f"gguf {gtype}", "scheme": key, "size_bytes": raw["size_bytes"][key],
            "bits_per_weight": raw.get("bits_per_weight_quantized_linears", {}).get(key, 16.0),
            "size_vs_fp16": round(raw["size_bytes"][key] / raw["size_bytes"]["f16"], 4),
            "consumers": [{"consumer": f"llama.cpp (llama-cpp-python {raw['llama_cpp_python']})",
                           "loaded": True, "max_logit_diff": logits.get("max_abs_logit_diff"),
                           "rel_l2_logit_diff": logits.get("rel_l2_logit_diff"),
                           "top1_agreement": logits.get("top1_agreement"),
                           "ppl_vs_fake_quant": round(1 + ppl["rel_diff"][key], 5)}],
            "source": "export_gguf.json"})
        if key in decode:  # not every file was timed
            rows[-1].update(decode_tokens_per_cpu_second=round(decode[key]["per_cpu_second_median"], 2),
                            decode_vs_f16=round(decode[key]["per_cpu_second_median"] / f16, 3),
                            decode_threads=raw["decode"]["threads"])
    return rows


def build() -> dict:
    consumers = json.loads((RESULTS / "export_consumers.json").read_text())
    gguf = json.loads((RESULTS / "export_gguf.json").read_text())
    return {"about": "one row per export format and scheme, assembled by scripts/export_table.py from "
                     "export_consumers.json and export_gguf.json (their commands and environments are there)",
            "rows": consumer_rows(consumers) + gguf_rows(gguf)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail when docs/results/export.json is stale")
    args = ap.parse_args()
    text = json.dumps(build(), indent=2) + "\n"
    out = RESULTS / "export.json"
    if args.check:
        if not out.is_file() or out.read_text() != text:
            sys.exit(f"{out} is stale: run python scripts/export_table.py")
        return
    out.write_text(text)
    print("wrote", out)


if __name__ == "__main__":
    main()
