"""GPTQ checkpoints with `checkpoint_format: gptq_v2` (exact zero points).

Layout (AutoGPTQ / GPTQModel, per quantized linear `name`, K inputs, N outputs,
G = K / group_size groups; group_size -1 = one group per output channel):

- `name.qweight` int32 [K*b/32, N]: codes packed along the input dimension
  (`quant.numerics.packing`, the same bit stream as GPTQ's 2/3/4/8-bit packers);
- `name.qzeros`  int32 [G, N*b/32]: zero points packed along the output dimension;
- `name.scales`  [G, N] in the model's half dtype;
- `name.g_idx`   int32 [K]: the group of every input (i // group_size: no act-order);
- `name.bias` if the layer has one.

Why v2: GPTQ v1 stores `z - 1` (a historical off-by-one its kernels add back), so a
2-bit zero point of 0 cannot be stored; v2 stores z itself, which is what this
project's codes need. Symmetric schemes are stored as GPTQ stores them: codes
offset by 2^(b-1) and zero points 2^(b-1), with `sym: true`. `quantize_config.json`
and `config.json`'s `quantization_config` carry bits, group_size, desc_act=false,
sym, lm_head, checkpoint_format=gptq_v2, quant_method=gptq, pack_dtype=int32.

Refused (ConfigError naming the field): activation/KV-cache quantisation, non-integer
formats, bits other than 2/3/4/8, group sizes other than -1 or a power of two in
16..1024 (the group sizes GPTQ kernels are built for), layers whose widths are not
multiples of 32 (GPTQ packs 32 inputs into b words). The loader is this project's
(`quant.export.loader`); GPTQModel itself is not a dependency.

Consumers (docs/compatibility.md, generated from tests/quant/export/test_consumers.py): GPTQModel
7.7 reads `checkpoint_format: gptq_v2` and loads every width, symmetric or not, exactly
(to fp16/bf16 rounding) with its `GPTQ_TORCH` backend in fp16/bf16; its `AUTO`
backend in float32 on CPU picks `TorchFusedLinear` for 4 bits, whose CPU transform
replaces the zero points by zeros (`transform_cpu`), so asymmetric 4-bit logits come
out wrong without an error. No config field steers that choice (the kernel declares
asymmetric support), so the model card's GPTQModel line names the backend and dtype.
transformers loads the checkpoint through GPTQModel + optimum, except a quantized
lm_head: that path converts the decoder blocks only, so lm_head stays a plain Linear
initialised at random (a load report, no error). vLLM
(`gptq_marlin.py`) runs symmetric 4/8-bit GPTQ with Marlin; anything else falls back
to its `gptq` method, which reads `checkpoint_format` (v2 zero points) but takes fp16
only and warns that its 4-bit kernel is buggy: for asymmetric 4-bit in vLLM prefer the
compressed-tensors export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.export.base import (
    NoOptions,
    check_int_weights,
    edit_config,
    expect,
    integer_state,
    refuse_runtime_quant,
)
from quant.methods import register
from quant.models.arch import set_module
from quant.modules.packed import PackedLinear
from quant.numerics.packing import WORD, pack

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_GROUPS = (-1, 16, 32, 64, 128, 256, 512, 1024)
# vLLM gptq_marlin.py: GPTQMarlinConfig.TYPE_MAP holds (4, sym) and (8, sym) only; Marlin's group sizes
VLLM_MARLIN = {"bits": (4, 8), "sym": True, "group_size": (-1, 32, 64, 128)}
QUANTIZE_CONFIG = "quantize_config.json"


def packed_from_quant_linear(ql, dtype: torch.dtype) -> PackedLinear:
    """A PackedLinear (asymmetric storage) holding exactly the codes of a frozen QuantLinear."""
    q, scale, zp = integer_state(ql)  # q [N, K] int32, scale [N, G], zp [N, G] or None
    bits = ql.spec.bits
    if zp is None:  # signed codes -> unsigned with the GPTQ offset
        off = 1 << (bits - 1)
        q, zp = q + off, torch.full_like(scale, float(off))
    pl = PackedLinear(ql.in_features, ql.out_features, bits, ql.spec.group_size, symmetric=False,
                      bias=ql.bias is not None, scale_dtype=dtype, device=q.device)
    pl.qweight.copy_(pack(q.t(), bits, dim=0))
    pl.qzeros.copy_(pack(zp.t().round().to(torch.int32), bits, dim=1))
    pl.scales.copy_(scale.t().to(dtype))
    if ql.bias is not None:
        pl.bias.copy_(ql.bias.detach().to(dtype))
    return pl


@register("gptq", kind="export", options=NoOptions)
class GPTQExporter:
    """GPTQ v2 checkpoint (int32-packed codes, scales and zero points; GPTQModel, vLLM)."""

    name = "gptq"

    def check(self, scheme: QuantScheme, layers: dict) -> None:
        refuse_runtime_quant(scheme, self.name)
        check_int_weights(scheme, self.name, GPTQ_BITS)
        g = scheme.weight.group_size
        if g not in GPTQ_GROUPS:
            raise ConfigError(f"scheme.weight.group_size={g} cannot be exported to 'gptq'; accepted: "
                              f"{list(GPTQ_GROUPS)}")
        for name, m in layers.items():
            if m.in_features % WORD or m.out_features % WORD:
                raise ConfigError(f"layer {name} ({m.in_features} -> {m.out_features}) cannot be "
                                  f"packed to 'gptq': both widths must be multiples of {WORD}")

    def quantization_config(self, scheme: QuantScheme) -> dict:
        w = scheme.weight
        return {"quant_method": "gptq", "bits": w.bits, "group_size": w.group_size, "desc_act": False,
                "sym": w.symmetric, "lm_head": scheme.quantize_lm_head, "checkpoint_format": "gptq_v2",
                "pack_dtype": "int32", "true_sequential": True}

    @torch.no_grad()
    def write(self, model: nn.Module, tokenizer, scheme: QuantScheme, out: Path, dtype: torch.dtype) -> None:
        from quant.modules.linear import quant_linears

        layers = dict(quant_linears(model))
        g = scheme.weight.group_size
        try:
            for name, ql in layers.items():
                pl = packed_from_quant_linear(ql, dtype)
                gs = ql.in_features if g == -1 else g
                pl.register_buffer("g_idx", torch.arange(ql.in_features, dtype=torch.int32) // gs)
                set_module(model, name, pl)
            model.save_pretrained(out, safe_serialization=True)
        finally:
            for name, ql in layers.items():
                set_module(model, name, ql)
        tokenizer.save_pretrained(out)
        qc = self.quantization_config(scheme)
        (out / QUANTIZE_CONFIG).write_text(json.dumps(qc, indent=2))

        def add_config(cfg: dict) -> None:
            cfg["quantization_config"] = qc
            if scheme.quantize_lm_head:  # the quantized head is no longer the embedding
                cfg["tie_word_embeddings"] = False

        edit_config(out, add_config)

    def load_snippets(self, path: str, scheme: QuantScheme) -> dict[str, str]:
        """How each runtime loads this checkpoint (model card; `path` a directory or hub id)."""
        w = scheme.weight
        gptqmodel = ("# pip install gptqmodel\nimport torch\nfrom gptqmodel import BACKEND, GPTQModel\n"
                     f"model = GPTQModel.load({path!r}, backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)")
        if w.bits == 4 and not w.symmetric:
            gptqmodel += ("\n# not BACKEND.AUTO with dtype=torch.float32 on CPU: it picks TorchFusedLinear, "
                          "which drops\n# asymmetric zero points (GPTQModel 7.7) and returns wrong logits")
        hf = ("# pip install gptqmodel optimum  (transformers loads GPTQ through them)\nimport torch\n"
              "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float16, device_map=\"auto\")\n"
              f"tokenizer = AutoTokenizer.from_pretrained({path!r})")
        if scheme.quantize_lm_head:  # optimum converts the decoder blocks only: lm_head.weight would be random
            hf = ("# not loadable by transformers' GPTQ path: it leaves lm_head a plain Linear and initialises it "
                  "at random\n# (lm_head.weight MISSING in its load report); use the GPTQModel line")
        marlin = (w.bits in VLLM_MARLIN["bits"] and w.symmetric and w.group_size in VLLM_MARLIN["group_size"])
        vllm = f"from vllm import LLM\nllm = LLM({path!r}, dtype=\"float16\")"
        vllm += ("  # gptq_marlin" if marlin else
                 "  # vLLM's `gptq` method (exllama kernel, gptq_v2 zero points); not Marlin, which needs "
                 "symmetric 4/8 bits")
        if not marlin and w.bits == 4:
            vllm += "\n# vLLM warns its 4-bit gptq_gemm kernel is buggy: prefer the compressed-tensors export"
        return {"transformers": hf, "vLLM": vllm, "GPTQModel": gptqmodel}

    def layer_spec(self, qc: dict) -> tuple[int, int, bool]:
        return int(qc["bits"]), int(qc["group_size"]), bool(qc.get("lm_head", False))

    def load_layer(self, tensors: dict, name: str, linear: nn.Linear, qc: dict,
                   dtype: torch.dtype) -> PackedLinear:
        if qc.get("checkpoint_format") != "gptq_v2":
            raise ConfigError(f"quantization_config.checkpoint_format={qc.get('checkpoint_format')!r} "
                              "is not supported; this loader reads 'gptq_v2' (exact zero points)")
        if qc.get("desc_act"):
            raise ConfigError("quantization_config.desc_act=true (act-order) is not supported; use false")
        bits, g, _ = self.layer_spec(qc)
        k, n = linear.in_features, linear.out_features
        gs = k if g == -1 else g
        groups = k // gs
        pl = PackedLinear(k, n, bits, g, symmetric=False, bias=f"{name}.bias" in tensors, scale_dtype=dtype)
        pl.qweight.copy_(expect(tensors, f"{name}.qweight", (k * bits // WORD, n), torch.int32))
        pl.qzeros.copy_(expect(tensors, f"{name}.qzeros", (groups, n * bits // WORD), torch.int32))
        pl.scales.copy_(expect(tensors, f"{name}.scales", (groups, n)).to(dtype))
        g_idx = expect(tensors, f"{name}.g_idx", (k,))
        if not torch.equal(g_idx.long(), torch.arange(k) // gs):
            raise ConfigError(f"checkpoint tensor '{name}.g_idx' reorders inputs (act-order); "
                              "only g_idx = i // group_size is supported")
        if pl.bias is not None:
            pl.bias.copy_(expect(tensors, f"{name}.bias", (n,)).to(dtype))
        return pl

    def layer_keys(self, name: str) -> tuple[str, ...]:
        return tuple(f"{name}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx", "bias"))
