"""The reliability catalogue: bad params, corrupt inputs, faults and divergence, tried as a
careful and a hostile user would, each as a real stage process on a tiny pipeline.

    python scripts/reliability_catalogue.py --code . --code /work/main --out docs/results/reliability.json

Every case runs against each `--code` root (its `tasks` and `quant` on PYTHONPATH, its own
params.yaml under the catalogue's tiny settings) in a fresh copy of one tiny workspace:
a random 2-layer Llama with a word-level tokenizer as artifacts/prepare/model, calibration
and evaluation text, and the calibrate, block_ap, e2e and convert outputs made by the first
`--code` root (the formats are the same). A case is classified:

- clear: the expected outcome: exit 2 (or 128+N for a signal) with exactly one `error:` line,
  at the start of a line, naming what the case expects (the field or the file); no
  traceback; nothing harmed (outputs intact, no shell command run, no process left);
- unclear: it failed without a traceback, but not as above (wrong code, several or no
  `error:` lines, the line names neither the field nor the file, too slow to stop);
- traceback: a Python traceback reached the user;
- silent: it succeeded where it should have failed, or did harm (rewrote an output, ran a
  shell command from a params value, deleted a file, left a run RUNNING or a file behind).

Cases marked `expect="ok"` are valid inputs that used to fail: `clear` means it succeeded.
The table (category x class, per code root) is printed; every case's outcome goes to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent.parent
PY = sys.executable
CLASSES = ("clear", "unclear", "traceback", "silent")
CATEGORIES = ("params", "inputs", "faults", "divergence")
MEMORY_LIMIT = 8 << 30  # address space of every case process: a runaway allocation fails, the host lives
VOCAB, SEQ = 256, 32

TINY = {  # the catalogue's pipeline: seconds per stage on one CPU thread
    "base.threads": 1, "base.device": "cpu",
    "synthesize.shards": [0], "synthesize.num_start_ids": 2, "synthesize.prefix_lengths": [3],
    "synthesize.seq_len": 16, "synthesize.batch_size": 2, "synthesize.top_k": 0,
    "calibrate.steps": ["rtn"], "calibrate.samples": 4, "calibrate.seq_len": 64,
    "block_ap.steps": [{"block-ap": {"epochs": 1, "batch_size": 2}}],
    "block_ap.data": {"source": "calib", "train_samples": 4, "val_samples": 2, "seq_len": SEQ},
    "e2e.steps": [{"e2e-qp": {"lr": 1.0e-5}}],
    "e2e.data": {"source": "calib", "train_samples": 4, "val_samples": 2, "seq_len": SEQ},
    "e2e.train.batch_size": 2, "e2e.train.max_steps": 2, "e2e.train.log_every": 1, "e2e.train.save_every": 1,
    "convert.model": "e2e", "convert.formats": ["compressed-tensors"],
    "evaluate.model": "convert", "evaluate.include_base": False, "evaluate.compare": [], "evaluate.tasks": [],
    "evaluate.seq_len": 64, "evaluate.max_windows": 2, "evaluate.report": False, "evaluate.reuse_scores": False,
}


@dataclass
class Case:
    name: str
    category: str
    stage: str  # tasks.<stage>, or a runner below
    params: dict[str, Any] = field(default_factory=dict)
    needles: tuple[str, ...] = ()  # what the error line must name
    setup: Callable[[Path], None] | None = None
    harm: Callable[[Path], str | None] | None = None  # after the run: what was damaged, or None
    expect: str = "error"  # error | ok | signal
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    runner: str = "stage"  # see RUNNERS
    workspace: str = "tiny"  # tiny | embedded (SmolLM2-135M: a model with something to lose, for divergence)


# ---------------------------------------------------------------------------
# The tiny workspace


def tiny_model(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", pad_token="t0",
                            unk_token="t0").save_pretrained(out)


def text(n: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(f"t{rng.randrange(3, VOCAB)}" for _ in range(n))


def write_params(work: Path, code: Path, updates: dict[str, Any]) -> None:
    params = yaml.safe_load((code / "params.yaml").read_text())
    for dotted, value in copy.deepcopy({**TINY, **updates}).items():
        *path, last = dotted.split(".")
        node = params
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def env_for(work: Path, code: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(code), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "QUANT_EXPERIMENT": "catalogue", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    for k in ("QUANT_PARENT_RUN_ID", "DVC_STAGE"):
        env.pop(k, None)
    return {**env, **(extra or {})}


def limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    os.nice(5)


def stage(module: str, work: Path, code: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", module, *args], cwd=work, env=env_for(work, code, env), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limits)


EMBEDDED = {"block_ap.steps": [], "e2e.steps": [{"e2e-qp": {"lr": 2.0e-5}}]}  # the embedded workspace's own


def build_base(base: Path, code: Path, workspace: str = "tiny") -> Path:
    """prepare's outputs (the tiny model and random texts, or the embedded model and its texts),
    then calibrate, block_ap, e2e, convert (tiny only), merged ids (tiny only)."""
    if (base / "READY").exists():
        return base
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    if workspace == "embedded":
        write_params(base, code, EMBEDDED)
        for s in ("prepare", "calibrate", "block_ap", "e2e"):
            r = stage(f"tasks.{s}", base, code)
            if r.returncode:
                raise SystemExit(f"building the embedded workspace: {s} failed:\n{r.stderr[-3000:]}")
        (base / "READY").write_text("")
        return base
    (base / "artifacts" / "prepare" / "data" / "eval").mkdir(parents=True)
    tiny_model(base / "artifacts" / "prepare" / "model")
    (base / "artifacts" / "prepare" / "data" / "calib.txt").write_text(text(6000, 0))
    for i, name in enumerate(("embedded-wiki", "lee")):
        (base / "artifacts" / "prepare" / "data" / "eval" / f"{name}.txt").write_text(text(600, i + 1))
    write_params(base, code, {})
    for s in ("calibrate", "block_ap", "e2e", "convert"):
        r = stage(f"tasks.{s}", base, code)
        if r.returncode:
            raise SystemExit(f"building the catalogue's workspace: {s} failed:\n{r.stderr[-3000:]}")
    import torch
    from safetensors.torch import save_file

    ids = torch.randint(3, VOCAB, (16, SEQ), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    (base / "artifacts" / "merge").mkdir(parents=True)
    save_file({"input_ids": ids}, str(base / "artifacts" / "merge" / "train.safetensors"))
    (base / "READY").write_text("")
    return base


# ---------------------------------------------------------------------------
# Damage and harm


def write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def f(work: Path) -> None:
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return f


def remove(*rels: str) -> Callable[[Path], None]:
    def f(work: Path) -> None:
        for rel in rels:
            p = work / rel
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f


def merged_ids(make: Callable[[], Any]) -> Callable[[Path], None]:
    def f(work: Path) -> None:
        from safetensors.torch import save_file

        save_file({"input_ids": make()}, str(work / "artifacts" / "merge" / "train.safetensors"))
    return f


def edit_json(rel: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def f(work: Path) -> None:
        p = work / rel
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d))
    return f


def chain(*fs: Callable[[Path], None]) -> Callable[[Path], None]:
    def f(work: Path) -> None:
        for g in fs:
            g(work)
    return f


def e2e_output_kept(work: Path) -> str | None:
    """The previous e2e output and metrics are untouched (a marker planted before the run)."""
    m = json.loads((work / "metrics" / "e2e.json").read_text())
    if m.get("catalogue") != "previous":
        return "metrics/e2e.json was rewritten"
    if not (work / "artifacts" / "e2e" / "model" / "PREVIOUS").exists():
        return "artifacts/e2e/model was rewritten"
    return None


def plant_previous(work: Path) -> None:
    edit_json("metrics/e2e.json", lambda d: d.update(catalogue="previous"))(work)
    (work / "artifacts" / "e2e" / "model" / "PREVIOUS").write_text("")


def block_output_kept(work: Path) -> str | None:
    return None if (work / "artifacts" / "block_ap" / "model" / "PREVIOUS").exists() else \
        "artifacts/block_ap/model was rewritten"


def marker_absent(work: Path) -> str | None:
    return "a shell command from a params value ran" if (work / "PWNED").exists() else None


def victim_intact(work: Path) -> str | None:
    return None if (work / "victim" / "data.txt").exists() else "victim/ (outside artifacts/) was deleted"


def f32(shape):
    import torch

    return lambda: torch.randint(3, VOCAB, shape).float()


def ints(shape, high=VOCAB):
    import torch

    return lambda: torch.randint(3, high, shape, dtype=torch.int32)


FAKE_STAGE = """
import signal, sys, time
from pathlib import Path
from tasks import common
from quant.config import ConfigError

