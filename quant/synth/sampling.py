"""Data-free training text (LLM-QAT): the full-precision model writes its own data.

The scheme, as published: every sequence starts from one vocabulary token; its
first tokens are chosen greedily up to a total prefix length p (one sequence per
p in {3, 4, 5}, start token included), the rest is sampled from the softmax up
to `seq_len` tokens. The reference code does this one sequence at a time with
two `generate` calls; here many sequences decode together (`KVDecoder`).

Design notes
- Start tokens are partitioned round-robin over shards (sorted ids, shard k
  takes ids[k::N]), so every shard covers the whole vocabulary range and shards
  are balanced. A shard's work list is (start id, prefix length) in that order.
- No grouping by prefix length is needed: the prefix is *generated*, so every
  row of a batch sits at the same position at every step (padding-free). Each
  step computes both the argmax and a sample and each row takes the one its
  prefix length asks for.
- Randomness is per sequence and stateless: the uniform that draws token t of a
  sequence is a hash of (seed, start id, prefix length, t) (splitmix64, exact
  integer arithmetic in numpy), and the token is the inverse CDF of the
  (temperature / top-k / top-p filtered) softmax at that uniform. So a sequence
  does not depend on which other rows share its batch, on the shard count, or
  on where a killed run resumed - only on the model's logits, which are exact
  up to floating-point rounding of batched kernels. The shard index is
  deliberately not part of the key: re-sharding the same start ids does not
  change what is sampled.
- EOS policy (`on_eos`): `stop` (the reference's behaviour - HF `generate`
  ends a sequence at EOS; the sequence keeps its EOS token and is shorter than
  `seq_len`) or `continue` (EOS is an ordinary token; every sequence has
  exactly `seq_len` tokens). EOS is checked only on generated tokens. With
  `stop`, finished rows are dropped from the batch every few steps once enough
  of them have finished, so a batch never spends much on finished rows.
- Sampling defaults are the reference's: it called `generate(do_sample=True)`
  with no sampling arguments, so transformers' defaults applied: temperature
  1.0, top_k 50, top_p 1.0 (LLaMA-1 checkpoints carry no generation config
  that overrides them).
- Start ids: by default the whole vocabulary minus the tokenizer's special ids
  (`tokenizer.all_special_ids`: BOS, EOS, PAD, UNK and added special tokens
  such as chat markers), passed as `exclude` to `select_start_ids`. A sequence
  that starts at EOS or PAD is not text the model would continue; the
  reference's loop ran over consecutive ids without such a filter (for LLaMA
  that is only <unk>, <s>, </s>). Explicit `start_ids` are used as given.
- The log-probability of every generated token under the model's plain softmax
  (temperature 1, no filter) is accumulated during decoding; merge turns it
  into the self-perplexity of the data without another forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch

from quant.config import Config, ConfigError
from quant.models.arch import mapping_for
from quant.synth.decode import make_decoder

EOS_CHECK_EVERY = 16  # steps between EOS checks (each one syncs with the device)
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class SynthesisConfig(Config):
    """The `synthesize` section: what to generate, how to split it, how to sample."""

    shards: tuple[int, ...] = (0, 1)  # shard indices 0..N-1; one process per shard
    start_ids: tuple[int, ...] | None = None  # explicit start ids; null = the vocabulary
    num_start_ids: int | None = None  # null = every non-special id; else evenly spaced
    prefix_lengths: tuple[int, ...] = (3, 4, 5)  # greedy tokens, start token included
    seq_len: int = 2048
    temperature: float = 1.0
    top_k: int = 50  # 0 = off; 50 = transformers' generate default, what the reference sampled with
    top_p: float = 1.0  # 1.0 = off
    on_eos: Literal["stop", "continue"] = "stop"
    batch_size: int = 64  # sequences decoded together (bounded by KV-cache memory)
    cuda_graphs: bool = True  # GPU: run the decode step as CUDA graphs (no effect on CPU)

    def __post_init__(self) -> None:
        n = len(self.shards)
        if n == 0 or list(self.shards) != list(range(n)):
            raise ConfigError(
                f"shards={list(self.shards)} is not accepted; list the shard indices 0..N-1 "
                "with N >= 1, e.g. [0, 1, 2, 3]"
            )
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} must be >= 2")
        ps = list(self.prefix_lengths)
        if not ps or len(set(ps)) != len(ps) or any(not 1 <= p <= self.seq_len for p in ps):
            raise ConfigError(
                f"prefix_lengths={ps} is not accepted; use distinct lengths in 1..seq_len "
                f"({self.seq_len}), e.g. [3, 4, 5]"
            )
        if self.start_ids is not None:
            ids = list(self.start_ids)
            if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
                raise ConfigError(f"start_ids must be distinct non-negative vocabulary ids, got {ids[:10]}")
            if self.num_start_ids is not None:
                raise ConfigError("set one of start_ids and num_start_ids, not both")
            if len(ids) < n:
                raise ConfigError(f"start_ids has {len(ids)} ids for {n} shards; each shard needs one")
        if self.num_start_ids is not None and self.num_start_ids < n:
            raise ConfigError(f"num_start_ids={self.num_start_ids} must be >= the number of shards ({n})")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")

    @property
    def num_shards(self) -> int:
        return len(self.shards)


@dataclass(frozen=True)
class Item:
    """One sequence to generate: its index within the shard, start id and prefix length."""

    index: int
    start_id: int
    prefix_len: int


@dataclass(frozen=True)
class Generated:
    item: Item
    ids: list[int]  # start token included; ends with EOS when finish == "eos"
    finish: Literal["eos", "length"]
    logprob: float  # sum of log p(token) of ids[1:] under the model's plain softmax


# ---------------------------------------------------------------------------
# Checks against the model, start ids, shards


def check_model(cfg: SynthesisConfig, model_config: Any, path: str = "synthesize") -> None:
    """Raise a ConfigError naming the field if the model cannot run this config."""
    mapping_for(SimpleNamespace(config=model_config))  # reads only config.model_type
    ctx = getattr(model_config, "max_position_embeddings", None)
    if ctx is not None and cfg.seq_len > ctx:
        raise ConfigError(
            f"{path}.seq_len={cfg.seq_len} exceeds the model's context "
            f"(max_position_embeddings={ctx}); use at most {ctx}"
        )
    window = getattr(model_config, "sliding_window", None)
    if window and getattr(model_config, "use_sliding_window", True) and cfg.seq_len > window:
        raise ConfigError(
            f"{path}.seq_len={cfg.seq_len} exceeds the model's sliding attention window "
            f"({window}), which this decoder does not implement; use at most {window}"
        )


def select_start_ids(
    cfg: SynthesisConfig, vocab_size: int, exclude: Iterable[int] = (), path: str = "synthesize"
) -> list[int]:
    """All start ids of the run (every shard), sorted."""
    if cfg.start_ids is not None:
        bad = sorted(i for i in cfg.start_ids if not 0 <= i < vocab_size)
        if bad:
            raise ConfigError(
                f"{path}.start_ids: {bad[:10]} lie outside the vocabulary; ids must be in "
                f"[0, {vocab_size})"
            )
        return sorted(cfg.start_ids)
    skip = set(exclude)
    candidates = [i for i in range(vocab_size) if i not in skip]
    n = len(candidates) if cfg.num_start_ids is None else cfg.num_start_ids
    if n > len(candidates):
        raise ConfigError(
            f"{path}.num_start_ids={n} exceeds the {len(candidates)} usable vocabulary ids "
            f"(vocabulary of {vocab_size} minus {len(skip)} special ids); use at most {len(candidates)}"
        )
    if n < cfg.num_shards:
        raise ConfigError(f"{path}.shards: {cfg.num_shards} shards but only {n} start ids")
    return [candidates[(i * len(candidates)) // n] for i in range(n)]


def shard_items(cfg: SynthesisConfig, shard: int, start_ids: Sequence[int], path: str = "synthesize") -> list[Item]:
    """The work list of one shard: its start ids (round-robin) x the prefix lengths."""
    if shard not in cfg.shards:
        raise ConfigError(f"shard {shard} is not in {path}.shards={list(cfg.shards)}")
    mine = list(start_ids)[shard :: cfg.num_shards]
    pairs = [(s, p) for s in mine for p in sorted(cfg.prefix_lengths)]
    return [Item(i, s, p) for i, (s, p) in enumerate(pairs)]


def batches(items: Sequence[Item], batch_size: int) -> Iterator[list[Item]]:
    """Fixed batch boundaries (a function of the config only, so a resumed shard
    rebuilds exactly the batches an uninterrupted one would)."""
    for i in range(0, len(items), batch_size):
        yield list(items[i : i + batch_size])


# ---------------------------------------------------------------------------
# Per-sequence randomness and sampling


def mix64(z: int) -> int:
    """splitmix64 finaliser on Python ints (the reference for `mix64_np`)."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix64_np(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps modulo 2^64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sequence_key(seed: int, start_id: int, prefix_len: int) -> int:
    """64-bit key of one sequence's random stream."""
    return mix64(mix64(mix64(seed & _M64) ^ start_id) ^ prefix_len)


