"""What llama.cpp calls things, as data: per-family tensor names, hyperparameters, vocabulary.

A family entry maps the parts of this project's architecture mapping
(`quant.models.arch.ArchMapping` fields: `q_proj`, `input_norm`, ...) to llama.cpp's
tensor kinds (`gguf.MODEL_TENSOR`), whose names (`blk.N.attn_q`, `token_embd`, ...) come
from the gguf package itself, as in llama.cpp's `convert_hf_to_gguf.py`. A new family
(qwen2, qwen3, mistral, gemma, phi3) is a new `GGUFFamily`, plus whatever hyperparameter
keys its llama.cpp architecture reads.

Rotary embeddings: Hugging Face Llama checkpoints rotate the two halves of each head
(`rotate_half`), llama.cpp's `llama` architecture rotates adjacent pairs. Its converter
therefore reorders the rows of q and k per head (`permute`, below: rows
[h, 2, d/2] -> [h, d/2, 2]); families whose llama.cpp architecture uses the NeoX
rotation (qwen2, ...) leave `rope_permute` empty. The reordering moves whole output rows,
so integer codes, step sizes and zero points move with their rows and stay exact.

Vocabulary: byte-level BPE ("gpt2" in llama.cpp). llama.cpp picks its pre-tokenizer
regex by name (`tokenizer.ggml.pre`); its converter finds the name by hashing the token
ids of a fixed probe text. `PRE_TOKENIZER_HASHES` is the part of that table (copied from
llama.cpp's `convert_hf_to_gguf.py`) for the families above; a tokenizer whose only
pre-tokenizer is GPT-2's byte-level regex split gets "gpt-2" (the same regex in
llama.cpp). Any other tokenizer is refused rather than written with a guessed regex that
would silently tokenize differently.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256

import gguf
import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES

from quant.config import ConfigError
from quant.models.arch import mapping_for


@dataclass(frozen=True)
class GGUFFamily:
    arch: str  # general.architecture, llama.cpp's name
    model_types: tuple[str, ...]  # transformers config.model_type
    model_tensors: Mapping[str, MODEL_TENSOR]  # ArchMapping field (model level) -> tensor kind
    block_tensors: Mapping[str, MODEL_TENSOR]  # ArchMapping field (per block) -> tensor kind
    rope_permute: Mapping[str, str]  # block field -> config attribute holding its head count


LLAMA_MODEL_TENSORS = {
    "embed_tokens": MODEL_TENSOR.TOKEN_EMBD,
    "final_norm": MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": MODEL_TENSOR.OUTPUT,
}
LLAMA_BLOCK_TENSORS = {
    "input_norm": MODEL_TENSOR.ATTN_NORM,
    "q_proj": MODEL_TENSOR.ATTN_Q,
    "k_proj": MODEL_TENSOR.ATTN_K,
    "v_proj": MODEL_TENSOR.ATTN_V,
    "o_proj": MODEL_TENSOR.ATTN_OUT,
    "post_attention_norm": MODEL_TENSOR.FFN_NORM,
    "gate_proj": MODEL_TENSOR.FFN_GATE,
    "up_proj": MODEL_TENSOR.FFN_UP,
    "down_proj": MODEL_TENSOR.FFN_DOWN,
}

FAMILIES: tuple[GGUFFamily, ...] = (
    # SmolLM / SmolLM2, Llama-2, Llama-3.x, TinyLlama
    GGUFFamily("llama", ("llama",), LLAMA_MODEL_TENSORS, LLAMA_BLOCK_TENSORS,
               {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}),
)


def family_for(model) -> GGUFFamily:
    model_type = getattr(model.config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ConfigError(f"model_type={model_type!r} cannot be exported to 'gguf' yet; known: {known} "
                      "(add a GGUFFamily to quant/export/gguf_arch.py:FAMILIES)")


def tensor_names(model, family: GGUFFamily) -> dict[str, tuple[str, str | None]]:
    """Module path in `model` -> (llama.cpp tensor name without `.weight`, rope head-count
    attribute or None), for every module the family writes."""
    mapping = mapping_for(model)
    out = {getattr(mapping, f): (TENSOR_NAMES[t], None) for f, t in family.model_tensors.items()}
    blocks = model.get_submodule(mapping.layers)
    for i in range(len(blocks)):
        for f, t in family.block_tensors.items():
            out[f"{mapping.layers}.{i}.{getattr(mapping, f)}"] = (TENSOR_NAMES[t].format(bid=i),
                                                                 family.rope_permute.get(f))
    return out


def permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q/k tensor (weight, codes, steps, zero points, bias: anything
    with one row per output) from rotate-half to llama.cpp's adjacent-pair rotation."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# ---------------------------------------------------------------------------
# Hyperparameters


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return {**params, "rope_theta": theta}


def write_hparams(writer: gguf.GGUFWriter, config) -> list[tuple[str, torch.Tensor]]:
    """The `<arch>.*` keys llama.cpp reads for a Llama-shaped model; returns extra tensors
    (Llama 3 `rope_freqs`) to write beside the weights."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = _rope(config)
    if rope["rope_theta"] is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    kind = rope.get("rope_type") or "default"
    if kind == "default":
        return []
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
        return []
    if kind == "llama3":
        return [(TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(rope, head_dim))]
    raise ConfigError(f"rope_parameters.rope_type={kind!r} of this model is not exported to 'gguf' yet; "
                      "accepted: ['default', 'linear', 'llama3']")


