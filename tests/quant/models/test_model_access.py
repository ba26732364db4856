"""Models from where users keep them, and the inputs that must fail before heavy work:
a sharded bf16 directory in the Hugging Face layout, the Hugging Face cache offline at a
pinned revision, an unsupported family, a shard that lost a tensor, a config that disagrees
with its weights, a dtype the device cannot run; and each block's own keyword inputs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families import ids, make_tiny
from safetensors.torch import load_file, save_file

import quant
from quant.config import ConfigError, InputError
from quant.models import hub

X = ids(2, 16, seed=7)
ROOT = Path(__file__).resolve().parents[3]


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X, use_cache=False).logits


def _tokenizer():
    from tests.quant.export.test_export_gguf import bpe_tokenizer

    return bpe_tokenizer()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A Qwen3 model saved as bf16 safetensors in several shards with an index (HF layout)."""
    model = make_tiny("qwen3")
    with torch.no_grad():  # the fp32 reference holds the bf16 values (its RoPE stays fp32)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    out = tmp_path_factory.mktemp("sharded") / "qwen3"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out, max_shard_size="40KB")
    _tokenizer().save_pretrained(out)
    return out, model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _no_weight_loading(monkeypatch):
    """Make any weight loading an error: what must fail, fails before it."""
    from transformers import AutoModelForCausalLM

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_a_sharded_bf16_directory_loads_as_it_is(sharded, tmp_path):
    path, ref = sharded
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    model, _ = quant.load_model(path)  # fp32 on the host: bf16 values are exact in fp32
    assert next(model.parameters()).dtype == torch.float32
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=0)
    out = hub.resolve_model(str(path), tmp_path / "resolved")  # what the prepare stage writes
    again, _ = quant.load_model(out)
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=0)


