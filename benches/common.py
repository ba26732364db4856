"""What every bench shares: model shapes, timing, result files, a logger, and the texts,
models and scores of the quality benches.

Shapes are data: a name -> a transformers config class and its sizes, built with random
weights (speed does not depend on the values; quality needs a real checkpoint, `--model`).
Timing synchronises CUDA around the host clock, so a measured span covers the device work
it launched. Every result file records how it was made (the command, the device, the git
commit, the date), so a number in docs/results/ can be traced to the run behind it.

A `--small` run of any bench is a CPU smoke run at tiny sizes: it proves the code path, its
numbers mean nothing, and its JSON goes to the temporary directory unless `--out` says
otherwise (docs/results/ only ever receives real runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
T0 = time.perf_counter()

# ---------------------------------------------------------------------------
# Model shapes: name -> (transformers config class, sizes). Random init.

_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-5)


def _sizes(config: str, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, vocab: int,
           positions: int = 4096, **extra: Any) -> tuple[str, dict[str, Any]]:
    return config, dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                        max_position_embeddings=positions, **extra)


SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # the tests' tiny Llama (tests/conftest.py make_tiny_llama), the same weights for a seed
    "tiny": _sizes("LlamaConfig", 64, 128, 2, 4, 2, 256, 512, rms_norm_eps=1e-6),
    # CPU smoke runs of the 7B-shaped speed benches
    "small": _sizes("LlamaConfig", 128, 256, 2, 4, 4, 512, 2048),
    "smollm2-135m": _sizes("LlamaConfig", 576, 1536, 30, 9, 3, 49152, 8192, tie_word_embeddings=True),
    "llama-small": _sizes("LlamaConfig", 1024, 2816, 8, 16, 16, 32000),
    "llama-2-7b": _sizes("LlamaConfig", 4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": _sizes("LlamaConfig", 5120, 13824, 40, 40, 40, 32000),
    # Qwen3-8B's sizes (GQA 32/8, vocab 151936) on the Qwen2 architecture (with its q/k/v biases):
    # quant.models.arch maps qwen2 and has no mapping for Qwen3's q/k norms yet
    "qwen3-8b-like": _sizes("Qwen2Config", 4096, 12288, 36, 32, 8, 151936, 40960),
}


def model_config(shape: str, **overrides: Any):
    """The transformers config of `shape` (see SHAPES), with `overrides` on top."""
    import transformers

    if shape not in SHAPES:
        raise SystemExit(f"shape {shape!r} is not known; known: {sorted(SHAPES)}")
    cls, sizes = SHAPES[shape]
    return getattr(transformers, cls)(**{**_IDS, **sizes, **overrides})


def build_model(shape: str, *, layers: int | None = None, vocab: int | None = None,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
                **overrides: Any):
    """A randomly initialised causal LM of `shape` (eval mode), built on `device` (a 7B init on
    the host takes minutes; on the GPU seconds)."""
    from transformers import AutoModelForCausalLM

    if layers is not None:
        overrides["num_hidden_layers"] = layers
    if vocab is not None:
        overrides["vocab_size"] = vocab
    cfg = model_config(shape, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def decoder_block(shape: str, seq_len: int, device: torch.device, seed: int = 0):
    """(block 0 of a random `shape` model, fp32 on the host; the keyword inputs the block-wise
    engine passes it for `seq_len` tokens, on `device`), captured as the engine captures them."""
    from quant.blockwise.cache import ActivationCache
    from quant.blockwise.passes import capture_block_inputs
    from quant.models.arch import decoder_layers

    cfg = model_config(shape)
    model = build_model(shape, layers=1, vocab=256, seed=seed,
                        max_position_embeddings=max(seq_len, cfg.max_position_embeddings))
    ids = torch.randint(3, 256, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    cache = ActivationCache((1, seq_len, cfg.hidden_size), torch.float32, "cpu", device)
    kwargs = capture_block_inputs(model, ids, cache, 1, device)
    return decoder_layers(model)[0], kwargs


# ---------------------------------------------------------------------------
# Devices and timing


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device | str | None = None) -> str:
    dev = torch.device(dev) if dev is not None else device()
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def require_cuda(bench: str, small: bool) -> None:
    """Exit with a message a user can act on when a GPU-only bench runs on a CPU without --small."""
    if not small and not torch.cuda.is_available():
        raise SystemExit(f"benches.{bench} needs a CUDA GPU; --small runs it on the CPU at tiny sizes "
                         "(a smoke run, its numbers mean nothing)")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of fn(), CUDA-synchronised before and after."""
    sync()
    t = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - t, result


def seconds(fn: Callable[[], Any]) -> float:
    return timed(fn)[0]


def median_seconds(fn: Callable[[], Any], warmup: int = 3, repeat: int = 10) -> float:
    """Median of `repeat` synchronised timings of fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn) for _ in range(repeat))


def time_calls(obj: Any, name: str) -> list[tuple[tuple, float]]:
    """Wrap the method `obj.name` (on this object only); every call appends (its positional
    arguments, its synchronised seconds) to the returned list."""
    real, calls = getattr(obj, name), []

    def wrapper(*args, **kwargs):
        t, result = timed(lambda: real(*args, **kwargs))
        calls.append((args, t))
        return result

    setattr(obj, name, wrapper)
    return calls


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """Peak GPU memory allocated since the last reset (None on a CPU run)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def say(*parts: Any) -> None:
    """A progress line with the seconds since the bench started."""
    print(f"[{time.perf_counter() - T0:6.0f}s]", *parts, flush=True)


