"""Batched incremental decoding with a preallocated KV cache, for synthesis.

Why not `model.generate` or the model's own forward with a cache object: in
data-free synthesis every sequence starts from a single token and all of its
prefix is *generated*, so every row of a batch sits at the same position at
every step. That makes the decode loop padding-free and mask-free: one query
per row, attention over positions 0..t of its own cache, nothing else. This
module runs the model's *own submodules* (embedding, norms, q/k/v/o
projections, MLP, rotary embedding, LM head), found through the architecture
mapping in `quant.models.arch`, and only re-does the attention core: each row writes
its new key/value into a buffer sized once for the whole sequence and attends
over a view of it. Any Llama-like family in `quant.models.arch.MAPPINGS` works, as do
models whose linears were swapped for `QuantLinear`.

Families: the q/k norms of Qwen3 (per head, before RoPE) and MoE MLPs (Mixtral,
Qwen3-MoE: the MoE block is called on [B, 1, D]) run here as they do in the model.
What this decoder does not re-implement - norms on sub-block outputs, embedding scale,
soft-capped attention and logits (Gemma 2/3), fused q/k/v and partial rotary (Phi-3) -
is said by the architecture mapping and config; for those, `make_decoder` returns a
`ModelDecoder`, which steps the model's own forward with transformers' cache (every row
at the same position, so no mask): the same tokens, without the CUDA-graph speed.

Speed. A decode step reads every weight once and the KV cache once; at the
batch sizes that fill a GPU's memory it is bound by HBM bandwidth, *if* the
host keeps up. It does not on its own: a 32-layer step is ~1300 small kernel
launches (and cuDNN's attention re-plans for every new length). So on CUDA a
step runs as 33 CUDA graphs - embedding + layer 0 up to attention, then for
each layer "rest of this layer + next layer up to attention", the last one
ending in the LM head and the caller's `head` (sampling) - with the attention
itself launched eagerly in between (its length grows every step, everything
else has fixed shapes and reads the position from a device tensor). Graphs are
captured on the second step of a batch (the first, eager, warms up) and again
after rows are dropped. The same segment functions run eagerly on the CPU, so
the CPU tests exercise the exact code the graphs capture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from quant.models.arch import ArchMapping, decoder_layers, get_module, mapping_for

# cuDNN attention builds an execution plan per sequence length: ~2 ms of host
# time per call when the length changes every step. Flash / efficient do not.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

Head = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [B, V], pos [1]) -> next ids [B]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def fast_path(model: nn.Module) -> bool:
    """Whether `KVDecoder` re-implements this model's forward (module docstring)."""
    m, cfg = mapping_for(model), model.config
    rope = getattr(cfg, "partial_rotary_factor", 1.0) or 1.0
    return not (m.fused or m.output_norms or m.embed_scale or m.logit_softcap or rope != 1.0
                or getattr(cfg, "attn_logit_softcapping", None))


def make_decoder(model: nn.Module, batch: int, max_len: int, head: Head, graphs: bool = False):
    """The fastest decoder that computes this model's function exactly."""
    cls = KVDecoder if fast_path(model) else ModelDecoder
    return cls(model, batch, max_len, head, graphs)


