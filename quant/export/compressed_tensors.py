"""compressed-tensors `pack-quantized`: what vLLM and transformers read.

Written through the compressed-tensors package itself (pinned, 0.20.0: its 3-bit
layout changed in 2026), the way llm-compressor saves: the dequantised weights go
into plain linears, `apply_quantization_config` attaches `weight_scale` /
`weight_zero_point`, which are set to this project's step sizes and zero points,
`ModelCompressor.compress_model` quantises and packs (`PackedQuantizationCompressor`,
`pack_to_int32`), `save_pretrained` writes the tensors and `update_config` the
`quantization_config`. Per quantized linear: `weight_packed` int32 [N, K*b/32],
`weight_scale` [N, G] (half dtype), `weight_shape`, and for asymmetric schemes
`weight_zero_point` int32 [N*b/32, G] (packed along the output dimension). Any
integer width of this project (2..8 bits) is written; lm_head too when the scheme
quantizes it (then `tie_word_embeddings` is written false: the quantized head is no
longer the embedding).

Conventions: compressed-tensors codes are signed, [-2^(b-1), 2^(b-1)-1], and so are
its zero points; this project's asymmetric codes are unsigned [0, 2^b-1]. Both are
shifted by 2^(b-1), which leaves q - z unchanged. The package re-quantises the
dequantised weight from float32 (exact: |round-off| << 0.5 step); after compression
every packed word is compared with this project's own packing of the codes, so a
changed code is an error, not a silent difference.

Why asymmetric checkpoints say `"dequantize": true`: transformers (5.23, with
compressed-tensors 0.20) loads a compressed checkpoint by building the compressed
module layout on the meta device (`apply_quantization_config`, then
`ModelCompressor.compress_model`). `PackedQuantizationCompressor.compress` packs the
zero point only for real tensors; its meta branch leaves `weight_zero_point` at the
unpacked [N, G] int8 shape, while every asymmetric pack-quantized checkpoint
(llm-compressor's, vLLM's expectation, this one) stores it packed [N*b/32, G] int32.
The load stops on that size mismatch. Storing the zero point unpacked is no way out:
vLLM's `CompressedTensorsWNA16` allocates the packed shape, and the lazy
decompression would unpack the wrong words. transformers' other documented route,
`CompressedTensorsConfig(dequantize=True)`, decompresses each module's tensors while
loading (`CompressedTensorsDequantize`), never builds the compressed skeleton, and
loads asymmetric checkpoints; `CompressedTensorsConfig.from_dict` reads the flag from
config.json, so plain `from_pretrained(path)` takes that route. vLLM and
compressed-tensors ignore the key. The dequantised weight is `(q - z) * s` computed
in the scale dtype (fp16/bf16): one rounding per weight, not the fake-quant float32
value bit for bit. Symmetric checkpoints keep the library's default (compressed
modules, decompressed on the first forward), which is exact in float32.

Refused (ConfigError naming the field): activation and KV-cache schemes (this
project quantises them dynamically per token, keys before RoPE, which the format's
`input_activations` / static `kv_cache_scheme` would mis-state), non-integer weight
formats, in_features not a multiple of 32 (and, asymmetric, out_features: the zero
points are packed along the outputs).
"""

from __future__ import annotations

import copy
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
from quant.models.arch import get_module, set_module
from quant.modules.packed import PackedLinear
from quant.numerics import grid as P
from quant.numerics.packing import PACK_BITS, WORD, pack, unpack

CT_BITS = PACK_BITS  # compressed-tensors packs 1..8 bits; this project's integers are 2..8
# what vLLM's CompressedTensorsWNA16 runs (WNA16_SUPPORTED_TYPES_MAP / WNA16_ZP_SUPPORTED_TYPES_MAP)
VLLM_BITS, VLLM_ASYM_BITS = (4, 8), (4, 8)


def quantization_config(scheme: QuantScheme, ignore: list[str]):
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    w = scheme.weight
    grouped = w.group_size != -1
    args = QuantizationArgs(num_bits=w.bits, type="int", symmetric=w.symmetric,
                            strategy="group" if grouped else "channel",
                            group_size=w.group_size if grouped else None)
    return QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                              format="pack-quantized", ignore=ignore)


