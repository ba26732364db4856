"""Text sources for calibration and perplexity.

Embedded sources ship inside packages a plain install brings (ASSETS.md):

- `embedded-wiki`: the gensim Wikipedia sample (105 articles). It is split *by
  article* into disjoint calibration and evaluation sets with a fixed,
  seed-independent rule (every `eval_every`-th article in title order goes to
  evaluation), so the held-out text never changes with the training seed.
- `lee`: the Lee news corpus shipped with gensim, an out-of-domain PPL set.

Real-scale sources come through Hugging Face `datasets`:
`wikitext2` (wikitext-2-raw-v1; train for calibration, test for PPL, joined
with "\\n\\n" as in the GPTQ protocol) and `c4` (the en shards used by GPTQ/AWQ:
train shard 00000 for calibration, validation shard 00000 for PPL).
"""

from __future__ import annotations

import bz2
import importlib.util
import os
from pathlib import Path

from quant.config import ConfigError

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "test/test_data/lee_background.cor"
EMBEDDED_SOURCES = ("embedded-wiki", "lee")
HF_SOURCES = ("wikitext2", "c4")
SOURCES = EMBEDDED_SOURCES + HF_SOURCES


def _gensim_file(rel: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded text needs gensim: pip install gensim==4.4.0")
    path = Path(spec.submodule_search_locations[0]) / rel
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall with: pip install --force-reinstall gensim==4.4.0")
    return path


def wiki_articles() -> list[tuple[str, str]]:
    """(title, plain text) of each article of the gensim Wikipedia sample, in title order.

    Markup is removed with gensim's `filter_wiki`; `== Section ==` headings are kept,
    which gives wikitext-like text. Redirects and empty pages are dropped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(_gensim_file(WIKI_FILE), "rb") as f:
        for title, text, _pageid in extract_pages(f):
            plain = filter_wiki(text).strip()
            if not plain or text.lstrip().lower().startswith("#redirect"):
                continue
            lines = [ln.rstrip() for ln in plain.splitlines()]
            body = "\n".join(lines)
            while "\n\n\n" in body:
                body = body.replace("\n\n\n", "\n\n")
            out.append((title, body))
    return sorted(out)


def split_wiki(eval_every: int) -> tuple[list[str], list[str]]:
    """(calibration articles, evaluation articles): every `eval_every`-th article evaluates."""
    if eval_every < 2:
        raise ConfigError(f"prepare.wiki_eval_every={eval_every} must be >= 2")
    calib, evals = [], []
    for i, (title, body) in enumerate(wiki_articles()):
        (evals if i % eval_every == 0 else calib).append(f"= {title} =\n\n{body}")
    return calib, evals


def lee_text() -> str:
    lines = _gensim_file(LEE_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(ln.strip() for ln in lines if ln.strip())


HUB_PROBE_SECONDS = 5.0


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_dataset(field: str, source: str, repo: str, *args, **kwargs):
    """datasets.load_dataset after one short reachability check of the Hub (datasets itself
    retries for ~30 s before failing); every failure is one line naming `field`."""
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise RuntimeError("Hugging Face sources need datasets: pip install datasets") from exc
    hint = ("use 'embedded-wiki', or, with the dataset already in the local cache, set "
            "HF_DATASETS_OFFLINE=1")
    if not _offline():
        from huggingface_hub import HfApi

        try:
            HfApi().dataset_info(repo, timeout=HUB_PROBE_SECONDS)
        except Exception as exc:  # noqa: BLE001 - any failure means: not usable from here
            raise ConfigError(
                f"{field}={source!r}: the Hugging Face Hub dataset {repo!r} is not reachable from "
                f"here ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); {hint}"
            ) from None
    try:
        return load_dataset(repo, *args, **kwargs)
    except (ConnectionError, OSError, ValueError) as exc:
        raise ConfigError(
            f"{field}={source!r}: loading {repo!r} failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); {hint}"
        ) from None


def hf_texts(source: str, split: str, max_docs: int | None = None) -> list[str]:
    """Documents of a real-scale source ('train' for calibration, 'eval' for PPL)."""
    field = "prepare.calib_source" if split == "train" else "prepare.eval_sets"
    if source == "wikitext2":
        ds = _load_dataset(field, source, "wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
        # one "document": the GPTQ protocol joins the whole split with blank lines
        return ["\n\n".join(ds["text"])]
    if source == "c4":
        shard = (
            "en/c4-train.00000-of-01024.json.gz"
            if split == "train"
            else "en/c4-validation.00000-of-00008.json.gz"
        )
        ds = _load_dataset(field, source, "allenai/c4", data_files={"x": shard}, split="x")
        texts = ds["text"]
        return texts[:max_docs] if max_docs else texts
    raise ConfigError(f"text source {source!r} is not known; accepted: {list(SOURCES)}")
