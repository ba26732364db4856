"""merge: the synthesized shards -> one packed, split, de-duplicated token dataset.

Reads artifacts/synthesize/shard-<k>/ for every k in `synthesize.shards`.
Writes artifacts/merge/ (train.safetensors and val.safetensors with `input_ids`
[rows, seq_len] int32, manifest.json, samples.txt; format in quant.synth.merge)
atomically, and metrics/merge.json (sequences, duplicates, tokens, distinct-n,
self-perplexity), which also go to MLflow.
"""

from __future__ import annotations

from typing import Any

from quant.io import atomic_dir
from quant.synth.merge import MergeConfig, merge
from quant.synth.sampling import SynthesisConfig
from tasks.common import Params, log_artifact, main, stage_dir, write_json


def run(params: Params) -> dict[str, Any]:
    cfg = params.section("merge", MergeConfig)
    shards = params.section("synthesize", SynthesisConfig).shards
    shard_dirs = [stage_dir("synthesize") / f"shard-{k}" for k in shards]
    out = stage_dir("merge")
    with atomic_dir(out) as tmp:
        stats = merge(shard_dirs, cfg, params.base.seed, tmp)
    write_json("metrics/merge.json", stats)
    log_artifact(out / "manifest.json")
    log_artifact(out / "samples.txt")
    return stats


if __name__ == "__main__":
    main("merge", run, sections=("synthesize",))
