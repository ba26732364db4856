"""Shared fixtures: tiny random Llama models built in the test process, GPU skipping."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_tiny_llama(
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    max_positions: int = 512,
    seed: int = 0,
):
    """A randomly initialised LlamaForCausalLM small enough for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory):
    """The embedded SmolLM2-135M converted once per test session (safetensors + tokenizer)."""
    from quant.models.hub import resolve_model

    out = tmp_path_factory.mktemp("embedded") / "model"
    return resolve_model("embedded:smollm2-135m", out)


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def calibrate_step(model, scheme, name: str, calib=None, options=None, where: str | None = None):
    """Run one calibrate method on `model` as the calibrate runner does (its input checks, then
    the method), without the recipe's rule that the steps end with a quantizer (so a test can
    run QuaRot's rotation alone). Returns the method's metrics."""
    from quant.calibrate import CalibrationContext
    from quant.methods import method

    m = method(name, "calibrate")
    opts = m.parse_options(options or {}, f"options.{name}")
    ctx = CalibrationContext(scheme, calib, where=where or name)
    if m.check_inputs is not None:
        m.check_inputs(model, opts, ctx)
    return m.fn(model, opts, ctx)


class StubTokenizer:
    """A tokenizer stand-in for save/load tests that mock AutoTokenizer: it writes the
    tokenizer.json that loading requires (quant.checkpoint.check_tokenizer_files)."""

    def save_pretrained(self, path) -> None:
        from pathlib import Path

        (Path(path) / "tokenizer.json").write_text("{}")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: small models run several times faster on a shared,
    busy CPU. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
