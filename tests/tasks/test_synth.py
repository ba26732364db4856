"""Data-free synthesis: sampler, decoder, greedy/sampled split, EOS policy, shards, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from quant.config import ConfigError
from quant.synth.decode import KVDecoder
from quant.synth.sampling import (
    Item,
    SynthesisConfig,
    generate,
    mix64,
    sample_next,
    sequence_key,
    shard_items,
    uniforms,
)
from quant.synth.store import RECORDS, ShardWriter, read_records

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 256
EOS = 2


def save_tiny_model(out: Path, max_positions: int = 512) -> Path:
    """A tiny random Llama + a word-level tokenizer (t0..t255; bos t1, eos t2), saved like prepare does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = make_tiny_llama(vocab=VOCAB, max_positions=max_positions)
    model.save_pretrained(out)
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t0")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def cfg_of(**kw) -> SynthesisConfig:
    # top_k 0: the random tiny model's EOS must be reachable by sampling
    base = {"shards": [0], "seq_len": 32, "batch_size": 8, "top_k": 0}
    return SynthesisConfig.from_dict({**base, **kw}, "synthesize")


def run_shard(cfg, shard, model_dir, root: Path, seed=0):
    from tasks.synthesize import run_shard as run

    return run(cfg, shard, model_dir, root / f"shard-{shard}", root / "work" / f"shard-{shard}", seed)


# ---------------------------------------------------------------------------
# Randomness and the sampler


def test_uniforms_match_integer_reference():
    keys = [sequence_key(0, 5, 3), sequence_key(0, 5, 4), sequence_key(1, 5, 3)]
    u = uniforms(keys, 7)
    ref = [[(mix64(mix64(k) ^ t) >> 11) * 2.0**-53 for t in range(7)] for k in keys]
    assert np.array_equal(u, np.array(ref))
    assert u.min() >= 0 and u.max() < 1
    assert len({tuple(r) for r in u.tolist()}) == 3  # seed, start id and prefix length all matter


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6)]
)
def test_sampler_draws_from_the_filtered_softmax(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    probs = torch.softmax(logits / temperature, -1)
    keep = torch.ones(8, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False  # logits are sorted descending
    if top_p < 1:
        before = probs.cumsum(-1) - probs
        keep &= before < top_p
    want = torch.where(keep, probs, 0) / probs[keep].sum()
    n = 20000
    u = torch.from_numpy(uniforms([sequence_key(7, i, 3) for i in range(n)], 1)[:, 0])
    draws = sample_next(logits.expand(n, 8), u, temperature, top_k, top_p)
    freq = torch.bincount(draws, minlength=8).double() / n
    assert freq[~keep].sum() == 0
    assert (freq - want.double()).abs().max() < 0.015  # ~4.5 sigma at n = 20000


# ---------------------------------------------------------------------------
# Decoder and generation against the model's own forward


def test_decoder_matches_model_forward_and_keeps_rows():
    model = make_tiny_llama()  # GQA: 4 heads, 2 KV heads
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    forced, seen = {"ids": ids}, []

    def head(logits, pos):  # teacher forcing: the next input is the next column of `ids`
        seen.append(logits.clone())
        nxt = (pos + 1).clamp(max=ids.shape[1] - 1)
        return forced["ids"].index_select(1, nxt).squeeze(1)

    with torch.no_grad():
        ref = model(ids).logits
        dec = KVDecoder(model, 4, 12, head)
        dec.inp.copy_(ids[:, 0])
        for _ in range(6):
            dec.step()
        dec.keep(torch.tensor([3, 1]))  # drop rows 0 and 2, reorder
        forced["ids"] = ids[[3, 1]]
        for _ in range(6):
            dec.step()
    assert (torch.stack(seen[:6], 1) - ref[:, :6]).abs().max() < 1e-4
    assert (torch.stack(seen[6:], 1) - ref[[3, 1], 6:]).abs().max() < 1e-4


def test_prefix_is_greedy_and_the_rest_is_sampled():
    model = make_tiny_llama(vocab=VOCAB)
    cfg = cfg_of(seq_len=40, on_eos="continue")
    items = [Item(i, s, p) for i, (s, p) in enumerate((s, p) for s in (10, 99, 200) for p in (3, 4, 5))]
    out = generate(model, items, cfg, seed=3, eos_ids=(EOS,))
    sampled_not_argmax = greedy_not_sample = 0
    for g in out:
        ids = torch.tensor(g.ids)
        assert len(g.ids) == 40 and g.finish == "length" and g.ids[0] == g.item.start_id
        with torch.no_grad():
            logits = model(ids[None]).logits[0, :-1]  # logits[j] predicts ids[j + 1]
        u = torch.from_numpy(uniforms([sequence_key(3, g.item.start_id, g.item.prefix_len)], 39)[0])
        redraw = sample_next(logits, u, cfg.temperature, cfg.top_k, cfg.top_p)
        argmax = logits.argmax(-1)
        p = g.item.prefix_len
        assert torch.equal(ids[1:p], argmax[: p - 1]), "prefix tokens must be the argmax"
        assert torch.equal(ids[p:], redraw[p - 1 :]), "later tokens must be the inverse-CDF draw"
        greedy_not_sample += int((argmax[: p - 1] != redraw[: p - 1]).sum())
        sampled_not_argmax += int((ids[p:] != argmax[p - 1 :]).sum())
        lp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None]).sum().item()
        assert g.logprob == pytest.approx(lp, rel=1e-5)
    assert greedy_not_sample > 0, "the test needs prefix positions where a sample would differ"
    assert sampled_not_argmax > len(out) * 10


