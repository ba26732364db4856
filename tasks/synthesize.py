"""synthesize@k: shard k of the LLM-QAT data-free training text (quant.synth).

`dvc repro synthesize@k` runs `python -m tasks.synthesize`, which generates the sequences
of shard k: its start ids (round-robin over the selected vocabulary ids) x
`synthesize.prefix_lengths`, each `synthesize.seq_len` tokens at most, in batches of
`synthesize.batch_size`. By hand: `python -m tasks.synthesize <k>`.

Which shard: the command line's argument, else the item of the DVC stage that runs it
(`$DVC_STAGE`, `synthesize@<k>`, which DVC sets for every stage command). dvc.yaml puts no
`${item}` into the command on purpose: an item is a params value, and a value such as
`"1; touch /tmp/x #"` in `synthesize.shards` would run in the shell DVC starts. Read from
the environment, the item never meets a shell; it must be a shard index of
`synthesize.shards`, which must be the integers 0..N-1 (checked with every param before the
stage starts, tasks.params_check).

Reads artifacts/prepare/model. Writes artifacts/synthesize/shard-<k>/
(sequences.jsonl + manifest.json, format in quant.synth.store) and
metrics/synthesize/shard-<k>.json.

Resume: work in progress lives in artifacts/.work/synthesize/shard-<k>/, not
in the stage's out, because DVC deletes outs before it runs a stage. A killed
shard started again (by hand, by `dvc repro`, by a Prefect retry) continues
after its last complete record, regenerating the interrupted batch with the
same composition, and ends with the same files as an uninterrupted run. When
the shard is complete the work directory is renamed onto the out.

GPUs: each shard is its own process; pin it with CUDA_VISIBLE_DEVICES=<gpu>
and leave `base.device: auto`, which then takes the one visible GPU.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from quant.checkpoint import check_model_files, load_quantized, load_tokenizer
from quant.config import ConfigError
from quant.synth import sampling as synth
from quant.synth.sampling import (
    SynthesisConfig,
    batches,
    check_model,
    generate,
    select_start_ids,
    shard_items,
)
from quant.synth.store import ShardWriter, file_sha256, is_complete, model_sha256, read_manifest
from tasks import tracking
from tasks.common import ARTIFACTS, Params, main, setup_torch, stage_dir, write_json

log = logging.getLogger("quant")
WORK = ARTIFACTS / ".work" / "synthesize"
USAGE = "usage: python -m tasks.synthesize <shard index> (one of synthesize.shards)"
DVC_STAGE_ENV = "DVC_STAGE"  # set by DVC for every stage command: `synthesize@<item>`


def shard_from_argv(argv: list[str], env: dict[str, str] | None = None) -> int:
    """The shard to run: the one argument, else the item of `$DVC_STAGE` (see the module docstring)."""
    env = os.environ if env is None else env
    if not argv and env.get(DVC_STAGE_ENV):
        stage = env[DVC_STAGE_ENV]
        name, at, item = stage.rpartition(":")[2].rpartition("@")
        if not at or name != "synthesize" or not (item.isascii() and item.isdigit()):
            raise ConfigError(f"{DVC_STAGE_ENV}={stage[:80]!r}: the synthesize item {item[:40]!r} is not a shard "
                              "index; synthesize.shards must list the integers 0..N-1")
        return int(item)
    if len(argv) != 1 or not (argv[0].isascii() and argv[0].isdigit()):
        raise ConfigError(f"{USAGE}; got arguments {argv}")
    return int(argv[0])


def eos_ids(model_dir: Path, model_config: Any, tokenizer: Any) -> list[int]:
    """The ids that end a sequence: generation_config.json's, else the config's, else the tokenizer's."""
    ids: Any = None
    gen = model_dir / "generation_config.json"
    if gen.exists():
        ids = json.loads(gen.read_text()).get("eos_token_id")
    if ids is None:
        ids = getattr(model_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return sorted({ids} if isinstance(ids, int) else set(ids))


def generator_sha256() -> str:
    """Hash of the generator code: a resumed shard must be produced by the same code."""
    d = Path(synth.__file__).parent
    return file_sha256([d / "sampling.py", d / "decode.py"])


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu x{torch.get_num_threads()} threads"


def run_shard(
    cfg: SynthesisConfig,
    shard: int,
    model_dir: str | Path,
    out_dir: str | Path,
    work_dir: str | Path,
    seed: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Generate (or finish) one shard; returns its metrics. Validates before generating."""
    import transformers
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    check_model_files(model_dir)  # config, tokenizer, weights' headers: one line naming a bad file
    model_config = AutoConfig.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    check_model(cfg, model_config)
    vocab = min(model_config.vocab_size, len(tokenizer))
    start_ids = select_start_ids(cfg, vocab, tokenizer.all_special_ids)
    items = shard_items(cfg, shard, start_ids)
    eos = eos_ids(model_dir, model_config, tokenizer)
    run = {
        "params": cfg.to_dict(), "shard": shard, "seed": seed, "eos_ids": eos, "vocab_size": vocab,
        "model_sha256": model_sha256(model_dir), "generator_sha256": generator_sha256(),
        "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if is_complete(out_dir, run):
        log.info("synthesize shard %d: %s is already complete for these params; nothing to do", shard, out_dir)
        return {**_summary_metrics(read_manifest(out_dir)), "generated_tokens": 0, "resumed_from": len(items)}
    writer = ShardWriter(work_dir, run)
    try:
        resumed_from = writer.done
        if resumed_from:
            log.info("synthesize shard %d: resuming from record %d of %d (%s holds records 0..%d)",
                     shard, resumed_from, len(items), work_dir, resumed_from - 1)
        else:
            log.info("synthesize shard %d: starting fresh, %d records", shard, len(items))
        model, _ = load_quantized(model_dir, dtype, device)
        t0 = time.perf_counter()
        new_tokens = _generate_pending(writer, model, tokenizer, items, cfg, seed, eos)
        seconds = time.perf_counter() - t0
        summary = _summarize(writer, shard, cfg.num_shards, start_ids[shard :: cfg.num_shards])
        writer.publish(out_dir, summary)
    finally:
        writer.close()
    return {
        **_summary_metrics(summary), "generated_tokens": new_tokens, "resumed_from": resumed_from,
        "generate_seconds": round(seconds, 2), "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 1),
    }


def _generate_pending(writer: ShardWriter, model, tokenizer, items, cfg, seed, eos) -> int:
    """Generate every batch not yet fully on disk; returns the new tokens written.
    A progress bar (stderr, decode steps of every pending batch) shows how far it is."""
    from tqdm import tqdm

    new_tokens = 0
    pending = [b for b in batches(items, cfg.batch_size) if b[-1].index >= writer.done]
    bar = tqdm(total=len(pending) * (cfg.seq_len - 1), desc="synthesize (decode steps)", unit="step",
               mininterval=2.0, file=sys.stderr)
    for batch in pending:
        done_before = bar.n
        gen = generate(model, batch, cfg, seed, eos, on_step=lambda t: bar.update(1))
        bar.update(done_before + cfg.seq_len - 1 - bar.n)  # rows that all stopped early end the batch
        texts = tokenizer.batch_decode([g.ids for g in gen])
        records = [_record(g, text) for g, text in zip(gen, texts, strict=True)]
        _check_regenerated(writer, records)
        fresh = [r for r in records if r["index"] >= writer.done]
        writer.append(fresh)
        new_tokens += sum(len(r["ids"]) - 1 for r in fresh)
    bar.close()
    return new_tokens


def _record(g: synth.Generated, text: str) -> dict[str, Any]:
    it = g.item
    return {"index": it.index, "start_id": it.start_id, "prefix_len": it.prefix_len,
            "finish": g.finish, "logprob": g.logprob, "ids": g.ids, "text": text}


def _check_regenerated(writer: ShardWriter, records: list[dict[str, Any]]) -> None:
    """A resumed batch regenerates records already on disk: they must come out identical."""
    first = records[0]["index"]
    if first >= writer.done:
        return
    stored = {r["index"]: r for r in writer.records() if r["index"] >= first}
    for r in records:
        if r["index"] in stored and stored[r["index"]]["ids"] != r["ids"]:
            raise RuntimeError(
                f"resumed shard regenerated record {r['index']} differently; the shard's run key "
                f"does not capture everything that determines the tokens. Delete {writer.dir}"
            )


def _summarize(writer: ShardWriter, shard: int, num_shards: int, start_ids: list[int]) -> dict[str, Any]:
    n = tokens = eos = 0
    for r in writer.records():
        n, tokens, eos = n + 1, tokens + len(r["ids"]), eos + (r["finish"] == "eos")
    return {"shard": shard, "num_shards": num_shards, "sequences": n, "tokens": tokens,
            "eos_stops": eos, "start_ids": start_ids}


def _summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("shard", "sequences", "tokens", "eos_stops")}


def run(params: Params) -> dict[str, Any]:
    shard = shard_from_argv(sys.argv[1:])
    cfg = params.section("synthesize", SynthesisConfig)
    if shard not in cfg.shards:
        raise ConfigError(f"shard {shard} is not in synthesize.shards={list(cfg.shards)}")
    tracking.set_tag("shard", shard)
    device, dtype = setup_torch(params.base)
    metrics = run_shard(
        cfg, shard, stage_dir("prepare") / "model", stage_dir("synthesize") / f"shard-{shard}",
        WORK / f"shard-{shard}", params.base.seed, device, dtype,
    )
    write_json(f"metrics/synthesize/shard-{shard}.json", metrics)
    return metrics


if __name__ == "__main__":
    main("synthesize", run)
