"""merge: shards -> packed train/val tensors; determinism, split, dedup, statistics, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quant.config import ConfigError
from quant.synth.merge import MergeConfig, Seq, distinct_n, merge, statistics
from quant.synth.sampling import SynthesisConfig
from quant.synth.store import ShardWriter, read_records
from tests.tasks.test_synth import run_shard, save_tiny_model


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[Path]]:
    """The same run synthesized as 2 shards and as 1 shard, on the tiny model."""
    root = tmp_path_factory.mktemp("merge")
    model = save_tiny_model(root / "model")
    out = {}
    for n in (2, 1):
        cfg = SynthesisConfig.from_dict(
            {"shards": list(range(n)), "num_start_ids": 8, "seq_len": 24, "batch_size": 6}, "synthesize"
        )
        for k in range(n):
            run_shard(cfg, k, model, root / f"n{n}")
        out[n] = [root / f"n{n}" / f"shard-{k}" for k in range(n)]
    return out


def do_merge(shard_dirs, out: Path, seed: int = 0, **kw) -> dict:
    out.mkdir(parents=True)
    cfg = MergeConfig.from_dict({"val_fraction": 0.25, **kw}, "merge")
    return merge(shard_dirs, cfg, seed, out)


def test_merge_is_deterministic_and_independent_of_the_shard_count(shards, tmp_path):
    do_merge(shards[2], tmp_path / "a")
    do_merge(shards[2], tmp_path / "b")
    do_merge(shards[1], tmp_path / "one")
    for name in ("train.safetensors", "val.safetensors", "manifest.json", "samples.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for name in ("train.safetensors", "val.safetensors"):
        assert torch.equal(load_file(tmp_path / "a" / name)["input_ids"], load_file(tmp_path / "one" / name)["input_ids"])
    do_merge(shards[2], tmp_path / "s1", seed=1)
    assert not torch.equal(load_file(tmp_path / "a" / "train.safetensors")["input_ids"],
                           load_file(tmp_path / "s1" / "train.safetensors")["input_ids"])


def test_packed_rows_hold_the_sequences_split_by_start_id(shards, tmp_path):
    stats = do_merge(shards[2], tmp_path / "m", shuffle=False)
    seqs = sorted((r for d in shards[2] for r in read_records(d)), key=lambda r: (r["start_id"], r["prefix_len"]))
    train = load_file(tmp_path / "m" / "train.safetensors")["input_ids"]
    val = load_file(tmp_path / "m" / "val.safetensors")["input_ids"]
    assert train.dtype == torch.int32 and train.shape[1] == 24 and val.shape[1] == 24
    with safe_open(tmp_path / "m" / "train.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["dataset"])
    assert meta["seq_len"] == 24 and meta["eos_ids"] == [2] and meta["rows"] == len(train)
    val_starts = set(json.loads((tmp_path / "m" / "manifest.json").read_text())["val_start_ids"])
    assert len(val_starts) == 2  # 25% of 8 start ids; all 3 prefix variants of each in val
    for part, rows in ((False, train), (True, val)):
        stream = [t for r in seqs if (r["start_id"] in val_starts) == part for t in r["ids"]]
        assert rows.flatten().tolist() == stream[: rows.numel()]
        assert len(stream) - rows.numel() < 24
    assert stats["train_rows"] == len(train) and stats["val_rows"] == len(val)
    assert stats["sequences"] == 24 and stats["tokens"] == sum(len(r["ids"]) for r in seqs)


def fake_shard(d: Path, shard: int, num_shards: int, records: list[dict], run: dict | None = None) -> Path:
    run = run or {"params": {"seq_len": 4}, "vocab_size": 10, "eos_ids": [2], "shard": shard}
    w = ShardWriter(d / "work", {**run, "shard": shard})
    w.append([{"index": i, "finish": "length", "logprob": -1.0, "text": "", **r} for i, r in enumerate(records)])
    w.publish(d / f"shard-{shard}", {"shard": shard, "num_shards": num_shards, "sequences": len(records)})
    return d / f"shard-{shard}"


def test_dedup_drops_exact_repeats(tmp_path):
    recs = [
        {"start_id": 5, "prefix_len": 3, "ids": [5, 6, 7, 8]},
        {"start_id": 5, "prefix_len": 4, "ids": [5, 6, 7, 8]},  # repeat of the first
        {"start_id": 6, "prefix_len": 3, "ids": [6, 1, 1, 1]},
    ]
    d = [fake_shard(tmp_path, 0, 1, recs)]
    kept = do_merge(d, tmp_path / "dedup", val_fraction=0, shuffle=False)
    assert kept["duplicates"] == 1 and kept["train_rows"] == 2
    assert load_file(tmp_path / "dedup" / "train.safetensors")["input_ids"].tolist() == [[5, 6, 7, 8], [6, 1, 1, 1]]
    assert do_merge(d, tmp_path / "all", val_fraction=0, dedup=False)["train_rows"] == 3


def test_statistics_on_a_known_example():
    a = Seq(1, 3, np.array([1, 2, 3, 1, 2], dtype=np.int32), "length", -4 * math.log(2))
    b = Seq(2, 3, np.array([4, 4], dtype=np.int32), "eos", -math.log(8))
    assert distinct_n([a], 1) == pytest.approx(3 / 5)
    assert distinct_n([a], 2) == pytest.approx(3 / 4)  # 12, 23, 31, 12
    assert distinct_n([a, b], 2) == pytest.approx(4 / 5)  # n-grams do not cross sequences
    s = statistics([a, b, a], [a, b])
    assert s["sequences"] == 3 and s["duplicates"] == 1 and s["tokens"] == 7
    assert s["self_ppl"]["mean"] == pytest.approx((2 + 8) / 2)
    assert s["self_ppl"]["corpus"] == pytest.approx(math.exp((4 * math.log(2) + math.log(8)) / 5))
    assert s["eos_fraction"] == 0.5


def test_merge_errors_name_the_problem(tmp_path, shards):
    recs = [{"start_id": s, "prefix_len": 3, "ids": [s, 1, 1, 1]} for s in (3, 4)]
    good = fake_shard(tmp_path / "g", 0, 2, recs)
    with pytest.raises(ConfigError, match=r"not a finished shard; run `dvc repro synthesize@1`"):
        do_merge([good, tmp_path / "missing"], tmp_path / "o1")
    other = fake_shard(tmp_path / "x", 1, 2, recs[:1], run={"params": {"seq_len": 8}, "vocab_size": 10, "eos_ids": [2]})
    with pytest.raises(ConfigError, match="different runs"):
        do_merge([good, other], tmp_path / "o2")
    with pytest.raises(ConfigError, match=r"holds shard 0 of 2, expected 1 of 2"):
        do_merge([good, good], tmp_path / "o3")
    with pytest.raises(ConfigError, match=r"merge\.val_fraction=0\.25.*do not fill one row"):
        do_merge(shards[2], tmp_path / "o4", seq_len=200)
    with pytest.raises(ConfigError, match=r"merge\.val_fraction"):
        MergeConfig.from_dict({"val_fraction": 1.0}, "merge")