def test_an_unsupported_family_fails_from_its_config(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    _no_weight_loading(monkeypatch)
    match = r"model_type='gpt2' has no architecture mapping; known: \['gemma2', 'gemma3_text', 'llama'"
    with pytest.raises(ConfigError, match=match):
        quant.load_model(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=match):
        hub.resolve_model(str(tmp_path / "gpt2"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_shard_that_lost_a_tensor_is_refused_naming_it(sharded, tmp_path):
    path = _copy(sharded[0], tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.up_proj.weight"
    shard = path / index[key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"lacks 1 tensor\(s\) .*model.layers.1.mlp.up_proj.weight"):
        quant.load_model(path)
    with pytest.raises(InputError, match=r"model.layers.1.mlp.up_proj.weight"):
        hub.resolve_model(str(path), tmp_path / "out")


def test_a_missing_shard_is_refused_before_loading(sharded, tmp_path, monkeypatch):
    path = _copy(sharded[0], tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    gone = index["model.layers.0.self_attn.q_proj.weight"]
    (path / gone).unlink()
    _no_weight_loading(monkeypatch)
    with pytest.raises(InputError, match=rf"names shard\(s\) \['{gone}'\] that are not in"):
        quant.load_model(path)


def test_a_config_that_disagrees_with_its_weights_is_refused_before_loading(sharded, tmp_path, monkeypatch):
    path = _copy(sharded[0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    _no_weight_loading(monkeypatch)
    with pytest.raises(InputError, match=r"tensor 'model.layers.\d.mlp.(down|gate|up)_proj.weight' has shape "
                                         r"\[\d+, \d+\] but the model of .*config.json needs"):
        quant.load_model(path)


def test_a_dtype_the_device_cannot_run_is_refused_before_the_model(monkeypatch):
    assert hub.resolve_dtype("float16", "cpu") == torch.float16  # this CPU runs it
    real = torch.nn.functional.linear

    def no_half(x, w, b=None):
        if x.dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", no_half)
    with pytest.raises(ConfigError, match=r"base.dtype='float16': cpu cannot run a linear layer in float16 "
                                          r"\(\"addmm_impl_cpu_\" not implemented"):
        hub.resolve_dtype("float16", "cpu")
    monkeypatch.setattr(hub, "_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match=r"base.dtype='bfloat16': this GPU does not run bfloat16"):
        hub.check_dtype_runs(torch.bfloat16, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hub.resolve_dtype("auto", "cuda") == torch.float16  # the documented fallback


# ---------------------------------------------------------------------------
# The Hugging Face cache, offline


def _snapshot(cache: Path, repo: str, commit: str, src: Path, refs: tuple[str, ...] = ()) -> None:
    """huggingface_hub's cache layout: blobs/<hash> files, snapshots/<commit>/<name> links to
    them, refs/<branch> holding the commit."""
    import hashlib

    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)


OFFLINE_SCRIPT = """
import json, sys, torch
from quant.config import ConfigError
from quant.models.hub import resolve_model
from quant.load import load_model
out = {}
ids = torch.tensor([[5, 9, 40, 41, 42, 200]])
for name, rev in (("main", None), ("pinned", sys.argv[2]), ("branch", "main")):
    path = resolve_model("acme/tiny-llama", f"{sys.argv[1]}/{name}", rev)
    model, _ = load_model(path)
    with torch.no_grad():
        out[name] = model(input_ids=ids).logits.sum().item()
for name, rev in (("absent", "0" * 40), ("unknown", None)):
    try:
        resolve_model("acme/other" if name == "unknown" else "acme/tiny-llama", f"{sys.argv[1]}/{name}", rev)
        out[name] = "loaded"
    except ConfigError as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


def test_the_hugging_face_cache_offline_at_a_pinned_revision(tmp_path):
    old, new = make_tiny("llama", seed=1), make_tiny("llama", seed=2)
    tok = _tokenizer()
    for name, model in (("old", old), ("new", new)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    cache, pinned = tmp_path / "hub", "a" * 40
    _snapshot(cache, "acme/tiny-llama", pinned, tmp_path / "old")
    _snapshot(cache, "acme/tiny-llama", "b" * 40, tmp_path / "new", refs=("main",))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "out"), pinned], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    ids_ = torch.tensor([[5, 9, 40, 41, 42, 200]])
    with torch.no_grad():
        want_old, want_new = (m(input_ids=ids_).logits.sum().item() for m in (old, new))
    assert got["main"] == pytest.approx(want_new, abs=1e-3) and got["branch"] == got["main"]
    assert got["pinned"] == pytest.approx(want_old, abs=1e-3) and got["pinned"] != got["main"]
    for name in ("absent", "unknown"):
        assert "HF_HUB_OFFLINE is set, so only the Hugging Face cache was read" in got[name], got[name]
    assert f"at revision {'0' * 40!r}" in got["absent"]


# ---------------------------------------------------------------------------
# Each block with its own keyword inputs


@torch.no_grad()
def test_each_block_runs_with_its_own_mask_and_rope():
    """Gemma 3 with a sliding layer and a full one, local and global RoPE bases: chaining the
    blocks with `layer_kwargs` reproduces the model; block 0's inputs for every block do not."""
    from quant.blockwise.cache import ActivationCache
    from quant.blockwise.passes import call_block, capture_block_inputs, layer_kwargs
    from quant.models.arch import decoder_layers

    model = make_tiny("gemma3", layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    x = ids(2, 24, seed=8)
    cache = ActivationCache((2, 24, 64), torch.float32, "cpu", torch.device("cpu"))
    first = capture_block_inputs(model, x, cache, 2, torch.device("cpu"))
    per_block = layer_kwargs(model, x, torch.device("cpu"))
    want = model.model(input_ids=x, output_hidden_states=True).hidden_states[-2]  # before the last block
    layers = decoder_layers(model)
    h_own = call_block(layers[0], cache.data, per_block[0])
    h_first = call_block(layers[0], cache.data, first)
    torch.testing.assert_close(h_own, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(h_first, want, rtol=0, atol=1e-5)  # block 0's inputs are block 0's
    out_own = call_block(layers[1], h_own, per_block[1])
    out_first = call_block(layers[1], h_own, first)
    full = model.model(input_ids=x).last_hidden_state
    torch.testing.assert_close(model.model.norm(out_own), full, rtol=0, atol=1e-5)
    assert (model.model.norm(out_first) - full).abs().max() > 1e-3
