"""The block_ap stage with a diverging block: the error names block and step, and no model,
metrics or plot is written (issue 17)."""

from __future__ import annotations

import pytest

from quant.blockwise.engine import BlockDivergedError
from tests.test_e2e import _params, stage_dir  # noqa: F401  (fixture)


def test_diverging_stage_writes_nothing(stage_dir):  # noqa: F811
    from tasks import block_ap

    params = _params(block_ap={"options": {"epochs": 1, "batch_size": 2, "weight_lr": 1e30,
                                           "qparam_lr": 1e30}})
    with pytest.raises(BlockDivergedError, match=r"block 0 diverged: .* at step \d+"):
        block_ap.run(params)
    assert not (stage_dir / "artifacts" / "block_ap").exists()
    assert not (stage_dir / "metrics").exists()
