"""Print the options table of every recipe method as markdown (for docs/methods/*.md).

    .venv/bin/python docs/gen_options.py            # every method
    .venv/bin/python docs/gen_options.py gptq kd    # some of them

Each row is one field of the method's options dataclass (inherited fields included):
name, default and meaning. The meaning is an entry of MEANINGS below when there is one,
else the field's trailing comment in the source; a `Literal` type adds the accepted
values. The committed pages are plain markdown: paste the output, then read it.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from typing import Any

import quant

# meanings of fields whose source comment is missing or points elsewhere, by (class, field)
MEANINGS: dict[tuple[str, str], str] = {
    ("QuaRotOptions", "online"): "online Hadamard rotations; auto: down_proj / o_proj inputs when "
                                 "activations are quantized, V/O when activations or the KV cache "
                                 "are, q/k after RoPE when the KV cache is",
    ("FPSearchOptions", "fold"): "where the pre-shift 2^-k goes. quantized: on the quantized "
                                 "weight column (the reference code's function); weight: folded "
                                 "into the float weight before it is quantized",
    ("KDOptions", "teacher"): "online: a teacher forward per micro batch; topk: the teacher's top-k "
                              "logits computed once before training",
    ("KDOptions", "trainable"): "all: every float parameter trains (the reference); linears: only "
                                "the quantized linears",
    ("QuaRotOptions", "seed"): "seed of the random signs of the residual rotation Q (norms: fuse; "
                               "norms: online refuses a seed other than 0)",
    ("QuaRotOptions", "norms"): "RMSNorm scales. online: kept in the norms, each quantized reader's "
                                "input rotated online (W <- W H); fuse: fused into the readers and "
                                "the residual stream rotated (as published)",
    ("BlockAPOptions", "epochs"): "passes over the training samples, per block",
    ("BlockAPOptions", "batch_size"): "samples per training step",
    ("BlockAPOptions", "qparam_lr"): "learning rate of the step sizes and zero points",
    ("TesseraQOptions", "batch_size"): "samples per Adam step",
    ("TesseraQOptions", "scale_lr"): "learning rate of the dequantisation-scale factors",
    ("TesseraQOptions", "scale_weight_decay"): "L2 weight decay of the scale factors",
    ("E2EQPOptions", "kd_temperature"): "temperature T of the distillation term",
    ("KDOptions", "temperature"): "distillation temperature T (loss scaled by T^2)",
    ("FPSearchOptions", "rounds"): "rounds of (weight bias, activation bias, weight format, "
                                   "activation format) search per layer",
    ("FPSearchOptions", "gamma_min"): "smallest multiplier of the min-max bias tried",
    ("FPSearchOptions", "gamma_max"): "largest multiplier of the min-max bias tried",
    ("FPSearchOptions", "seed"): "seed of the scoring-token subset",
}


def _comments(cls: type) -> dict[str, str]:
    """field name -> trailing comment, from the class body and its bases' bodies."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        for line in src.splitlines():
            head, sep, comment = line.partition("#")
            name = head.strip().split(":")[0].strip()
            if sep and name in names and ":" in head:
                out[name] = _comment_text(line)
    return out


def _comment_text(line: str) -> str:
    for tok in tokenize.generate_tokens(io.StringIO(line + "\n").readline):
        if tok.type == tokenize.COMMENT:
            return tok.string.lstrip("#").strip()
    return ""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _accepted(hint: Any) -> list[str]:
    """The values of a `Literal[...]` type (also inside an alias such as `Normalize`)."""
    if typing.get_origin(hint) is typing.Literal:
        return [str(a) for a in typing.get_args(hint)]
    return []


def _yaml(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, str):
        return f"`{value!r}`" if value == "" else f"`{value}`"
    return f"`{value}`"


def table(method: str) -> str:
    m = quant.method(method)
    notes = _comments(m.options)
    hints = typing.get_type_hints(m.options)
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(m.options):
        meaning = MEANINGS.get((m.options.__name__, f.name)) or notes.get(f.name, "")
        accepted = _accepted(hints.get(f.name))
        if accepted and not all(f"{a}" in meaning for a in accepted):
            meaning = f"{meaning} (accepted: {', '.join(accepted)})".lstrip()
        rows.append(f"| `{f.name}` | {_yaml(_default(f))} | {meaning.replace('|', '/')} |")
    head = f"`{m.options.__name__}` ({m.fn.__module__}), kind `{m.kind}`"
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str]) -> None:
    for name in argv or quant.method_names():
        print(f"## {name}\n\n{table(name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
