"""Block-AP resume after a real kill: a run SIGKILLed mid-way, restarted, ends with
bitwise the same weights as an uninterrupted run (CPU).

This file is also the job the test runs in subprocesses:
`python tests/quant/blockwise/test_block_ap_resume.py WORK_DIR OUT_FILE`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

TESTS, ROOT = Path(__file__).resolve().parents[2], Path(__file__).resolve().parents[3]
LAYERS = 4


def job(work_dir: Path, out: Path) -> None:
    sys.path[:0] = [str(TESTS), str(ROOT)]
    from safetensors.torch import save_file

    from conftest import make_tiny_llama
    from quant.blockwise.engine import BlockwiseContext
    from quant.calibrate.rtn import quantize_linears
    from quant.config.scheme import QuantScheme
    from quant.methods import method

    torch.set_num_threads(1)
    model = make_tiny_llama(layers=LAYERS, seed=0)
    scheme = QuantScheme.from_name("W2A16KV16", preset="efficientqat", group_size=32)
    quantize_linears(model, scheme)
    ids = torch.randint(3, 256, (40, 32), generator=torch.Generator().manual_seed(0))
    entry = method("block-ap", "blockwise")
    options = entry.options.from_dict({"epochs": 4, "batch_size": 2, "weight_lr": 1e-3, "qparam_lr": 1e-3})
    ctx = BlockwiseContext(torch.device("cpu"), work_dir, seed=0, fingerprint="resume-test",
                           on_block=lambda i, _: print(f"block {i} done", flush=True),
                           train_ids=ids[:32], val_ids=ids[32:], scheme=scheme)
    result = entry.fn(model, options, ctx)
    print(f"resumed at {result.resumed_at}", flush=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))


def _run(work: Path, out: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, str(work), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, **kw)


def test_killed_run_resumes_to_identical_weights(tmp_path):
    from safetensors.torch import load_file

    ref = _run(tmp_path / "ref", tmp_path / "ref.safetensors")
    killed = _run(tmp_path / "work", tmp_path / "never.safetensors")
    state = tmp_path / "work" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["done"] >= 2:
            os.kill(killed.pid, signal.SIGKILL)
            break
        assert killed.poll() is None, killed.stdout.read()
        time.sleep(0.02)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    done_at_kill = json.loads(state.read_text())["done"]
    assert 2 <= done_at_kill < LAYERS, "the run was not interrupted mid-way"
    assert not (tmp_path / "never.safetensors").exists()

    resumed = _run(tmp_path / "work", tmp_path / "resumed.safetensors")
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert f"resumed at {done_at_kill}" in out
    ref_out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, ref_out
    a, b = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


if __name__ == "__main__":
    job(Path(sys.argv[1]), Path(sys.argv[2]))