class ModelDecoder:
    """`KVDecoder`'s interface over the model's own forward and a transformers cache."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, head: Head, graphs: bool = False) -> None:
        from transformers import DynamicCache

        self.model, self.head, self.max_len = model, head, max_len
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        self.position = 0
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.inp = torch.zeros(batch, dtype=torch.long, device=self.device)

    def step(self) -> None:
        t = self.position
        if t >= self.max_len:
            raise RuntimeError(f"KV cache is full ({self.max_len} positions)")
        b = self.inp.shape[0]
        out = self.model(input_ids=self.inp[:, None], past_key_values=self.cache, use_cache=True,
                         position_ids=self.pos.expand(b, 1))
        self.inp.copy_(self.head(out.logits[:, -1].float(), self.pos))  # logits: [B, V]
        self.pos.add_(1)
        self.position = t + 1

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.reorder_cache(rows)
        self.inp = self.inp[rows].clone()


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
        self.moe = m.is_moe_block(block)  # the MoE block takes [B, S, D]
        self.q_norm, self.k_norm = (get_module(block, p) for p in m.qk_norms) if m.qk_norms else (None, None)
        self.scale = getattr(get_module(block, m.attention), "scaling", head_dim**-0.5)


class KVDecoder:
    """Decode steps for a batch of rows that all sit at the same position.

    Lifecycle: construct with the batch size, cache length and a `head` (called on
    the logits at the end of every step; returns the next token of every row), put
    the first tokens into `inp`, then `step()` once per position; `keep(rows)` drops
    rows. `position` (host) and `pos` (device) count the positions in the cache.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, head: Head, graphs: bool = False) -> None:
        m = mapping_for(model)
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.embed = get_module(model, m.embed_tokens)
        self.final_norm = get_module(model, m.final_norm)
        self.lm_head = get_module(model, m.lm_head)
        self.blocks = [_Block(b, m, self.head_dim) for b in decoder_layers(model, m)]
        self.head = head
        weight = self.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.graphs = graphs and self.device.type == "cuda"
        self.max_len = max_len
        self.position = 0
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        # cos/sin for every position at once, from the model's own rotary module
        # (scaled RoPE variants come for free): [max_len, head_dim]
        rotary = get_module(model, m.rotary_emb)
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = rotary(torch.empty(1, dtype=self.dtype, device=self.device), positions)
        self.cos, self.sin = cos[0], sin[0]
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        self.values = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        self._gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        self._buffers(batch)

    def _buffers(self, batch: int) -> None:
        """Static inputs/outputs of the segments (fixed addresses for the graphs)."""
        self.batch = batch
        self.inp = torch.zeros(batch, dtype=torch.long, device=self.device)  # ids at `pos`
        self.x = torch.empty(batch, self.embed.weight.shape[1], dtype=self.dtype, device=self.device)
        self.q = torch.empty(batch, self.heads, 1, self.head_dim, dtype=self.dtype, device=self.device)
        self.a = torch.empty_like(self.q)
        self._graphs: list[torch.cuda.CUDAGraph] | None = None
        self._warm = False

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -- segments: j = 0 .. L; attention of layer j runs after segment j (j < L)

    def _pre_attention(self, i: int) -> None:
        """Layer i up to attention: its query into `q`, its key/value into the cache at `pos`."""
        blk, b, d = self.blocks[i], self.batch, self.head_dim
        hs = blk.input_norm(self.x)
        cos, sin = self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)  # [1, D]
        q = blk.q(hs).view(b, self.heads, 1, d)  # one query per row: [B, H, 1, D]
        k = blk.k(hs).view(b, self.kv_heads, 1, d)
        if blk.q_norm is not None:  # per head, before RoPE (Qwen3)
            q, k = blk.q_norm(q), blk.k_norm(k)
        self.q.copy_(q * cos + _rotate_half(q) * sin)
        self.keys[i].index_copy_(2, self.pos, k * cos + _rotate_half(k) * sin)
        self.values[i].index_copy_(2, self.pos, blk.v(hs).view(b, self.kv_heads, 1, d))

    def _post_attention(self, i: int) -> None:
        blk = self.blocks[i]
        self.x.add_(blk.o(self.a.view(self.batch, self.heads * self.head_dim)))
        h = blk.post_norm(self.x)
        self.x.add_(blk.mlp(h[:, None])[:, 0] if blk.moe else blk.mlp(h))

    def _segment(self, j: int) -> None:
        if j == 0:
            self.x.copy_(self.embed(self.inp))  # x: [B, hidden]
        else:
            self._post_attention(j - 1)
        if j < len(self.blocks):
            self._pre_attention(j)
        else:
            logits = self.lm_head(self.final_norm(self.x)).float()  # [B, V]
            self.inp.copy_(self.head(logits, self.pos))

    def _attend(self, i: int, t: int) -> None:
        k, v = self.keys[i][:, :, : t + 1], self.values[i][:, :, : t + 1]
        self.a.copy_(F.scaled_dot_product_attention(self.q, k, v, scale=self.blocks[i].scale, **self._gqa))

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for j in range(len(self.blocks) + 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._segment(j)
            graphs.append(g)
        self._graphs = graphs

    def step(self) -> None:
        """Advance every row by one position (the head writes the next ids into `inp`)."""
        t = self.position
        if t >= self.max_len:
            raise RuntimeError(f"KV cache is full ({self.max_len} positions)")
        if self.graphs and self._warm and self._graphs is None:
            self._capture()
        with sdpa_kernel(_BACKENDS):
            for j in range(len(self.blocks) + 1):
                if self._graphs:
                    self._graphs[j].replay()
                else:
                    self._segment(j)
                if j < len(self.blocks):
                    self._attend(j, t)
        self.pos.add_(1)
        self.position = t + 1
        self._warm = True

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only rows `rows` (indices into the current batch), in that order."""
        t = self.position
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                new = torch.empty((rows.numel(), *old.shape[1:]), dtype=old.dtype, device=old.device)
                new[:, :, :t] = old[rows, :, :t]
                cache[i] = new
        inp = self.inp[rows]
        self._buffers(rows.numel())
        self.inp.copy_(inp)
