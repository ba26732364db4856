"""One process of tests/tasks/test_e2e_launch.py's multi-process trainer runs (started through
accelerate's launcher; not a test module itself).

    python -m tests.dist_worker TEACHER_DIR WORK_DIR OUT_JSON STRATEGY DEVICE

Trains a tiny KD student twice in one launch: uninterrupted, and killed after its
second saved step and then resumed from that step. Rank 0 writes what the test
checks (the saved step's files, losses, the largest difference between the two
results, a few trained values) to OUT_JSON and saves the gathered model. STRATEGY `fsdp` on DEVICE `cpu` is the gloo
stand-in for a GPU run: accelerate shards only on GPUs, so the worker sets on its
Accelerator what accelerate sets on a GPU machine (the FSDP2 distributed type and
plugin); everything after that (fully_shard through accelerate's prepare, sharded
checkpoints, the gather) is the code a GPU run executes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from quant.calibrate.rtn import quantize_linears
from quant.checkpoint import save_quantized
from quant.e2e import distributed as D
from quant.e2e.distributed import make_accelerator
from quant.e2e.kd import KDOptions, setup
from quant.e2e.trainer import E2EContext, TrainConfig, Trainer
from tests.quant.e2e.test_kd import _peaky_tiny_llama, llm_qat_scheme

GLOBAL_BATCH = 4


class Killed(Exception):
    pass


def accelerator(strategy: str, device: str):
    if strategy == "fsdp" and device == "cpu":
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        acc = make_accelerator("cpu", "ddp")
        acc.state.fsdp_plugin = D.fsdp_plugin()
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState sets it
        return acc
    return make_accelerator(device, strategy)


def train(acc, teacher_dir: str, work: Path, kill_after: int | None = None):
    scheme = llm_qat_scheme()
    student = _peaky_tiny_llama()  # confident predictions: quantization error shows in the KD loss
    quantize_linears(student, scheme)
    ctx = E2EContext(scheme, acc.device, torch.float32, teacher_dir=teacher_dir)
    objective = setup(student, KDOptions(lr=1e-4), ctx)
    data = {"input_ids": torch.randint(3, 256, (16, 16), generator=torch.Generator().manual_seed(0))}
    cfg = TrainConfig(epochs=2, batch_size=GLOBAL_BATCH // acc.num_processes, warmup_ratio=0.0, save_every=1,
                      log_every=1, grad_checkpointing=True)
    trainer = Trainer(student, objective, cfg, work, accelerator=acc, seed=0, fingerprint="dist")
    if kill_after is not None:
        save = trainer.save

        def save_then_die():
            path = save()
            if trainer.step == kill_after:  # every process raises after the same complete save
                raise Killed
            return path

        trainer.save = save_then_die
    result = trainer.fit(data, {"input_ids": data["input_ids"][:5]})  # 5 rows: uneven over processes
    return trainer, result


def main() -> None:
    teacher_dir, work, out, strategy, device = sys.argv[1:6]
    work = Path(work)
    acc = accelerator(strategy, device)
    torch.set_num_threads(1)
    if device == "cuda":  # the resumed run must repeat the uninterrupted one (embedding backward uses atomics)
        torch.use_deterministic_algorithms(True, warn_only=True)
    ref, ref_result = train(acc, teacher_dir, work / "ref")
    ref_model = ref.unwrapped_model()
    try:
        train(acc, teacher_dir, work / "killed", kill_after=2)
        raise AssertionError("the killed run did not stop")
    except Killed:
        pass
    killed_steps = sorted(p.name for p in (work / "killed").glob("step-*"))
    step_files = sorted(str(p.relative_to(work / "killed" / killed_steps[-1]))
                        for p in (work / "killed" / killed_steps[-1]).rglob("*") if p.is_file())
    resumed, result = train(acc, teacher_dir, work / "killed")
    model = resumed.unwrapped_model()
    if acc.is_main_process:
        from transformers import AutoTokenizer

        sd, ref_sd = model.state_dict(), ref_model.state_dict()
        report = {
            "world": acc.num_processes, "sharded": resumed.sharded, "backend": acc.state.backend,
            "param_types": sorted({type(p).__name__ for p in resumed.model.parameters()}),
            "killed_steps": killed_steps, "step_files": step_files, "resumed_from": result.resumed_from, "steps": result.steps,
            "val_loss_before": ref_result.val_loss_before, "val_loss_after": ref_result.val_loss_after,
            "resumed_val_loss_after": result.val_loss_after,
            "max_diff_resumed_vs_ref": max((sd[k] - ref_sd[k]).abs().max().item() for k in sd),
            "norm_weight": sd["model.norm.weight"].tolist(),
            "q_proj_row0": sd["model.layers.0.self_attn.q_proj.weight"][0].tolist(),
        }
        saved = save_quantized(model, AutoTokenizer.from_pretrained(teacher_dir), llm_qat_scheme(), work / "model")
        report["saved_files"] = sorted(p.name for p in saved.iterdir())
        Path(out).write_text(json.dumps(report))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
