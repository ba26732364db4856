"""Merge synthesized shards into one tokenized dataset that training reads directly.

Output format (what Block-AP / E2E / KD stages read from artifacts/merge/):

- `train.safetensors`, `val.safetensors`: one tensor `input_ids`, int32,
  shape [rows, seq_len] (load with `safetensors.torch.load_file(p)["input_ids"]
  .long()`). Rows are fixed-length windows of the packed token stream; no
  padding, no masks. The safetensors metadata key `dataset` holds JSON:
  `seq_len`, `rows`, `vocab_size`, `eos_ids`, `source` (hash of the shard
  manifests).
- `manifest.json`: params, statistics, the start ids held out for validation
  and the shards' run key.
- `samples.txt`: the text of the first few sequences of shard 0, for reading.

Decisions
- Canonical order: sequences sorted by (start id, prefix length), which does
  not depend on how many shards produced them.
- De-duplication (optional) drops exact repeats of a token sequence, keeping the
  first in canonical order.
- Split by start id: all prefix variants of one start token share their greedy
  prefix, so they go to the same split; `val_fraction` of the start ids (at
  least one when > 0) chosen by a seeded hash, not a library RNG whose stream
  could change between versions.
- Packing: the (optionally shuffled, by the same seeded hash) sequences are
  concatenated and cut into rows of `seq_len`; the remainder shorter than a row
  is dropped and counted. No separator is added: a sequence that stopped at EOS
  already ends with it, and a sequence that ran to the synthesis length fills
  its row exactly when the row length equals it (the default), so then every
  row is one whole sequence.
- Statistics: sequences, duplicates, tokens, EOS stops, distinct-n (distinct
  n-grams over all n-grams inside sequences, n = 1..4, 64-bit n-gram hashes),
  and self-perplexity from the log-probabilities recorded while generating
  (mean of per-sequence perplexities, and corpus-level): no second forward pass.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from quant.config import Config, ConfigError
from quant.synth.sampling import mix64, mix64_np
from quant.synth.store import MANIFEST, read_manifest, read_published

DISTINCT_N = (1, 2, 3, 4)


@dataclass(frozen=True)
class MergeConfig(Config):
    """The `merge` section."""

    seq_len: int | None = None  # row length of the packed tensors; null = synthesize.seq_len
    val_fraction: float = 0.05  # fraction of start ids held out for validation
    dedup: bool = True  # drop exact duplicate token sequences
    shuffle: bool = True  # seeded shuffle of sequences before packing
    samples: int = 5  # texts written to samples.txt

    def __post_init__(self) -> None:
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} must be >= 2 or null")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.samples < 0:
            raise ConfigError(f"samples={self.samples} must be >= 0")


@dataclass(frozen=True)
class Seq:
    start_id: int
    prefix_len: int
    ids: np.ndarray  # int32 token ids
    finish: str
    logprob: float


# ---------------------------------------------------------------------------
# Reading shards


def load_shards(
    shard_dirs: Sequence[Path], path: str = "merge", texts: int = 0
) -> tuple[list[Seq], dict[str, Any], list[str]]:
    """All sequences of the shards in canonical order, the shared run key (without the
    shard), and the text of the first `texts` records (shard 0 first)."""
    runs, seqs, first_texts = [], [], []
    for k, d in enumerate(shard_dirs):
        m = read_manifest(d)
        if not m or not m.get("complete"):
            raise ConfigError(f"{path}: {d} is not a finished shard; run `dvc repro synthesize@{k}` first")
        if m["shard"] != k or m["num_shards"] != len(shard_dirs):
            raise ConfigError(
                f"{path}: {d} holds shard {m['shard']} of {m['num_shards']}, expected {k} of "
                f"{len(shard_dirs)}; re-run synthesize"
            )
        runs.append({key: v for key, v in m["run"].items() if key != "shard"})
        n = 0
        for r in read_published(d):  # strict: whole lines, records checksum
            ids = np.asarray(r["ids"], dtype=np.int32)
            seqs.append(Seq(r["start_id"], r["prefix_len"], ids, r["finish"], r["logprob"]))
            if len(first_texts) < texts:
                first_texts.append(f"--- start {r['start_id']}, prefix {r['prefix_len']}, {r['finish']}\n{r['text']}")
            n += 1
        if n != m["sequences"]:
            raise ConfigError(f"{path}: {d} has {n} records, its manifest says {m['sequences']}")
    if any(r != runs[0] for r in runs[1:]):
        raise ConfigError(f"{path}: the shards come from different runs (params, model or code); re-run synthesize")
    seqs.sort(key=lambda s: (s.start_id, s.prefix_len))
    keys = [(s.start_id, s.prefix_len) for s in seqs]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{path}: a (start id, prefix length) appears in two shards; re-run synthesize")
    return seqs, runs[0], first_texts


def source_hash(shard_dirs: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for d in shard_dirs:
        h.update((Path(d) / MANIFEST).read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Dedup, split, pack


def dedup(seqs: list[Seq]) -> list[Seq]:
    seen: set[bytes] = set()
    out = []
    for s in seqs:
        key = s.ids.tobytes()
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _rank(seed: int, *parts: int) -> int:
    h = mix64(seed & ((1 << 64) - 1))
    for p in parts:
        h = mix64(h ^ p)
    return h


def split(seqs: list[Seq], val_fraction: float, seed: int) -> tuple[list[Seq], list[Seq]]:
    """(train, val), splitting by start id; both keep canonical order."""
    starts = sorted({s.start_id for s in seqs})
    n_val = 0
    if val_fraction > 0 and len(starts) > 1:
        n_val = min(len(starts) - 1, max(1, round(val_fraction * len(starts))))
    val_starts = set(sorted(starts, key=lambda s: _rank(seed, 1, s))[:n_val])
    return [s for s in seqs if s.start_id not in val_starts], [s for s in seqs if s.start_id in val_starts]


def shuffled(seqs: list[Seq], seed: int) -> list[Seq]:
    return sorted(seqs, key=lambda s: _rank(seed, 2, s.start_id, s.prefix_len))


def pack(seqs: Sequence[Seq], seq_len: int) -> tuple[torch.Tensor, int]:
    """Concatenate and cut into rows: ([rows, seq_len] int32, tokens dropped)."""
    stream = np.concatenate([s.ids for s in seqs]) if seqs else np.zeros(0, dtype=np.int32)
    rows = stream.size // seq_len
    packed = torch.from_numpy(stream[: rows * seq_len].copy()).view(rows, seq_len)
    return packed.contiguous(), int(stream.size - rows * seq_len)


# ---------------------------------------------------------------------------
# Statistics


def distinct_n(seqs: Sequence[Seq], n: int) -> float:
    """Distinct n-grams / all n-grams, n-grams taken inside each sequence."""
    codes = []
    for s in seqs:
        ids = s.ids.astype(np.uint64)
        if ids.size < n:
            continue
        h = np.zeros(ids.size - n + 1, dtype=np.uint64)
        for j in range(n):
            h = mix64_np(h ^ ids[j : ids.size - n + 1 + j])
        codes.append(h)
    if not codes:
        return 0.0
    allc = np.concatenate(codes)
    return float(np.unique(allc).size / allc.size)


def statistics(all_seqs: Sequence[Seq], kept: Sequence[Seq]) -> dict[str, Any]:
    lengths = [int(s.ids.size) for s in kept]
    predicted = [n - 1 for n in lengths]
    ppl = [math.exp(-s.logprob / p) for s, p in zip(kept, predicted, strict=True)]
    return {
        "sequences": len(all_seqs),
        "duplicates": len(all_seqs) - len(kept),
        "tokens": sum(lengths),
        "mean_length": sum(lengths) / max(len(kept), 1),
        "eos_fraction": sum(s.finish == "eos" for s in kept) / max(len(kept), 1),
        "distinct": {str(n): distinct_n(kept, n) for n in DISTINCT_N},
        "self_ppl": {
            "mean": sum(ppl) / max(len(ppl), 1),
            "corpus": math.exp(-math.fsum(s.logprob for s in kept) / max(sum(predicted), 1)),
        },
    }


# ---------------------------------------------------------------------------
# The whole merge


def merge(shard_dirs: Sequence[Path], cfg: MergeConfig, seed: int, tmp_out: Path, path: str = "merge") -> dict[str, Any]:
    """Write train/val tensors, manifest and samples into `tmp_out`; returns the statistics."""
    seqs, run, texts = load_shards(shard_dirs, path, cfg.samples)
    kept = dedup(seqs) if cfg.dedup else seqs
    seq_len = cfg.seq_len or run["params"]["seq_len"]
    train, val = split(kept, cfg.val_fraction, seed)
    if cfg.shuffle:
        train, val = shuffled(train, seed), shuffled(val, seed)
    train_ids, train_drop = pack(train, seq_len)
    val_ids, val_drop = pack(val, seq_len)
    if train_ids.shape[0] == 0:
        raise ConfigError(f"{path}.seq_len={seq_len}: the {sum(s.ids.size for s in train)} training tokens do not fill one row")
    if val and val_ids.shape[0] == 0:
        raise ConfigError(
            f"{path}.val_fraction={cfg.val_fraction}: the {len(val)} validation sequences "
            f"({sum(s.ids.size for s in val)} tokens) do not fill one row of {seq_len}; raise it or set 0"
        )
    stats = statistics(seqs, kept)
    stats |= {"train_sequences": len(train), "val_sequences": len(val), "train_rows": int(train_ids.shape[0]),
              "val_rows": int(val_ids.shape[0]), "dropped_tokens": train_drop + val_drop, "seq_len": seq_len}
    source = source_hash(shard_dirs)
    for name, ids in (("train", train_ids), ("val", val_ids)):
        meta = {"seq_len": seq_len, "rows": len(ids), "vocab_size": run["vocab_size"],
                "eos_ids": run["eos_ids"], "source": source}
        # one metadata key: safetensors writes several in no fixed order (not byte-reproducible)
        save_file({"input_ids": ids}, str(tmp_out / f"{name}.safetensors"),
                  {"dataset": json.dumps(meta, sort_keys=True)})
    manifest = {"params": cfg.to_dict(), "seed": seed, "stats": stats, "run": run, "source": source,
                "val_start_ids": sorted({s.start_id for s in val})}
    (tmp_out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (tmp_out / "samples.txt").write_text("\n\n".join(texts) + "\n")
    return stats