def llama3_rope_factors(rope: dict, dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.x long-context RoPE (as llama.cpp's converter makes them)."""
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_generation(writer: gguf.GGUFWriter, generation_config) -> None:
    """Sampling defaults the model ships with (generation_config.json) as general.sampling.*."""
    if generation_config is None:
        return
    diff = generation_config.to_diff_dict()
    if not diff.get("do_sample"):
        return  # greedy or unset: llama.cpp's own defaults apply
    for key, add in (("top_k", writer.add_sampling_top_k), ("top_p", writer.add_sampling_top_p),
                     ("min_p", writer.add_sampling_min_p), ("temperature", writer.add_sampling_temp),
                     ("repetition_penalty", writer.add_sampling_penalty_repeat)):
        if diff.get(key) is not None:
            add(diff[key])


# ---------------------------------------------------------------------------
# Vocabulary

PROBE_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

# sha256 of str(token ids of PROBE_TEXT) -> llama.cpp pre-tokenizer (llama.cpp's table, in part)
PRE_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}
GPT2_SPLIT = {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer: {type(tokenizer).__name__} has no tokenizer.json (fast tokenizer); "
                          "'gguf' export writes byte-level BPE vocabularies from tokenizer.json")
    return json.loads(backend.to_str())


def pre_tokenizer_name(tokenizer) -> str:
    ids = tokenizer.encode(PROBE_TEXT)  # with special tokens, as the table was made
    digest = sha256(str(ids).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest]
    pre = _tokenizer_json(tokenizer).get("pre_tokenizer") or {}
    if all(pre.get(k) == v for k, v in GPT2_SPLIT.items()):
        return "gpt-2"
    raise ConfigError(
        f"tokenizer: its pre-tokenizer ({pre.get('type')}, probe hash {digest[:16]}...) is not one "
        f"llama.cpp is known to reproduce; accepted: {sorted(set(PRE_TOKENIZER_HASHES.values()))} "
        "(by hash) or a plain byte-level GPT-2 split. Add its hash from llama.cpp's "
        "convert_hf_to_gguf.py to quant/export/gguf_arch.py:PRE_TOKENIZER_HASHES")


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def write_vocab(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Tokens, token types, merges, special ids, add_bos/add_eos and chat template."""
    if tokenizer is None:
        raise ConfigError("tokenizer: none was found beside the model; 'gguf' export needs the "
                          "tokenizer (tokenizer.json) saved with the model")
    model = _tokenizer_json(tokenizer)["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"tokenizer: model type {model.get('type')!r} cannot be exported to 'gguf' yet; "
                          "accepted: byte-level BPE (tokenizer.json model type 'BPE')")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"tokenizer: token id {max(vocab.values())} >= the model's vocab_size={vocab_size}")
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # as llama.cpp's converter: padding rows UNUSED, added tokens CONTROL
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            special = added[tok].special or _looks_special(tok)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # gguf reads merges / special ids / template from files
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    # what the tokenizer really does, not what its config files claim
    probe = tokenizer("a")["input_ids"]
    special.add_special_token = {"bos": tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
                                 "eos": tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id}
    special.add_to_gguf(writer, quiet=True)