# ---------------------------------------------------------------------------
# Result files


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_info() -> dict[str, Any]:
    """How a result was made: command line, device, library versions, git commit, date."""
    import transformers

    commit = _git("rev-parse", "HEAD")
    return {
        "command": " ".join([Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]]),
        "device": device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def add_out_arg(ap: argparse.ArgumentParser, name: str) -> None:
    """`--out`: default docs/results/<name>.json; with --small the temporary directory."""
    ap.add_argument("--out", type=Path, default=None,
                    help=f"result JSON (default: docs/results/{name}.json; with --small: "
                         f"{Path(tempfile.gettempdir()) / 'benches' / (name + '.json')})")
    ap.set_defaults(result_name=name)


def out_path(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if getattr(args, "small", False):
        return Path(tempfile.gettempdir()) / "benches" / f"{args.result_name}.json"
    return RESULTS / f"{args.result_name}.json"


def write_result(args: argparse.Namespace, result: dict[str, Any]) -> Path:
    """`result` under a `run` record (run_info) and the settings, written atomically as JSON."""
    from quant.io import write_text_atomic

    path = out_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v if isinstance(v, int | float | bool | None) else str(v)
                for k, v in vars(args).items() if k != "result_name"}
    data = {"run": run_info(), "settings": settings, **result}
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
    return path


def read_result(args: argparse.Namespace) -> dict[str, Any]:
    """The result file as it is (for resumable benches), without its run record and settings."""
    path = out_path(args)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in ("run", "settings")}


# ---------------------------------------------------------------------------
# Quality benches: texts, the model, perplexity, zero-shot tasks


def texts(data: Path | None, small: bool = False) -> tuple[str, dict[str, str]]:
    """(calibration text, {name: evaluation text}): `data`'s calib.txt and eval/*.txt (what
    tasks.prepare writes), else the embedded texts prepare uses by default (Wikipedia sample
    minus every 5th article; held-out articles and lee). --small: lee alone, 4/5 for calibration."""
    if data is not None:
        evals = {p.stem: p.read_text() for p in sorted((data / "eval").glob("*.txt"))}
        return (data / "calib.txt").read_text(), evals
    from tasks.textdata import lee_text, split_wiki

    if small:
        lee = lee_text()
        cut = len(lee) * 4 // 5
        return lee[:cut], {"lee": lee[cut:]}
    calib, held_out = split_wiki(5)
    return "\n\n".join(calib), {"embedded-wiki": "\n\n".join(held_out), "lee": lee_text()}


def embedded_tokenizer():
    """The embedded SmolLM2 tokenizer, read from its GGUF file (no model conversion)."""
    from transformers import AutoTokenizer

    from quant.models.hub import embedded_gguf_path

    gguf = embedded_gguf_path("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def load_fp_model(name: str, small: bool = False):
    """(full-precision model in fp32 on the host, tokenizer): a directory, `embedded:<key>` or a
    Hugging Face id (quant.load.load_model); --small: the tiny shape with the embedded tokenizer."""
    if small:
        tok = embedded_tokenizer()
        return build_model("tiny", vocab=len(tok)), tok
    from quant.load import load_model

    model, tok = load_model(name, torch.float32, "cpu")
    return model.eval(), tok


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="embedded:smollm2-135m",
                    help="model directory, embedded:<key> or Hugging Face id")
    ap.add_argument("--data", type=Path, default=None,
                    help="calib.txt + eval/*.txt (tasks.prepare); default: the embedded texts")
    ap.add_argument("--small", action="store_true",
                    help="CPU smoke run: tiny random model, embedded tokenizer, short texts")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def eval_ids(tokenizer, evals: dict[str, str]) -> dict[str, torch.Tensor]:
    from quant.data import tokenize_text

    return {k: tokenize_text(tokenizer, text) for k, text in evals.items()}


def perplexities(model, evals: dict[str, torch.Tensor], seq_len: int, windows: int | None,
                 batch_size: int = 4) -> dict[str, float]:
    """PPL on every evaluation text (quant.eval.ppl, fp32 forward on the bench's device), each
    quantized weight dequantized once (the same numbers as the plain forward); back on the host."""
    from quant.eval.ppl import perplexity
    from quant.modules.runtime import dequantize_once

    model.to(device()).eval()
    with dequantize_once(model):
        out = {k: perplexity(model, ids, seq_len, batch_size, windows).ppl for k, ids in evals.items()}
    model.cpu()
    return out


def add_task_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tasks", default="", help="zero-shot tasks (quant.eval.lm_tasks): 'all' or names")
    ap.add_argument("--task-limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--task-batch-size", default="16", help="an integer or 'auto'")


def task_scores(model, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """Zero-shot accuracy as the evaluate stage measures it; {} when --tasks is empty."""
    if not args.tasks:
        return {}
    from quant.eval import lm_tasks

    names = lm_tasks.TASK_NAMES if args.tasks == "all" else tuple(args.tasks.split(","))
    batch = args.task_batch_size if args.task_batch_size.startswith("auto") else int(args.task_batch_size)
    run = lm_tasks.TaskRun(names=names, limit=args.task_limit, batch_size=batch)
    model.to(device())
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as work:
        metrics = lm_tasks.extract_metrics(lm_tasks.run_tasks(model, tokenizer, run, work), names)
    model.cpu()
    return {"avg_acc": round(lm_tasks.average(metrics), 4), "tasks": metrics}


def set_threads(n: int) -> None:
    """torch CPU threads (on a shared, oversubscribed CPU one thread can be several times faster)."""
    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
