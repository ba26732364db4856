"""The model card (README.md) that makes an export a publishable folder.

An exported directory holds config.json, the weights, the tokenizer and
generation_config.json (written by `save_pretrained`); the card adds what a reader
needs: the recipe, bits per weight, the footprint against the fp16 model, the quality
measured so far, and the exact lines that load it in each runtime (the exporter's
`load_snippets`: transformers and vLLM for the packed formats; a GGUF exporter adds
llama.cpp the same way).

Why facts + render and not a finished file: the stage that writes a checkpoint
(`convert`) knows its footprint and that it loads back to the fake-quant logits, but
not its perplexity or accuracy, which `evaluate` measures later. So the facts are kept
as data (`CardFacts`, stored under "card" in the directory's quantization.json) and
`render_card` turns facts + whatever has been measured into markdown: `convert`
writes the card with what it knows and says which numbers are still to come;
`register` renders it again with evaluate's numbers (tasks/packed_model.py). Nothing
is copied by hand, so the card cannot drift from the measurements.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quant.config.scheme import QuantScheme
from quant.export.base import load_snippets

CARD_FILE = "README.md"
CARD_KEY = "card"  # key of the facts in quantization.json
COMPAT_DOC = "docs/compatibility.md"


@dataclass(frozen=True)
class CardFacts:
    format: str
    scheme: dict[str, Any]  # QuantScheme.to_dict()
    recipe: str  # e.g. "calibrate=rtn" or "calibrate=awq,block_ap=tesseraq,e2e=e2e-qp"
    dtype: str  # half dtype of scales / embeddings / norms
    base_model: str
    footprint: dict[str, float]  # DiskFootprint.to_dict()
    checks: dict[str, float] = field(default_factory=dict)  # measured while converting

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CardFacts:
        return cls(**data)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _title(facts: CardFacts, scheme: QuantScheme) -> str:
    w = scheme.weight
    kind = "symmetric" if w.symmetric else "asymmetric"
    return f"{facts.base_model}: {scheme.name} ({kind} int{w.bits}), {facts.format}"


def _footprint(facts: CardFacts, scheme: QuantScheme) -> list[str]:
    fp = facts.footprint
    kept = ["embeddings", "norms"] + ([] if scheme.quantize_lm_head else ["lm_head"])
    rows = [("weights on disk (*.safetensors)", _mb(fp["weights_bytes"])),
            ("bits per weight, quantized linears (codes + scales + zero points + indices)",
             f"{fp['bits_per_weight']:.4f}")]
    if "fp16_bytes" in fp:
        rows += [("the same model in fp16", _mb(fp["fp16_bytes"])),
                 ("size vs fp16", f"{fp['size_vs_fp16']:.3f}"),
                 ("bits per parameter, whole model", f"{fp['bits_per_param']:.3f}")]
    rows += [("kept in " + facts.dtype, ", ".join(kept))]
    return ["| | |", "|---|---:|", *[f"| {k} | {v} |" for k, v in rows]]


def _quality(facts: CardFacts, measured: dict[str, float] | None, source: str | None) -> list[str]:
    lines = []
    if measured:
        lines += [f"Measured by {source or 'the evaluate stage'}:", "", "| metric | value |", "|---|---:|",
                  *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                    for k, v in sorted(measured.items())]]
    else:
        lines += ["Perplexity and zero-shot accuracy are not measured when a checkpoint is converted: "
                  "the `evaluate` stage scores it, and `register` publishes this card again with "
                  "its numbers."]
    if "max_logit_diff" in facts.checks:
        d = facts.checks["max_logit_diff"]
        lines += ["", "Conversion check: loaded back from this folder, the logits " + (
            "are identical to the fake-quant model's." if d == 0 else
            f"differ from the fake-quant model's by at most {d:.3g}.")]
    return lines


def render_card(facts: CardFacts, path: str = ".", measured: dict[str, float] | None = None,
                measured_by: str | None = None) -> str:
    """Markdown model card; `path` is what the load lines pass (a directory or a hub id)."""
    scheme = QuantScheme.from_dict(facts.scheme, "card.scheme")
    w = scheme.weight
    tags = ["quantized", facts.format, f"int{w.bits}", "symmetric" if w.symmetric else "asymmetric"]
    # the hub's base_model field takes a hub id, not a local path or this project's embedded: name
    hub_id = ":" not in facts.base_model and not facts.base_model.startswith(("/", "."))
    lines = ["---", *([f"base_model: {facts.base_model}"] if hub_id else []), "library_name: transformers",
             "tags:", *[f"- {t}" for t in tags], "---", "", f"# {_title(facts, scheme)}", "",
             f"Quantized with quant-pipeline. Recipe: `{facts.recipe}`; weights int{w.bits}, "
             f"{'per output channel' if w.group_size == -1 else f'groups of {w.group_size}'}, "
             f"{'symmetric' if w.symmetric else 'asymmetric (integer zero points)'}; lm_head "
             f"{'quantized' if scheme.quantize_lm_head else 'not quantized'}; scales, embeddings and "
             f"norms in {facts.dtype}.", "", "## Footprint", "", *_footprint(facts, scheme), "",
             "## Quality", "", *_quality(facts, measured, measured_by), "", "## Load it", "",
             f"The lines load the folder at `{path}`; put its path or hub id there.", ""]
    snippets = load_snippets(facts.format, path, scheme)
    for runtime, code in snippets.items():
        lang = "python" if "import" in code or "LLM(" in code else "text"
        lines += [f"### {runtime}", "", f"```{lang}", code, "```", ""]
    if not snippets:
        lines += ["This format has no load lines for other runtimes; this project's "
                  "`quant.load_model(path)` loads it.", ""]
    lines += [f"Which runtime loads which format, bit width and symmetry, measured: `{COMPAT_DOC}` of "
              "quant-pipeline.", ""]
    return "\n".join(lines)


def read_facts(model_dir: str | Path) -> CardFacts | None:
    """The card facts a converted directory carries (quantization.json), or None."""
    f = Path(model_dir) / "quantization.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text()).get(CARD_KEY)
    return CardFacts.from_dict(data) if data else None
