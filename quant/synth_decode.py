"""Batched incremental decoding with a preallocated KV cache, for synthesis.

Why not `model.generate` or the model's own forward with a cache object: in
data-free synthesis every sequence starts from a single token and all of its
prefix is *generated*, so every row of a batch sits at the same position at
every step. That makes the decode loop padding-free and mask-free: one query
per row, attention over positions 0..t of its own cache, nothing else. A
transformers forward pays for generality it does not need here (mask
construction, cache objects that concatenate, per-call bookkeeping), which at
batch 1 leaves the GPU idle and at large batch still costs a copy of the cache
per step. This module runs the model's *own submodules* (embedding, norms,
q/k/v/o projections, MLP, rotary embedding, LM head), found through the
architecture mapping in `quant.arch`, and only re-does the attention core: the
rows write their new key/value into a buffer sized once for the whole sequence
and attend over a view of it. Any Llama-like family in `quant.arch.MAPPINGS`
works, as do models whose linears were swapped for `QuantLinear`.

Decoding is memory-bound: each step reads every weight once and the whole KV
cache once, so the batch is as large as memory allows and the cache is never
copied (except when finished rows are dropped, see `keep`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from quant.arch import ArchMapping, decoder_layers, get_module, mapping_for


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Block:
    """The submodules of one decoder block, looked up once through the mapping."""

    def __init__(self, block: nn.Module, m: ArchMapping, head_dim: int) -> None:
        self.input_norm = get_module(block, m.input_norm)
        self.post_norm = get_module(block, m.post_attention_norm)
        self.q = get_module(block, m.q_proj)
        self.k = get_module(block, m.k_proj)
        self.v = get_module(block, m.v_proj)
        self.o = get_module(block, m.o_proj)
        self.mlp = get_module(block, m.mlp)
        self.scale = getattr(get_module(block, m.attention), "scaling", head_dim**-0.5)


class KVDecoder:
    """One decode step for a batch of rows that all sit at the same position.

    Lifecycle: construct (allocates the cache for `batch` rows and `max_len`
    positions), then `step(tokens)` once per position, `keep(rows)` to drop
    finished rows. `position` is the number of positions already in the cache.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int) -> None:
        m = mapping_for(model)
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.embed = get_module(model, m.embed_tokens)
        self.final_norm = get_module(model, m.final_norm)
        self.lm_head = get_module(model, m.lm_head)
        self.blocks = [_Block(b, m, self.head_dim) for b in decoder_layers(model, m)]
        weight = self.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_len = max_len
        self.batch = batch
        self.position = 0
        # cos/sin for every position at once, from the model's own rotary module
        # (so scaled RoPE variants come for free): [max_len, head_dim]
        rotary = get_module(model, m.rotary_emb)
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = rotary(torch.empty(1, dtype=self.dtype, device=self.device), positions)
        self.cos, self.sin = cos[0], sin[0]
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        self.values = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        self._gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B] ids at `position` -> logits [B, V] (float32) for `position + 1`."""
        t = self.position
        if t >= self.max_len:
            raise RuntimeError(f"KV cache is full ({self.max_len} positions)")
        b, h, kv, d = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        if b != self.batch:
            raise RuntimeError(f"{b} tokens for a cache of {self.batch} rows")
        cos, sin = self.cos[t], self.sin[t]  # [D]
        x = self.embed(tokens)  # x: [B, hidden]
        for blk, kcache, vcache in zip(self.blocks, self.keys, self.values, strict=True):
            hs = blk.input_norm(x)
            q = blk.q(hs).view(b, h, 1, d)  # one query per row: [B, H, 1, D]
            k = blk.k(hs).view(b, kv, 1, d)
            q = q * cos + _rotate_half(q) * sin
            kcache[:, :, t : t + 1] = k * cos + _rotate_half(k) * sin
            vcache[:, :, t : t + 1] = blk.v(hs).view(b, kv, 1, d)
            a = F.scaled_dot_product_attention(
                q, kcache[:, :, : t + 1], vcache[:, :, : t + 1], scale=blk.scale, **self._gqa
            )  # a: [B, H, 1, D]
            x = x + blk.o(a.reshape(b, h * d))
            x = x + blk.mlp(blk.post_norm(x))
        self.position = t + 1
        return self.lm_head(self.final_norm(x)).float()  # [B, V]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only cache rows `rows` (indices into the current batch), in that order."""
        t = self.position
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                new = torch.empty((rows.numel(), *old.shape[1:]), dtype=old.dtype, device=old.device)
                new[:, :, :t] = old[rows, :, :t]
                cache[i] = new
        self.batch = rows.numel()