def test_stop_policy_is_continue_cut_at_first_eos(monkeypatch):
    model = make_tiny_llama(vocab=VOCAB)
    items = [Item(i, 3 + 7 * i, 3 + i % 3) for i in range(16)]
    cont = generate(model, items, cfg_of(seq_len=64, on_eos="continue"), 0, (EOS,))
    dropped = []
    keep = KVDecoder.keep
    monkeypatch.setattr(KVDecoder, "keep", lambda self, rows: dropped.append(self.batch - rows.numel()) or keep(self, rows))
    stop = generate(model, items, cfg_of(seq_len=64, on_eos="stop"), 0, (EOS,))
    assert dropped and sum(dropped) >= 2, "finished rows must leave the batch"
    stopped = 0
    for c, s in zip(cont, stop, strict=True):
        first = next((j for j in range(1, 64) if c.ids[j] == EOS), None)
        if first is None:
            assert s.ids == c.ids and s.finish == "length"
        else:
            stopped += 1
            assert s.ids == c.ids[: first + 1] and s.finish == "eos"
    assert stopped >= 2, "needs sequences that stop (and rows dropped from the cache)"


def test_sequences_do_not_depend_on_batch_composition():
    model = make_tiny_llama(vocab=VOCAB)
    cfg = cfg_of(seq_len=24, on_eos="continue")
    items = [Item(i, 20 + i, 3 + i % 3) for i in range(6)]
    together = generate(model, items, cfg, 1, (EOS,))
    alone = [generate(model, [it], cfg, 1, (EOS,))[0] for it in reversed(items)][::-1]
    assert [g.ids for g in together] == [g.ids for g in alone]


# ---------------------------------------------------------------------------
# Params are checked before any generation


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"shards": []}, r"synthesize\.shards=\[\]"),
        ({"shards": [0, 2]}, r"synthesize\.shards"),
        ({"prefix_lengths": [0, 3]}, r"synthesize\.prefix_lengths"),
        ({"seq_len": 1}, r"synthesize\.seq_len"),
        ({"temperature": 0}, r"synthesize\.temperature"),
        ({"top_p": 0.0}, r"synthesize\.top_p"),
        ({"start_ids": [5, 5]}, r"synthesize\.start_ids"),
        ({"on_eos": "ignore"}, r"synthesize\.on_eos"),
        ({"batchsize": 4}, r"unknown key.*synthesize\.batchsize"),
    ],
)
def test_bad_params_are_rejected_naming_the_field(params, match):
    with pytest.raises(ConfigError, match=match):
        SynthesisConfig.from_dict(params, "synthesize")


@pytest.mark.parametrize(
    ("params", "shard", "match"),
    [
        ({"seq_len": 600}, 0, r"synthesize\.seq_len=600 exceeds the model's context \(max_position_embeddings=512\)"),
        ({"start_ids": [5, 256]}, 0, r"synthesize\.start_ids: \[256\] lie outside the vocabulary"),
        ({"num_start_ids": 300}, 0, r"synthesize\.num_start_ids=300 exceeds the 253 usable"),
        ({}, 1, r"shard 1 is not in synthesize\.shards"),
    ],
)
def test_model_dependent_errors_come_before_generation(model_dir, tmp_path, monkeypatch, params, shard, match):
    import tasks.synthesize as stage

    def tripwire(*a, **k):
        raise AssertionError("generation started")

    monkeypatch.setattr(stage, "generate", tripwire)
    monkeypatch.setattr(stage, "load_quantized", tripwire)
    with pytest.raises(ConfigError, match=match):
        run_shard(cfg_of(**params), shard, model_dir, tmp_path)
    assert not (tmp_path / "work").exists()


def test_shard_argument_is_checked():
    from tasks.synthesize import shard_from_argv

    assert shard_from_argv(["3"]) == 3
    for bad in ([], ["a"], ["1", "2"]):
        with pytest.raises(ConfigError, match="usage: python -m tasks.synthesize <shard index>"):
            shard_from_argv(bad)


# ---------------------------------------------------------------------------
# Shards: partition, determinism, resume