@register("compressed-tensors", kind="export", options=NoOptions)
class CompressedTensorsExporter:
    """compressed-tensors `pack-quantized` (transformers, vLLM, SGLang read it)."""

    name = "compressed-tensors"

    def check(self, scheme: QuantScheme, layers: dict) -> None:
        refuse_runtime_quant(scheme, self.name)
        check_int_weights(scheme, self.name, CT_BITS)
        for name, m in layers.items():
            if m.in_features % WORD:
                raise ConfigError(f"layer {name} (in_features={m.in_features}) cannot be packed to "
                                  f"{self.name!r}: in_features must be a multiple of {WORD}")
            if not scheme.weight.symmetric and m.out_features % WORD:
                raise ConfigError(f"layer {name} (out_features={m.out_features}) cannot be packed to "
                                  f"{self.name!r} with asymmetric weights: its zero points are packed "
                                  f"along the outputs, so out_features must be a multiple of {WORD}; "
                                  "use scheme.weight.symmetric: true")

    @torch.no_grad()
    def write(self, model: nn.Module, tokenizer, scheme: QuantScheme, out: Path, dtype: torch.dtype) -> None:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import apply_quantization_config

        from quant.modules.linear import quant_linears

        model = copy.deepcopy(model)  # the package attaches parameters and hooks
        layers = dict(quant_linears(model))
        bits, g = scheme.weight.bits, scheme.weight.group_size
        off = 1 << (bits - 1)
        codes = {}
        for name, ql in layers.items():
            q, scale, zp = integer_state(ql)
            lin = nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None)
            lin.weight.copy_(P.dequantize(q, scale, zp, ql.spec.format, g))
            if ql.bias is not None:
                lin.bias.copy_(ql.bias.float())
            set_module(model, name, lin)
            codes[name] = (q, scale, zp)
        ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers)
        qconfig = quantization_config(scheme, ignore)
        apply_quantization_config(model, qconfig)
        for name, (_, scale, zp) in codes.items():
            lin = get_module(model, name)
            lin.weight_scale.data = scale.float().clone()
            if zp is not None:
                lin.weight_zero_point.data = (zp.round().to(torch.int32) - off).to(torch.int8)
        compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
        compressor.compress_model(model)
        compressor.remove_decompression_hook(model)
        for name, (q, _, zp) in codes.items():
            lin = get_module(model, name)
            unsigned = q + off if zp is None else q
            if not torch.equal(lin.weight_packed, pack(unsigned, bits, dim=1)):
                raise RuntimeError(f"compressed-tensors changed integer codes of {name}")
            lin.weight_scale.data = lin.weight_scale.data.to(dtype)
            if lin.bias is not None:
                lin.bias.data = lin.bias.data.to(dtype)
        model.save_pretrained(out, safe_serialization=True)
        compressor.update_config(str(out))
        edit_config(out, lambda cfg: self._loader_hints(cfg, scheme))
        tokenizer.save_pretrained(out)

    @staticmethod
    def _loader_hints(cfg: dict, scheme: QuantScheme) -> None:
        if not scheme.weight.symmetric:  # transformers' meta-device path cannot load it (module docstring)
            cfg["quantization_config"]["dequantize"] = True
        if scheme.quantize_lm_head:
            cfg["tie_word_embeddings"] = False

    def load_snippets(self, path: str, scheme: QuantScheme) -> dict[str, str]:
        """How each runtime loads this checkpoint (model card; `path` a directory or hub id)."""
        w = scheme.weight
        hf = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=\"auto\")\n"
              f"tokenizer = AutoTokenizer.from_pretrained({path!r})")
        if not w.symmetric:
            hf += ("\n# config.json says \"dequantize\": true: transformers dequantises the weights while "
                   "loading\n# (its compressed path cannot load asymmetric pack-quantized checkpoints)")
        bits = VLLM_BITS if w.symmetric else VLLM_ASYM_BITS
        if w.bits in bits and not scheme.quantize_lm_head:
            vllm = (f"from vllm import LLM\nllm = LLM({path!r})  # compressed-tensors W{w.bits}A16, "
                    f"{'symmetric' if w.symmetric else 'asymmetric (zero points)'}")
        else:
            why = (f"int{w.bits} {'symmetric' if w.symmetric else 'asymmetric'}: vLLM's compressed-tensors "
                   f"WNA16 scheme runs {list(bits)} bits" if w.bits not in bits else
                   "a quantized lm_head: vLLM's compressed-tensors config quantizes linear layers only")
            vllm = f"# not loadable by vLLM ({why})"
        return {"transformers": hf, "vLLM": vllm}

    def layer_spec(self, qc: dict) -> tuple[int, int, bool]:
        (group,) = qc["config_groups"].values()
        w = group["weights"]
        g = w.get("group_size") if w.get("strategy") == "group" else -1
        return int(w["num_bits"]), int(g), "lm_head" not in (qc.get("ignore") or [])

    def load_layer(self, tensors: dict, name: str, linear: nn.Linear, qc: dict,
                   dtype: torch.dtype) -> PackedLinear:
        (group,) = qc["config_groups"].values()
        if group.get("input_activations") or qc.get("kv_cache_scheme"):
            raise ConfigError("quantization_config: activation / KV-cache schemes are not loaded by this "
                              "project's packed loader; use transformers' loader")
        bits, g, _ = self.layer_spec(qc)
        symmetric = bool(group["weights"]["symmetric"])
        k, n = linear.in_features, linear.out_features
        groups = k // (k if g == -1 else g)
        pl = PackedLinear(k, n, bits, g, symmetric, bias=f"{name}.bias" in tensors, scale_dtype=dtype)
        packed = expect(tensors, f"{name}.weight_packed", (n, k * bits // WORD), torch.int32)
        shape = expect(tensors, f"{name}.weight_shape", (2,))
        if shape.tolist() != [n, k]:
            raise ConfigError(f"checkpoint tensor '{name}.weight_shape' is {shape.tolist()}; expected {[n, k]}")
        # ct's signed codes + 2^(b-1) are exactly the unsigned codes its packer stores
        pl.qweight.copy_(pack(unpack(packed, bits, dim=1).t(), bits, dim=0))
        pl.scales.copy_(expect(tensors, f"{name}.weight_scale", (n, groups)).t().to(dtype))
        if not symmetric:
            zp = expect(tensors, f"{name}.weight_zero_point", (n * bits // WORD, groups), torch.int32)
            pl.qzeros.copy_(pack(unpack(zp, bits, dim=0).t(), bits, dim=1))
        if pl.bias is not None:
            pl.bias.copy_(expect(tensors, f"{name}.bias", (n,)).to(dtype))
        return pl

    def layer_keys(self, name: str) -> tuple[str, ...]:
        return tuple(f"{name}.{t}" for t in ("weight_packed", "weight_scale", "weight_shape",
                                             "weight_zero_point", "bias"))
