"""The block_ap stage with a diverging block: the error names block and step, and no model,
metrics or plot is written."""

from __future__ import annotations

import pytest

from quant.blockwise.engine import BlockDivergedError
from tests.quant.e2e.test_e2e import _params, stage_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def test_diverging_stage_writes_nothing(stage_dir):  # noqa: F811
    from tasks import block_ap

    params = _params(block_ap={"steps": [{"block-ap": {"epochs": 1, "batch_size": 2, "weight_lr": 1e30,
                                                       "qparam_lr": 1e30}}]})
    with pytest.raises(BlockDivergedError, match=r"block 0 diverged: .* at step \d+"):
        block_ap.run(params)
    assert not (stage_dir / "artifacts" / "block_ap").exists()
    assert not (stage_dir / "metrics").exists()


def test_tesseraq_through_the_stage(stage_dir):  # noqa: F811
    """block_ap.steps: [tesseraq] writes a frozen model that loads like Block-AP's, its metrics,
    and the loss plot with the per-step panel."""
    import json
    from unittest import mock

    import torch

    from quant.load import load_model
    from quant.modules.linear import QuantLinear
    from tasks import block_ap

    params = _params(block_ap={"steps": [{"tesseraq": {"thresholds": [0.5, 0.1], "iterations": 4,
                                                       "batch_size": 2}}]})
    metrics = block_ap.run(params)
    assert metrics["method"] == "tesseraq" and metrics["blocks"] == 2
    saved = json.loads((stage_dir / "metrics" / "block_ap.json").read_text())
    assert saved["blocks_kept_init"] == metrics["blocks_kept_init"]
    # cache: auto (the default) on a CPU machine keeps every cache in host memory, and says so
    assert {c["where"] for c in saved["caches"].values()} == {"cpu"} and len(saved["caches"]) == 4
    assert all("fits in host memory" in c["reason"] for c in saved["caches"].values())
    assert (stage_dir / "artifacts" / "block_ap" / "block_loss.png").stat().st_size > 0
    assert not (stage_dir / ".state" / "block_ap").exists()
    with mock.patch("transformers.AutoTokenizer.from_pretrained", return_value=None):
        model, _ = load_model(stage_dir / "artifacts" / "block_ap" / "model", torch.float32)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.frozen for m in layers)
    assert all(int(m.qweight.max()) <= 7 for m in layers)  # W3 grid