MODE = sys.argv[1]
STAGE = sys.argv[2] if len(sys.argv) > 2 else "calibrate"

def run(params):
    if MODE == "native":  # the main thread stuck in native code: SIGTERM lands in another thread
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        Path("started").write_text("1")
        time.sleep(120)
    if MODE == "bar":
        from tqdm import tqdm
        bar = tqdm(total=100, desc="work", file=sys.stderr, mininterval=0)
        for _ in range(40):
            bar.update(1)
        raise ConfigError("work.thing=3 is not accepted")
    if MODE == "write":
        from quant.io import atomic_dir
        with atomic_dir(common.stage_dir("calibrate") / "model") as tmp:
            (tmp / "w.bin").write_bytes(b"x")
    if MODE == "sleep":
        Path("started").write_text("1")
        time.sleep(120)
    return {}

common.main(STAGE, run)
"""


# ---------------------------------------------------------------------------
# The cases

SHARD_SHELL = "1; touch PWNED #"


def cases() -> list[Case]:
    C = Case
    e2e_prev = {"setup": plant_previous, "harm": e2e_output_kept}
    return [
        # -- params: each against the stage that reads it -----------------------------
        C("nan max_grad_norm", "params", "e2e", {"e2e.train.max_grad_norm": float("nan")}, ("e2e.train.max_grad_norm",), **e2e_prev),
        C("inf weight_decay", "params", "e2e", {"e2e.train.weight_decay": float("inf")}, ("e2e.train.weight_decay",), **e2e_prev),
        C("inf e2e-qp lr", "params", "e2e", {"e2e.steps": [{"e2e-qp": {"lr": float("inf")}}]}, ("lr",)),
        C("nan kd temperature", "params", "e2e", {"e2e.steps": [{"kd": {"temperature": float("nan")}}]}, ("temperature",), **e2e_prev),
        C("nan e2e-qp kd_temperature", "params", "e2e", {"e2e.steps": [{"e2e-qp": {"kd_temperature": float("nan")}}]}, ("kd_temperature",), **e2e_prev),
        C("nan warmup_ratio", "params", "e2e", {"e2e.train.warmup_ratio": float("nan")}, ("warmup_ratio",)),
        C("nan adam beta", "params", "e2e", {"e2e.train.adam_betas": [0.9, float("nan")]}, ("adam_betas",)),
        C("nan block-ap qparam_lr", "params", "block_ap", {"block_ap.steps": [{"block-ap": {"qparam_lr": float("nan")}}]}, ("qparam_lr",)),
        C("inf tesseraq scale_lr", "params", "block_ap", {"block_ap.steps": [{"tesseraq": {"scale_lr": float("inf")}}]}, ("scale_lr",)),
        C("nan synthesize temperature", "params", "synthesize", {"synthesize.temperature": float("nan")}, ("synthesize.temperature",), args=("0",)),
        C("nan synthesize top_p", "params", "synthesize", {"synthesize.top_p": float("nan")}, ("synthesize.top_p",), args=("0",)),
        C("nan merge val_fraction", "params", "merge", {"merge.val_fraction": float("nan")}, ("merge.val_fraction",)),
        C("nan awq max_shrink", "params", "calibrate", {"calibrate.steps": [{"awq": {"max_shrink": float("nan")}}]}, ("max_shrink",)),
        C("inf gptq percdamp", "params", "calibrate", {"calibrate.steps": [{"gptq": {"percdamp": float("inf")}}]}, ("percdamp",)),
        C("nan rtn clip_ratio", "params", "calibrate", {"calibrate.steps": [{"rtn": {"clip_ratio": float("nan")}}]}, ("clip_ratio",)),
        C("inf register max_ppl_ratio", "params", "register", {"register.gates.max_ppl_ratio": float("inf")}, ("register.gates.max_ppl_ratio",)),
        C("calibrate seq_len past context", "params", "calibrate", {"calibrate.steps": ["awq"], "calibrate.seq_len": 100000}, ("calibrate.seq_len", "context")),
        C("calibrate a billion windows", "params", "calibrate", {"calibrate.steps": ["awq"], "calibrate.samples": 10**9}, ("calibrate.samples", "memory")),
        C("rtn ignores calibrate.samples", "params", "calibrate", {"calibrate.samples": 10**9}, expect="ok"),
        C("block_ap seq_len past context", "params", "block_ap", {"block_ap.data.seq_len": 100000}, ("block_ap.data.seq_len", "context")),
        C("e2e seq_len past context", "params", "e2e", {"e2e.data.seq_len": 4096}, ("e2e.data.seq_len", "context")),
        C("evaluate seq_len past context", "params", "evaluate", {"evaluate.seq_len": 4096}, ("evaluate.seq_len", "context")),
        C("bad section seen by the first stage", "params", "calibrate", {"synthesize.shards": [0, SHARD_SHELL]}, ("synthesize.shards",)),
        C("negative calibrate samples", "params", "calibrate", {"calibrate.samples": -1}, ("calibrate.samples",)),
        C("string seq_len", "params", "calibrate", {"calibrate.seq_len": "abc"}, ("calibrate.seq_len",)),
        C("zero max_steps", "params", "e2e", {"e2e.train.max_steps": 0}, ("max_steps",)),
        C("int9 weights", "params", "calibrate", {"scheme.weight.format": "int9"}, ("scheme.weight.format",)),
        C("group size 48", "params", "calibrate", {"scheme.weight.group_size": 48}, ("group_size",)),
        C("shards not 0..N-1", "params", "synthesize", {"synthesize.shards": [0, 2]}, ("synthesize.shards",), args=("0",)),
        C("tesseraq in calibrate", "params", "calibrate", {"calibrate.steps": ["tesseraq"]}, ("calibrate.steps",)),
        C("shell in a shard item (dvc repro)", "params", "synthesize", {"synthesize.shards": [0, SHARD_SHELL]}, ("synthesize.shards",), harm=marker_absent, runner="dvc"),
        # -- corrupt inputs ------------------------------------------------------------
        C("tokenizer files missing", "inputs", "block_ap", {}, ("artifacts/calibrate/model", "tokenizer"),
          setup=remove("artifacts/calibrate/model/tokenizer.json", "artifacts/calibrate/model/tokenizer_config.json")),
        C("garbage merged ids", "inputs", "block_ap", {"block_ap.data.source": "synthetic"}, ("train.safetensors",),
          setup=write("artifacts/merge/train.safetensors", b"garbage" * 100)),
        C("token id past the vocabulary", "inputs", "e2e", {"e2e.data.source": "synthetic"}, ("train.safetensors", "vocabulary"),
          setup=merged_ids(ints((16, SEQ), 100000))),
        C("float32 token ids", "inputs", "e2e", {"e2e.data.source": "synthetic"}, ("train.safetensors", "integers"),
          setup=chain(merged_ids(f32((16, SEQ))), plant_previous), harm=e2e_output_kept),
        C("1-D token ids", "inputs", "e2e", {"e2e.data.source": "synthetic"}, ("train.safetensors", "2-D"),
          setup=merged_ids(ints((16 * SEQ,)))),
        C("quantization.json not UTF-8 (e2e)", "inputs", "e2e", {}, ("artifacts/block_ap/model/quantization.json",),
          setup=write("artifacts/block_ap/model/quantization.json", b"\xff\xfe{\x00")),
        C("quantization.json not UTF-8 (convert)", "inputs", "convert", {"convert.model": "block_ap"}, ("artifacts/block_ap/model/quantization.json",),
          setup=write("artifacts/block_ap/model/quantization.json", b"\xff\xfe{\x00")),
        C("quantization.json without scheme", "inputs", "e2e", {}, ("artifacts/block_ap/model/quantization.json",),
          setup=write("artifacts/block_ap/model/quantization.json", "{}")),
        C("qparams missing", "inputs", "block_ap", {}, ("qparams.safetensors",),
          setup=remove("artifacts/calibrate/model/qparams.safetensors")),
        C("packed export lost quantization_config", "inputs", "evaluate", {}, ("artifacts/convert/model/config.json",),
          setup=edit_json("artifacts/convert/model/config.json", lambda d: d.pop("quantization_config"))),
        C("garbage saved e2e step", "inputs", "e2e", {}, ("trainer.json",),
          setup=chain(write(".state/e2e/latest", "step-000001"), write(".state/e2e/step-000001/trainer.json", "{garbage"))),
        C("garbage block_ap state", "inputs", "block_ap", {}, ("state.json",), setup=write(".state/block_ap/state.json", "{")),
        C("calibration text not UTF-8", "inputs", "calibrate", {"calibrate.steps": ["awq"]}, ("calib.txt",),
          setup=write("artifacts/prepare/data/calib.txt", b"t5 t6 \xff\xfe t7")),
        C("eval.json not JSON", "inputs", "register", {}, ("metrics/eval.json",), setup=write("metrics/eval.json", "{")),
        C("config.json not JSON", "inputs", "block_ap", {}, ("config.json",), setup=write("artifacts/calibrate/model/config.json", "{")),
        C("truncated weights", "inputs", "block_ap", {}, ("model.safetensors",),
          setup=write("artifacts/calibrate/model/model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}")),
        # -- faults ----------------------------------------------------------------------
        C("MLflow store on a full disk", "faults", "calibrate", {}, ("MLflow store", "mlflow.db"), runner="fullstore"),
        C("MLflow store not a database", "faults", "calibrate", {}, ("MLflow store", "mlflow.db"), setup=write("mlflow.db", b"garbage" * 1000)),
        C("read-only output directory", "faults", "calibrate", {}, ("artifacts/calibrate",), runner="readonly"),
        C("SIGTERM while stuck in native code", "faults", "native", expect="signal", runner="signal"),
        C("error line after a progress bar", "faults", "bar", {}, ("work.thing",), runner="fake"),
        C("SIGKILL leaves no RUNNING run", "faults", "sleep", expect="ok", runner="orphan"),
        C("shard lock file after success", "faults", "synthesize", expect="ok", args=("0",),
          harm=lambda w: "a .lock file was left" if list((w / "artifacts" / ".work").rglob("*.lock")) else None),
        C("shard item outside artifacts (dvc repro)", "faults", "synthesize", {"synthesize.shards": [0, "0/../../../victim"]},
          ("synthesize.shards",), setup=write("victim/data.txt", "precious"), harm=victim_intact, runner="dvc"),
        C("recover after a wrong dvc.lock hash", "faults", "recover", runner="recover"),
        # -- divergence: the embedded SmolLM2-135M, a model with something to lose ------------
        C("e2e lr 1e30", "divergence", "e2e", {"e2e.steps": [{"e2e-qp": {"lr": 1.0e30}}]}, ("e2e",), workspace="embedded", **e2e_prev),
        C("e2e lr 1e6", "divergence", "e2e", {"e2e.steps": [{"e2e-qp": {"lr": 1.0e6}}]}, ("e2e",), workspace="embedded", **e2e_prev),
        C("kd lr 1e6", "divergence", "e2e", {"e2e.steps": [{"kd": {"lr": 1.0e6, "scale_lr": 1.0e6}}]}, ("e2e",), workspace="embedded", **e2e_prev),
        C("e2e lr 10 (a typo for 1e-5)", "divergence", "e2e", {"e2e.steps": [{"e2e-qp": {"lr": 10.0}}]}, ("e2e",),
          workspace="embedded", **e2e_prev),
        C("block-ap qparam_lr 1e6", "divergence", "block_ap", {"block_ap.steps": [{"block-ap": {"epochs": 1, "batch_size": 2, "qparam_lr": 1.0e6}}]},
          ("block_ap",), setup=lambda w: (w / "artifacts/block_ap/model/PREVIOUS").write_text(""), harm=block_output_kept,
          workspace="embedded"),
        C("block-ap qparam_lr 1e30", "divergence", "block_ap", {"block_ap.steps": [{"block-ap": {"epochs": 1, "batch_size": 2, "qparam_lr": 1.0e30}}]},
          ("block_ap", "block 0"), setup=lambda w: (w / "artifacts/block_ap/model/PREVIOUS").write_text(""), harm=block_output_kept,
          workspace="embedded"),
        C("register a far worse model", "divergence", "register", {}, ("register", "baseline"), runner="register"),
    ]


# ---------------------------------------------------------------------------
# Running and judging


@dataclass
class Outcome:
    rc: int | None
    stderr: str
    harm: str | None = None
    seconds: float = 0.0
    note: str = ""


def classify(case: Case, o: Outcome) -> str:
    errors = [ln for ln in o.stderr.splitlines() if ln.startswith("error: ")]
    glued = [ln for ln in o.stderr.splitlines() if "error: " in ln and not ln.startswith("error: ")]
    if o.harm:
        return "silent"
    if "Traceback (most recent call last)" in o.stderr:
        return "traceback"
    if case.expect == "ok":
        return "clear" if o.rc == 0 else "unclear"
    if o.rc == 0:
        return "silent"
    if case.expect == "signal":
        return "clear" if o.rc == 128 + signal.SIGTERM and len(errors) == 1 and not o.note else "unclear"
    if o.rc != 2 or len(errors) != 1 or glued or not all(n in errors[0] for n in case.needles):
        return "unclear"
    return "clear"


def run_case(case: Case, bases: dict[str, Path], code: Path, scratch: Path) -> Outcome:
    base = bases[case.workspace]
    work = scratch / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work, symlinks=True)
    write_params(work, code, {**(EMBEDDED if case.workspace == "embedded" else {}), **case.params})
    if case.setup:
        case.setup(work)
    t0 = time.time()
    runner = RUNNERS[case.runner]
    o = runner(case, work, code)
    o.seconds = round(time.time() - t0, 1)
    if case.harm and o.harm is None:
        o.harm = case.harm(work)
    return o


def _stage(case: Case, work: Path, code: Path) -> Outcome:
    try:
        r = stage(f"tasks.{case.stage}", work, code, *case.args, env=case.env)
    except subprocess.TimeoutExpired as exc:
        return Outcome(None, str(exc.stderr or ""), note="timed out")
    return Outcome(r.returncode, r.stderr)


def _fake(case: Case, work: Path, code: Path, mode: str | None = None, stage: str = "calibrate") -> subprocess.Popen:
    (work / "fake_stage.py").write_text(FAKE_STAGE)
    return subprocess.Popen([PY, "fake_stage.py", mode or case.stage, stage], cwd=work, env=env_for(work, code),
                            stderr=subprocess.PIPE, text=True, preexec_fn=limits)


def _wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.1)


def _run_status(work: Path) -> list[str]:
    with sqlite3.connect(work / "mlflow.db") as db:
        return [r[0] for r in db.execute("select status from runs order by start_time")]


def _signal(case: Case, work: Path, code: Path) -> Outcome:
    p = _fake(case, work, code)
    _wait_for(work / "started")
    p.send_signal(signal.SIGTERM)
    t0 = time.time()
    try:
        _, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        return Outcome(None, err, harm=f"still running {time.time() - t0:.0f} s after SIGTERM")
    status = _run_status(work)
    harm = None if status and status[-1] == "FAILED" else f"its MLflow run is {status[-1:] or 'missing'}"
    return Outcome(p.returncode, err, harm=harm)


def _fake_run(case: Case, work: Path, code: Path) -> Outcome:
    p = _fake(case, work, code)
    _, err = p.communicate(timeout=300)
    return Outcome(p.returncode, err)


def _orphan(case: Case, work: Path, code: Path) -> Outcome:
    (work / "mlflow.db").unlink(missing_ok=True)  # a fresh store: the killed run is its first
    p = _fake(case, work, code)
    _wait_for(work / "started")
    p.kill()
    p.wait()
    o = Outcome(*_rc_err(_fake(case, work, code, "write", "evaluate")))  # another stage starts next
    status = _run_status(work)
    o.harm = None if status and status[0] == "FAILED" else f"the killed run is still {status[:1]}"
    return o


def _rc_err(p: subprocess.Popen) -> tuple[int, str]:
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def _dvc(case: Case, work: Path, code: Path) -> Outcome:
    """`dvc repro --single-item` of the bad shard item, in a DVC repository of the workspace."""
    shutil.copy(code / "dvc.yaml", work / "dvc.yaml")
    for d in ("quant", "tasks"):  # DVC checks that a stage's code deps exist before it runs the stage
        shutil.copytree(code / d, work / d, ignore=shutil.ignore_patterns("__pycache__"))
    env = env_for(work, code)
    subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=work, env=env, check=True)
    item = str(case.params["synthesize.shards"][1])
    r = subprocess.run([PY, "-m", "dvc", "repro", "--single-item", f"synthesize@{item}"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600, preexec_fn=limits)
    stage_err = [ln for ln in r.stdout.splitlines() + r.stderr.splitlines() if not ln.startswith("ERROR: failed")]
    return Outcome(2 if r.returncode else 0, "\n".join(stage_err))


def _fullstore(case: Case, work: Path, code: Path) -> Outcome:
    def small_files() -> None:
        limits()
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # the sqlite file cannot grow: EFBIG

    (work / "mlflow.db").unlink(missing_ok=True)
    r = subprocess.run([PY, "-m", "tasks.calibrate"], cwd=work, env=env_for(work, code), capture_output=True,
                       text=True, timeout=600, preexec_fn=small_files)
    return Outcome(r.returncode, r.stderr)


def _readonly(case: Case, work: Path, code: Path) -> Outcome:
    d = work / "artifacts" / "calibrate"
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
        return Outcome(None, "", note="chattr +i unavailable: not run")
    try:
        return _stage(case, work, code)
    finally:
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)


def _recover(case: Case, work: Path, code: Path) -> Outcome:
    """A good output, a wrong hash in dvc.lock: the documented recovery of each code root."""
    repo = work / "repo"
    repo.mkdir()
    env = env_for(work, code)
    (repo / "dvc.yaml").write_text("stages:\n  make:\n    cmd: mkdir -p out && echo good > out/model.txt\n"
                                   "    outs:\n      - out\n")
    for cmd in (["init", "--no-scm", "-q"], ["repro", "-q"]):
        subprocess.run([PY, "-m", "dvc", *cmd], cwd=repo, env=env, check=True, capture_output=True)
    lock = repo / "dvc.lock"
    lock.write_text(lock.read_text().replace("md5: ", "md5: 0000", 1))
    script = code / "scripts" / "recover.py"
    cmd = [PY, str(script)] if script.exists() else [PY, "-m", "dvc", "checkout"]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    harm = None if (repo / "out" / "model.txt").exists() else "dvc checkout deleted the good workspace output"
    ok = r.returncode == 1 and "kept" in r.stdout
    return Outcome(2 if ok else r.returncode, f"error: {r.stdout.strip()}" if ok else r.stderr, harm=harm)


def _register(case: Case, work: Path, code: Path) -> Outcome:
    """evaluate's metrics say the model is 10 times worse than the one training started from."""
    ppl = {"embedded-wiki": 400.0, "lee": 450.0}
    write("metrics/eval.json", json.dumps({"ppl": ppl, "base_ppl": {k: 40.0 for k in ppl},
                                           "baseline_ppl": {k: 40.0 for k in ppl}}))(work)
    write_params(work, code, {"evaluate.model": "e2e", "register.gates.max_ppl_ratio": None,
                              "register.gates.beat_champion": False, "register.gates.max_acc_drop": None})
    return _stage(case, work, code)


