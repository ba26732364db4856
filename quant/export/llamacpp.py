"""Running a GGUF file in llama.cpp itself (through llama-cpp-python), to check an export.

Optional: the binding is a compiled package (`pip install '.[gguf-check]'`, built from
source with cmake; minutes on a small CPU), needed only to verify files, never to write
them. Token ids go in as ids (our tokenizer's), so logits and perplexity compare the
weights and the graph, not two tokenizers; `tokenize` checks the tokenizer separately.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from time import perf_counter

import numpy as np

from quant.config import MissingDependencyError

REQUIREMENT = "llama-cpp-python==0.3.36"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load(path: str | Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True):
    """A llama.cpp context for the GGUF at `path` (CPU), logits kept for every position."""
    if not available():
        raise MissingDependencyError(f"checking a GGUF file in llama.cpp needs {REQUIREMENT}: "
                                     f"pip install '{REQUIREMENT}' (or: pip install '.[gguf-check]')")
    from llama_cpp import Llama

    threads = threads or len(os.sched_getaffinity(0))
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, verbose=False)


def logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] float32 logits of one sequence evaluated from an empty cache."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def nll(llm, windows: list[list[int]]) -> tuple[float, int]:
    """(summed negative log-likelihood, predicted tokens) over independent windows."""
    total, count = 0.0, 0
    for ids in windows:
        z = logits(llm, ids)[:-1].astype(np.float64)  # position t predicts ids[t + 1]
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return total, count


def perplexity(llm, windows: list[list[int]]) -> float:
    total, count = nll(llm, windows)
    return math.exp(total / count)


def decode_tokens_per_s(llm, prompt: list[int], n_tokens: int) -> float:
    """Greedy decode speed: tokens/s over `n_tokens` steps after the prompt (one token per step)."""
    gen = llm.generate(list(prompt), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
    next(gen)  # the prompt and the first token: not part of the per-token speed
    start = perf_counter()
    for i, _ in enumerate(gen, start=1):
        if i == n_tokens:
            break
    return n_tokens / (perf_counter() - start)


def tokenize(llm, text: str, add_special: bool = True) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=add_special, special=True)