def uniforms(keys: Sequence[int], steps: int) -> np.ndarray:
    """[len(keys), steps] float64 uniforms in [0, 1): u[i, t] draws token t + 1 of sequence i."""
    k = mix64_np(np.asarray(keys, dtype=np.uint64))[:, None]
    t = np.arange(steps, dtype=np.uint64)[None, :]
    bits = mix64_np(k ^ t)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_next(
    logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Inverse-CDF sampling. logits: [B, V] float, u: [B] float64 in [0, 1) -> [B] ids.

    Exact sampling from softmax(logits / temperature) restricted to the top-k ids
    and to the smallest set of most likely ids whose mass reaches top_p."""
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely ids
        sorted_logits = sorted_logits.masked_fill(before >= top_p, -math.inf)
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    cdf = torch.softmax(logits, dim=-1, dtype=torch.float64).cumsum(-1)  # [B, V]
    x = (u.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


# ---------------------------------------------------------------------------
# Generation


class _BatchState:
    """Device state of one batch's rows. Called as the decoder's head at the end of
    every step (inside the CUDA graph on GPU): picks each row's next token - argmax
    inside its prefix, inverse-CDF draw after - and records it with its log-prob."""

    def __init__(self, items: Sequence[Item], cfg: SynthesisConfig, seed: int, device: torch.device) -> None:
        b, n = len(items), cfg.seq_len
        self.cfg = cfg
        keys = [sequence_key(seed, it.start_id, it.prefix_len) for it in items]
        self.u = torch.from_numpy(uniforms(keys, n - 1)).to(device)  # u: [R, n-1]
        prefix = torch.tensor([it.prefix_len for it in items], device=device)
        self.greedy = torch.arange(1, n, device=device)[None, :] < prefix[:, None]  # [R, n-1]: token t+1 greedy?
        self.tokens = torch.full((b, n), -1, dtype=torch.long, device=device)
        self.tokens[:, 0] = torch.tensor([it.start_id for it in items], device=device)
        self.logp = torch.zeros((b, n - 1), dtype=torch.float32, device=device)
        self.rows = torch.arange(b, device=device)  # original row of each current row
        self.out_tokens = torch.full((b, n), -1, dtype=torch.long)  # finished rows, on the host
        self.out_logp = torch.zeros((b, n - 1), dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        u = self.u.index_select(1, pos).squeeze(1)
        greedy = self.greedy.index_select(1, pos).squeeze(1)
        nxt = torch.where(greedy, logits.argmax(-1), sample_next(logits, u, cfg.temperature, cfg.top_k, cfg.top_p))
        self.tokens.index_copy_(1, pos + 1, nxt[:, None])
        self.logp.index_copy_(1, pos, logits.log_softmax(-1).gather(-1, nxt[:, None]))
        return nxt

    def finished(self, upto: int, eos: torch.Tensor) -> torch.Tensor:
        """[R] bool: the row generated an EOS at positions 1..upto."""
        return torch.isin(self.tokens[:, 1 : upto + 1], eos).any(-1)

    def keep(self, keep: torch.Tensor, drop: torch.Tensor) -> None:
        self._park(drop)
        for name in ("u", "greedy", "tokens", "logp", "rows"):
            setattr(self, name, getattr(self, name)[keep])

    def _park(self, rows: torch.Tensor) -> None:
        orig = self.rows[rows].cpu()
        self.out_tokens[orig] = self.tokens[rows].cpu()
        self.out_logp[orig] = self.logp[rows].cpu()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._park(torch.arange(self.rows.numel(), device=self.rows.device))
        return self.out_tokens, self.out_logp


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    items: Sequence[Item],
    cfg: SynthesisConfig,
    seed: int,
    eos_ids: Sequence[int] = (),
    on_step: Callable[[int], None] | None = None,
) -> list[Generated]:
    """Generate one batch: every item decodes together, from its start token to seq_len.
    `on_step(t)` is called after decode step t (progress reporting)."""
    device = next(model.parameters()).device
    n = cfg.seq_len
    state = _BatchState(items, cfg, seed, device)
    decoder = make_decoder(model, len(items), n - 1, head=state, graphs=cfg.cuda_graphs)
    decoder.inp.copy_(state.tokens[:, 0])
    stop = cfg.on_eos == "stop" and len(eos_ids) > 0
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    for t in range(n - 1):
        decoder.step()  # writes token t + 1 of every row
        if on_step is not None:
            on_step(t)
        if stop and (t + 1) % EOS_CHECK_EVERY == 0 and t + 2 < n:
            done = state.finished(t + 1, eos)
            n_done = int(done.sum())
            if n_done and n_done >= done.numel() // 8:
                keep = (~done).nonzero().squeeze(-1)
                state.keep(keep, done.nonzero().squeeze(-1))
                if keep.numel() == 0:
                    break
                decoder.keep(keep)
    tokens, logp = state.result()
    return _collect(items, tokens, logp, eos_ids if stop else ())


def _collect(items: Sequence[Item], tokens: torch.Tensor, logp: torch.Tensor, eos_ids: Sequence[int]) -> list[Generated]:
    eos = set(eos_ids)
    out = []
    for row, it in enumerate(items):
        ids = tokens[row].tolist()
        end = next((j + 1 for j in range(1, len(ids)) if ids[j] in eos), None)
        finish = "length" if end is None else "eos"
        ids = ids[:end]
        assert min(ids) >= 0, "a kept token was never written"
        out.append(Generated(it, ids, finish, math.fsum(logp[row, : len(ids) - 1].tolist())))
    return out
