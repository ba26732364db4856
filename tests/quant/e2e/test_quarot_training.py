"""QuaRot as the initialisation of training: a rotated W4A8KV4 model goes through
the block_ap and e2e stages unchanged, keeps its online rotations, and both stages improve
it (block_ap: validation MSE per block; e2e: validation loss), with the integer grid and the
rotations as the later stages expect them."""

from __future__ import annotations

import pytest
import torch

from conftest import calibrate_step, make_tiny_llama
from quant.checkpoint import save_quantized
from quant.config.scheme import QuantScheme
from quant.load import load_model
from quant.modules.linear import QuantLinear
from quant.modules.runtime import apply_runtime_quantizers
from tasks.common import BaseParams, ModelParams, Params

# hidden 96 = 12 x 8 (a Hadamard construction), 6 heads of 16, MLP 192 = 12 x 16
SCHEME = QuantScheme.from_name("W4A8KV4", preset="efficientqat", group_size=32)
TEXT = " ".join(f"Sentence {i} tells of rivers, hills and the towns between them." for i in range(400))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture
def rotated_stage_dir(tmp_path, monkeypatch, embedded_tokenizer):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "artifacts" / "prepare" / "data"
    data.mkdir(parents=True)
    (data / "calib.txt").write_text(TEXT)
    model = make_tiny_llama(vocab=len(embedded_tokenizer), hidden=96, intermediate=192, heads=6, kv_heads=2,
                            layers=2)
    calibrate_step(model, SCHEME, "quarot")
    calibrate_step(model, SCHEME, "rtn")
    apply_runtime_quantizers(model, SCHEME)
    save_quantized(model, embedded_tokenizer, SCHEME, tmp_path / "artifacts" / "calibrate" / "model",
                   extra={"method": "quarot+rtn"})
    return tmp_path


def _params() -> Params:
    sections = {
        "block_ap": {"data": {"source": "calib", "train_samples": 8, "val_samples": 2, "seq_len": 32},
                     "steps": [{"block-ap": {"epochs": 4, "batch_size": 2, "weight_lr": 1e-3, "qparam_lr": 1e-3}}]},
        "e2e": {"data": {"source": "calib", "train_samples": 8, "val_samples": 2, "seq_len": 32},
                "train": {"epochs": 1, "batch_size": 4, "log_every": 1, "save_every": 1},
                "steps": [{"e2e-qp": {"lr": 1e-3}}]},
    }
    return Params(BaseParams(device="cpu"), ModelParams(), SCHEME, sections)


def _rotations(model) -> tuple[int, int]:
    online = sum(getattr(m, "input_rotation", None) is not None for m in model.modules())
    qk = sum(getattr(m, "qk_rotation", None) is not None for m in model.modules())
    return online, qk


def test_quarot_model_trains_through_block_ap_and_e2e(rotated_stage_dir):
    from tasks import block_ap, e2e

    root = rotated_stage_dir / "artifacts"
    calibrated, _ = load_model(root / "calibrate" / "model", torch.float32)
    online, qk = _rotations(calibrated)
    # down_proj and o_proj inputs, the norm readers q, k, v, gate, up of 2 layers; q/k after RoPE (KV4)
    assert online == 14 and qk == 2

    m1 = block_ap.run(_params())
    assert m1["blocks"] == 2 and m1["val_mse_mean"] < m1["val_mse_init_mean"]
    m2 = e2e.run(_params())
    assert m2["val_loss"] < m2["val_loss_before"]

    trained, _ = load_model(root / "e2e" / "model", torch.float32)
    assert _rotations(trained) == (online, qk)  # the rotations survive both stages
    layers = [m for m in trained.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.frozen and int(m.qweight.max()) <= 15 for m in layers)
    ids = torch.arange(5, 37).reshape(1, -1)
    with torch.no_grad():
        assert not torch.equal(trained(ids).logits, calibrated(ids).logits)  # trained, not a copy
