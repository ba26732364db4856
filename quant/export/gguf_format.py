"""GGUF: one file that llama.cpp (and ollama, LM Studio) runs as is.

`model.gguf` is written with the gguf package's `GGUFWriter` (container, metadata,
alignment); the quantized blocks are written by this project from its own integer
codes, step sizes and zero points (`quant.export.gguf_blocks`), never re-quantised
from float, so the file holds exactly the trained grid. Architecture knowledge
(tensor names, q/k row order, hyperparameter keys, vocabulary) is data in
`quant.export.gguf_arch`.

Type mapping (details and exactness in `gguf_blocks`):

| scheme.weight                      | llama.cpp type | exact?                          |
|------------------------------------|----------------|---------------------------------|
| int4 asymmetric, g % 32 == 0 or -1 | Q4_1           | yes, up to fp16 rounding of -s*z |
| int4 symmetric                     | Q4_0           | yes                             |
| int2 / int3 (asym / sym)           | Q4_1 / Q4_0    | yes, at 4-bit size (no smaller type holds the grid) |
| int5 (asym / sym)                  | Q5_1 / Q5_0    | yes (asym: up to fp16 of -s*z)  |
| int6 / int7 (either), int8 sym     | Q8_0           | yes                             |
| int8 asymmetric                    | refused        | no type holds q - z in -255..255 |
| group size not a multiple of 32    | refused        | a block would straddle groups   |
| activation / KV-cache quantization | refused        | llama.cpp stores weights only   |
| FP weight formats                  | refused        | integer grids only              |

Float parts: embeddings and an unquantized lm_head in `convert.dtype` (F16 or BF16;
tied embeddings are written once, as llama.cpp's converter does); norms (1-D) in F32,
holding the half-precision values exactly: llama.cpp's converter keeps every 1-D
tensor in F32 and its CPU kernels expect it. Metadata follows llama.cpp's converter
for the llama architecture: hyperparameters, RoPE base/scaling, the gpt2/BPE
vocabulary with token types, merges, bos/eos/pad ids, whether BOS/EOS are added (as
the Hugging Face tokenizer really does), the chat template and the model's sampling
defaults.

Why not llama.cpp's own `convert_hf_to_gguf.py` + `llama-quantize`: it quantises
from float with its own rounding, which throws away what calibration and training
chose; here the codes in the file are the codes the fake-quant model used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from quant.config.scheme import QuantScheme
from quant.export.base import (
    DiskFootprint,
    NoOptions,
    check_int_weights,
    integer_state,
    refuse_runtime_quant,
)
from quant.export.gguf_arch import (
    family_for,
    permute,
    tensor_names,
    write_generation,
    write_hparams,
    write_vocab,
)
from quant.export.gguf_blocks import block_type, check_group, encode
from quant.methods import register
from quant.models.arch import mapping_for

GGUF_FILE = "model.gguf"
FLOAT_TYPES = {torch.float16: "F16", torch.bfloat16: "BF16"}


def _float_tensor(t: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, object]:
    """(array, raw type) of a float tensor stored as F16/BF16 (2-D) or F32 (1-D, norms)."""
    import gguf

    if t.dim() <= 1:
        return t.detach().float().contiguous().numpy(), None
    if dtype not in FLOAT_TYPES:
        raise ValueError(f"dtype={dtype} is not accepted for GGUF float tensors; use {list(FLOAT_TYPES)}")
    h = t.detach().to(dtype).contiguous()
    if dtype == torch.float16:
        return h.numpy(), None
    return h.view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16  # bit copy, no re-rounding


def _quant_tensor(ql, heads: int | None) -> tuple[np.ndarray, object]:
    q, scale, zp = integer_state(ql)  # q [N, K], scale [N, G], zp [N, G] | None
    if heads is not None:  # rows move whole: codes, steps and zero points together
        q, scale = permute(q, heads), permute(scale, heads)
        zp = None if zp is None else permute(zp, heads)
    qtype, blocks = encode(q, scale, zp, ql.spec.bits, ql.spec.group_size)
    return blocks, qtype


def _tied(model: nn.Module, a: str, b: str) -> bool:
    wa, wb = model.get_submodule(a).weight, model.get_submodule(b).weight
    return wa is wb or (wa.data_ptr() == wb.data_ptr() and wa.shape == wb.shape)


def file_type(types: list) -> int:
    """general.file_type: the type of the quantized linears, else the float type."""
    import gguf

    names = {t.name for t in types if t is not None}
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"):
        if name in names:
            return getattr(gguf.LlamaFileType, f"MOSTLY_{name}")
    return gguf.LlamaFileType.MOSTLY_F16


@torch.no_grad()
def write_gguf(model: nn.Module, tokenizer, path: str | Path, dtype: torch.dtype = torch.float16,
               name: str | None = None) -> dict[str, str]:
    """Write `model` (QuantLinear layers as blocks, float parts as `dtype`) to one GGUF file.
    Returns tensor name -> llama.cpp type. Not atomic by itself: `export` wraps it."""
    import gguf

    from quant.modules.linear import QuantLinear

    family = family_for(model)
    config = model.config
    names = tensor_names(model, family)
    mapping = mapping_for(model)
    lm_head, embed = mapping.lm_head, mapping.embed_tokens
    tensors: dict[str, tuple[np.ndarray, object]] = {}
    written: set[str] = set()
    for path_, (gname, heads_attr) in names.items():
        module = model.get_submodule(path_)
        heads = getattr(config, heads_attr) if heads_attr else None
        if path_ == lm_head and not isinstance(module, QuantLinear) and _tied(model, lm_head, embed):
            written.add(f"{path_}.weight")  # tied: llama.cpp reuses token_embd when output is absent
            continue
        if isinstance(module, QuantLinear):
            tensors[f"{gname}.weight"] = _quant_tensor(module, heads)
        else:
            w = module.weight
            tensors[f"{gname}.weight"] = _float_tensor(w if heads is None else permute(w, heads), dtype)
        bias = getattr(module, "bias", None)
        if bias is not None:
            tensors[f"{gname}.bias"] = _float_tensor(bias if heads is None else permute(bias, heads), dtype)
        written.update(f"{path_}.{k}" for k, _ in module.named_parameters())
        written.update(f"{path_}.{k}" for k, _ in module.named_buffers())
    leftover = sorted(k for k in model.state_dict() if k not in written and "rotary_emb" not in k)
    if leftover:
        raise ValueError(f"GGUF family {family.arch!r} has no tensor name for {leftover[:5]}; "
                         "extend quant/export/gguf_arch.py")
    writer = gguf.GGUFWriter(str(path), family.arch)
    # a local directory's last component, never the whole path (it would leak into the file)
    writer.add_name(name or Path(getattr(config, "_name_or_path", "") or family.arch).name)
    writer.add_file_type(file_type([t for _, t in tensors.values()]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tname, t in write_hparams(writer, config):
        tensors[tname] = (t.numpy(), None)
    write_vocab(writer, tokenizer, config.vocab_size)
    write_generation(writer, getattr(model, "generation_config", None))
    for tname, (arr, raw) in tensors.items():
        writer.add_tensor(tname, arr, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: (raw.name if raw is not None else {np.float16: "F16", np.float32: "F32"}[arr.dtype.type])
            for k, (arr, raw) in tensors.items()}


@register("gguf", kind="export", options=NoOptions)
class GGUFExporter:
    """llama.cpp's GGUF, one file (`model.gguf`), blocks written from our integer codes."""

    name = "gguf"

    def check(self, scheme: QuantScheme, layers: dict) -> None:
        refuse_runtime_quant(scheme, self.name)
        check_int_weights(scheme, self.name, tuple(range(2, 9)))
        block_type(scheme.weight.bits, scheme.weight.symmetric)
        for name, m in layers.items():
            check_group(scheme.weight.group_size, m.in_features, name)

    def check_model(self, model: nn.Module, tokenizer) -> None:
        """What the scheme does not tell: the architecture, RoPE and tokenizer can be described
        (the metadata is built into a throwaway writer), before any file is written."""
        import gguf

        writer = gguf.GGUFWriter(None, family_for(model).arch)
        write_hparams(writer, model.config)
        write_vocab(writer, tokenizer, model.config.vocab_size)

    def load_snippets(self, path: str, scheme: QuantScheme) -> dict[str, str]:
        """How llama.cpp and the tools built on it run this file (model card)."""
        f = f"{path}/{GGUF_FILE}"
        return {"llama.cpp": f"llama-cli -m {f} -p \"Hello\"        # or: llama-server -m {f}",
                "llama-cpp-python": f"from llama_cpp import Llama\nllm = Llama(model_path={f!r})\n"
                                    "print(llm(\"Hello\", max_tokens=32)[\"choices\"][0][\"text\"])",
                "ollama": f"echo 'FROM {f}' > Modelfile && ollama create my-model -f Modelfile"}

    def write(self, model: nn.Module, tokenizer, scheme: QuantScheme, out: Path, dtype: torch.dtype) -> None:
        write_gguf(model, tokenizer, out / GGUF_FILE, dtype)

    def disk_footprint(self, out: Path, layers: dict, params: int = 0) -> DiskFootprint:
        """Bytes on disk; bits per weight over every block-typed tensor (the quantized linears);
        the weights file is the .gguf (`params`: the unquantized model's, for the size vs fp16)."""
        from gguf import GGMLQuantizationType, GGUFReader

        floats = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
        reader = GGUFReader(out / GGUF_FILE)
        qbytes = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type not in floats)
        n = sum(m.in_features * m.out_features for m in layers.values())
        total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        return DiskFootprint(total, qbytes, n, 8 * qbytes / n if n else 16.0,
                             (out / GGUF_FILE).stat().st_size, params)

    def max_logit_diff(self, out: Path, ids: torch.Tensor, ref: torch.Tensor) -> float | None:
        """Max |logit| difference of the file in llama.cpp against `ref` (ids [1, T], ref
        [1, T, V]); None when llama-cpp-python is not installed (the check is optional)."""
        from quant.export import llamacpp

        if not llamacpp.available():
            return None
        llm = llamacpp.load(out / GGUF_FILE, n_ctx=max(32, ids.shape[1]))
        got = llamacpp.logits(llm, ids[0].tolist())
        return float(np.abs(got - ref[0].float().numpy()).max())