def test_shards_partition_the_start_ids():
    cfg = cfg_of(shards=[0, 1, 2], start_ids=list(range(40, 50)))
    ids = sorted(cfg.start_ids)
    parts = [shard_items(cfg, k, ids) for k in range(3)]
    starts = [s for p in parts for s in {it.start_id for it in p}]
    assert sorted(starts) == ids and len(set(starts)) == len(ids)
    assert all(len(p) == len({it.start_id for it in p}) * 3 for p in parts)


def test_shard_is_deterministic(model_dir, tmp_path):
    cfg = cfg_of(shards=[0, 1], num_start_ids=6, seq_len=24)
    run_shard(cfg, 1, model_dir, tmp_path / "a")
    run_shard(cfg, 1, model_dir, tmp_path / "b")
    run_shard(cfg, 1, model_dir, tmp_path / "c", seed=1)
    a, b, c = (tmp_path / x / "shard-1" for x in "abc")
    assert (a / RECORDS).read_bytes() == (b / RECORDS).read_bytes()
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    ra, rc = list(read_records(a)), list(read_records(c))
    assert len(ra) == 9 and [r["ids"] for r in ra] != [r["ids"] for r in rc]
    assert not (tmp_path / "a" / "work" / "shard-1").exists()  # published by rename


def test_writer_discards_a_partial_last_record_and_restarts_on_another_run(tmp_path):
    w = ShardWriter(tmp_path / "w", {"x": 1})
    w.append([{"index": i, "ids": [i]} for i in range(3)])
    with open(tmp_path / "w" / RECORDS, "a") as f:
        f.write('{"index": 3, "ids": [3')  # killed mid-write
    w.close()  # (a killed writer's lock is released by the OS)
    again = ShardWriter(tmp_path / "w", {"x": 1})
    assert again.done == 3 and again.resumed
    assert (tmp_path / "w" / RECORDS).read_text().count("\n") == 3
    with pytest.raises(RuntimeError, match="out of order"):
        again.append([{"index": 5, "ids": []}])
    again.close()
    other = ShardWriter(tmp_path / "w", {"x": 2})
    assert other.done == 0 and (tmp_path / "w" / RECORDS).read_text() == ""


def test_resume_after_sigkill_equals_uninterrupted(model_dir, tmp_path):
    params = {"shards": [0], "num_start_ids": 4, "seq_len": 48, "batch_size": 2, "on_eos": "stop"}
    cfg = SynthesisConfig.from_dict(params, "synthesize")
    killed = tmp_path / "killed"
    code = (  # the thread count is part of the shard's run record: the same as this process's
        f"import torch; torch.set_num_threads({torch.get_num_threads()})\n"
        "from quant.synth.sampling import SynthesisConfig\n"
        "from tasks.synthesize import run_shard\n"
        f"cfg = SynthesisConfig.from_dict({params!r}, 'synthesize')\n"
        f"run_shard(cfg, 0, {str(model_dir)!r}, {str(killed / 'shard-0')!r}, {str(killed / 'work' / 'shard-0')!r}, 0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    records = killed / "work" / "shard-0" / RECORDS
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the shard finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "shard-0").exists()
    lines = records.read_text().splitlines(keepends=True)
    assert 2 <= len(lines) < 12
    # A batch is appended in one write; a kill inside it leaves whole records of the batch
    # and a cut one. Make that happen here: an odd number of records and a partial line.
    kept = lines[: len(lines) - (len(lines) % 2 == 0)]
    records.write_text("".join(kept) + f'{{"index": {len(kept)}, "start_id": 1, "ids": [1, 2')

    resumed = run_shard(cfg, 0, model_dir, killed)
    whole = run_shard(cfg, 0, model_dir, tmp_path / "whole")
    assert resumed["resumed_from"] == len(kept) and whole["resumed_from"] == 0
    a, b = killed / "shard-0", tmp_path / "whole" / "shard-0"
    assert (a / RECORDS).read_bytes() == (b / RECORDS).read_bytes()
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
    recs = list(read_records(a))
    assert [r["index"] for r in recs] == list(range(12))
    assert all(r["text"] == " ".join(f"t{i}" for i in r["ids"]) for r in recs)
    assert all(math.isfinite(r["logprob"]) and r["logprob"] < 0 for r in recs)


def test_sampling_defaults_are_the_references_generate_defaults():
    """LLM-QAT sampled with generate(do_sample=True) and no sampling arguments, i.e. with
    transformers' GenerationConfig defaults; the config and params.yaml must match them."""
    from pathlib import Path
    from types import SimpleNamespace

    import yaml
    from transformers import GenerationConfig

    if hasattr(GenerationConfig, "_get_default_generation_params"):  # transformers >= 5: unset = None
        d = GenerationConfig._get_default_generation_params()
        ref = SimpleNamespace(temperature=d["temperature"], top_k=d["top_k"], top_p=d["top_p"])
    else:
        ref = GenerationConfig()
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    for cfg in (SynthesisConfig(), SynthesisConfig.from_dict(params["synthesize"], "synthesize")):
        assert (cfg.temperature, cfg.top_k, cfg.top_p) == (ref.temperature, ref.top_k, ref.top_p)