RUNNERS: dict[str, Callable[[Case, Path, Path], Outcome]] = {
    "stage": _stage, "signal": _signal, "fake": _fake_run, "orphan": _orphan, "dvc": _dvc,
    "fullstore": _fullstore, "readonly": _readonly, "recover": _recover, "register": _register,
}


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| category | code | " + " | ".join(CLASSES) + " | cases |", "|---|---|" + "---:|" * (len(CLASSES) + 1)]
    for cat in (*CATEGORIES, "all"):
        for code, rows in results.items():
            mine = [r for r in rows if cat in ("all", r["category"])]
            counts = [sum(r["class"] == c for r in mine) for c in CLASSES]
            lines.append(f"| {cat} | {code} | " + " | ".join(map(str, counts)) + f" | {len(mine)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", action="append", type=Path, required=True, help="a code root (repeatable)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/reliability-catalogue"))
    ap.add_argument("--out", type=Path, default=None, help="raw results (JSON)")
    ap.add_argument("-k", default=None, help="only these cases: comma-separated parts of names, or categories")
    args = ap.parse_args(argv)
    codes = [c.resolve() for c in args.code]
    selected = [c for c in cases() if args.k is None or any(k in (c.name, c.category) or k in c.name
                                                            for k in args.k.split(","))]
    bases = {w: build_base(args.scratch / f"base-{w}", codes[0], w) for w in sorted({c.workspace for c in selected})}
    results: dict[str, list[dict[str, Any]]] = {}
    for code in codes:
        rows = results.setdefault(str(code), [])
        for case in selected:
            o = run_case(case, bases, code, args.scratch)
            cls = classify(case, o)
            errors = [ln for ln in o.stderr.splitlines() if "error: " in ln]
            tb = [ln for ln in o.stderr.splitlines() if ln and not ln.startswith(" ")]
            rows.append({"case": case.name, "category": case.category, "class": cls, "exit": o.rc,
                         "seconds": o.seconds, "harm": o.harm, "note": o.note,
                         "error_line": errors[-1][:400] if errors else None,
                         "last_line": tb[-1][:400] if tb else None})
            print(f"{code.name:12s} {case.category:10s} {cls:9s} {case.name}  [{o.rc}, {o.seconds}s] "
                  f"{(errors[-1] if errors else (o.harm or (tb[-1] if tb else '')))[:150]}", flush=True)
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"table": table(results), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
