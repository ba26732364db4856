"""Tiny random models of every supported family, built from transformers' own config classes
(no download): the sizes are the tests' (hidden 64, 2 layers, vocab 320) and each family
keeps what makes it itself (GQA, llama3 RoPE scaling and tied embeddings for Llama 3.x,
q/k/v biases for Qwen2.5, q/k norms for Qwen3, 1 + w norms, post norms, soft-caps and a
sliding window shorter than the test sequences for Gemma, fused projections without GQA
for Phi-3 so that AWQ's v -> o fold runs on the v rows of qkv_proj, 4 experts top-2 for
the MoE families)."""

from __future__ import annotations

import torch

VOCAB = 320
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# family (the architecture mapping's name) -> (transformers config class, sizes over BASE)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, tie_word_embeddings=False)),
}
MOE = ("mixtral", "qwen3_moe")


def config(family: str, **overrides):
    import transformers

    cls, sizes = FAMILIES[family]
    return getattr(transformers, cls)(**{**BASE, **sizes, **overrides})


@torch.no_grad()
def make_tiny(family: str, seed: int = 0, **overrides):
    """A random model of `family` in fp32, eval mode, with non-trivial norm scales and biases
    (so that folding them matters) and sharp q/k (so that a wrong RoPE layout shows)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, **overrides), dtype=torch.float32)
    one_plus = family.startswith("gemma")
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(-0.4, 0.4) if one_plus else p.uniform_(0.6, 1.4)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.3)
        elif any(k in name for k in ("q_proj", "k_proj", "qkv_proj")):
            p.mul_(3.0)
    return model.eval()


def ids(n: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (n, seq), generator=torch.Generator().manual_seed(seed))
