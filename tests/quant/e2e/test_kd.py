"""LLM-QAT knowledge distillation: the loss, what trains, and multi-process equality."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from quant.calibrate.rtn import quantize_linears
from quant.config import ConfigError
from quant.config.scheme import ActivationSpec, KVCacheSpec, QuantScheme, WeightSpec
from quant.e2e.kd import KDOptions, setup, teacher_topk
from quant.e2e.losses import kd_loss, kd_loss_topk
from quant.e2e.trainer import E2EContext, TrainConfig, Trainer
from quant.methods import names
from quant.modules.linear import QuantLinear
from quant.numerics.formats import IntFormat
from tests.conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[3]


def llm_qat_scheme(dynamic: bool = True) -> QuantScheme:
    return QuantScheme(
        weight=WeightSpec(IntFormat(4), -1, True, dynamic),
        activation=ActivationSpec(IntFormat(8), "per_token", True),
        kv_cache=KVCacheSpec(IntFormat(4), "per_token", True),
    )


def save_teacher(model, out: Path) -> Path:
    """The full-precision tiny model + a word-level tokenizer, as load_model expects."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _logits(seed, shape=(2, 5, 11)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


# ---------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_equals_direct_computation(temperature):
    s, t = _logits(0), _logits(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ce, kl = kd_loss(s, t, temperature, mask, normalize="token")
    # direct: -sum_v p_teacher(v) log p_student(v), averaged over the 8 unmasked tokens
    p = torch.exp(t / temperature) / torch.exp(t / temperature).sum(-1, keepdim=True)
    log_q = torch.log(torch.exp(s / temperature) / torch.exp(s / temperature).sum(-1, keepdim=True))
    per_token = -(p * log_q).sum(-1)
    direct = per_token[mask.bool()].mean() * temperature**2
    torch.testing.assert_close(ce, direct)
    kl_ref = F.kl_div(log_q[mask.bool()], p[mask.bool()], reduction="batchmean") * temperature**2
    torch.testing.assert_close(kl, kl_ref)
    assert kd_loss(t, t)[1].abs() < 1e-5  # student == teacher: KL 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_batch_normalisation_is_the_references_batchmean(temperature):
    """LLM-QAT: F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") on [B, L, V]
    sums over the L positions and divides by B only."""
    s, t = _logits(4, (3, 7, 13)), _logits(5, (3, 7, 13))
    ref = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                   reduction="batchmean") * temperature**2
    ce, kl = kd_loss(s, t, temperature)  # default: normalize="batch"
    torch.testing.assert_close(kl, ref)
    p = F.softmax(t / temperature, -1)
    entropy = -(p * p.log()).sum() / 3 * temperature**2
    torch.testing.assert_close(ce, ref + entropy)
    ce_tok, kl_tok = kd_loss(s, t, temperature, normalize="token")
    torch.testing.assert_close(kl_tok * 7, kl)  # 7 positions per sequence
    mask = torch.ones(3, 7)
    mask[0, 4:] = 0  # masked positions drop out of the sum, the divisor stays B
    ref_masked = (F.kl_div(F.log_softmax(s / temperature, -1), p, reduction="none").sum(-1)
                  * mask).sum() / 3 * temperature**2
    torch.testing.assert_close(kd_loss(s, t, temperature, mask)[1], ref_masked)
    with pytest.raises(ValueError, match="normalize='mean'"):
        kd_loss(s, t, normalize="mean")


def test_kd_normalize_option_is_checked():
    assert KDOptions().normalize == "batch" and KDOptions().teacher_batch_size == 4
    with pytest.raises(ConfigError, match="normalize='tokens' is not accepted"):
        KDOptions.from_dict({"normalize": "tokens"})
    with pytest.raises(ConfigError, match="teacher_batch_size=0"):
        KDOptions.from_dict({"teacher_batch_size": 0})


def test_kd_gradient_is_softmax_difference():
    s, t = _logits(0).requires_grad_(True), _logits(1)
    ce, _ = kd_loss(s, t, normalize="token")
    ce.backward()
    expected = (F.softmax(s.detach(), -1) - F.softmax(t, -1)) / (s.shape[0] * s.shape[1])
    torch.testing.assert_close(s.grad, expected)


def test_topk_loss_full_k_equals_full_loss_and_renormalises():
    s, t = _logits(2), _logits(3)
    v = t.shape[-1]
    vals, ids = t.topk(v, dim=-1)
    torch.testing.assert_close(kd_loss_topk(s, vals, ids), kd_loss(s, t)[0])
    vals, ids = t.topk(3, dim=-1)
    p = F.softmax(vals, -1)
    direct = -(p * F.log_softmax(s, -1).gather(-1, ids)).sum(-1).mean()
    torch.testing.assert_close(kd_loss_topk(s, vals, ids, normalize="token"), direct)


def test_teacher_topk_cache_matches_teacher(tiny_llama):
    ids = torch.randint(3, 256, (3, 6))
    cache = teacher_topk(tiny_llama, ids, k=5, batch_size=2, device="cpu")
    ref_v, ref_i = tiny_llama(ids).logits.topk(5, dim=-1)
    assert torch.equal(cache["teacher_topk_ids"], ref_i.to(torch.int32))
    torch.testing.assert_close(cache["teacher_topk_logits"].float(), ref_v, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------
# What trains


def _student_and_objective(tmp_path, dynamic: bool, **options):
    teacher_dir = save_teacher(make_tiny_llama(), tmp_path / "teacher")
    scheme = llm_qat_scheme(dynamic)
    student = make_tiny_llama()
    quantize_linears(student, scheme)
    ctx = E2EContext(scheme, torch.device("cpu"), torch.float32, teacher_dir=teacher_dir)
    objective = setup(student, KDOptions.from_dict(options), ctx)
    return student, objective


def test_kd_registered():
    assert "kd" in names("e2e")


@pytest.mark.parametrize("dynamic", [False, True])
def test_gradients_reach_weights_and_step_sizes(tmp_path, dynamic):
    student, objective = _student_and_objective(tmp_path, dynamic)
    loss, logs = objective.loss(student, {"input_ids": torch.randint(3, 256, (2, 12))})
    assert set(logs) == {"kd", "kl"} and loss > 0
    loss.backward()
    layers = [m for m in student.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    assert all(m.input_quantizer is not None for m in layers)
    for m in layers:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
        if dynamic:  # LLM-QAT: min-max step sizes are recomputed, not learned
            assert not m.scale.requires_grad and m.scale.grad is None
        else:
            assert m.scale.grad is not None and m.scale.grad.abs().sum() > 0
    # the full-precision parts train too (trainable: all), the teacher never
    assert student.model.norm.weight.grad is not None
    teacher = objective.frozen_modules["teacher"]
    assert all(p.grad is None for p in teacher.parameters())
    names = {g["name"] for g in objective.param_groups}
    assert names == ({"weight"} if dynamic else {"weight", "qparams"})


def test_frozen_grid_trains_only_step_sizes(tmp_path):
    teacher_dir = save_teacher(make_tiny_llama(), tmp_path / "teacher")
    scheme = llm_qat_scheme(dynamic=False)
    student = make_tiny_llama()
    quantize_linears(student, scheme)
    for m in student.modules():
        if isinstance(m, QuantLinear):
            m.freeze()
    ctx = E2EContext(scheme, torch.device("cpu"), torch.float32, teacher_dir=teacher_dir)
    objective = setup(student, KDOptions(trainable="linears"), ctx)
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert trainable and all(any(p is m.scale for m in student.modules() if isinstance(m, QuantLinear))
                             for p in trainable)
    assert [g["name"] for g in objective.param_groups] == ["qparams"]


def _peaky_tiny_llama():
    """A tiny Llama with confident predictions, so quantization error shows in the KL."""
    model = make_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def test_kd_training_lowers_the_distillation_loss(tmp_path):
    teacher_dir = save_teacher(_peaky_tiny_llama(), tmp_path / "teacher")
    scheme = llm_qat_scheme()
    student = _peaky_tiny_llama()
    quantize_linears(student, scheme)
    ctx = E2EContext(scheme, torch.device("cpu"), torch.float32, teacher_dir=teacher_dir)
    objective = setup(student, KDOptions(lr=1e-4), ctx)
    teacher = objective.frozen_modules["teacher"]
    data = {"input_ids": torch.randint(3, 256, (8, 16), generator=torch.Generator().manual_seed(0))}

    def kl():
        with torch.no_grad():
            return kd_loss(student(data["input_ids"]).logits, teacher(data["input_ids"]).logits)[1]

    kl_before = kl()
    cfg = TrainConfig(epochs=6, batch_size=4, warmup_ratio=0.0, save_every=0, log_every=1,
                      grad_checkpointing=True)
    result = Trainer(student, objective, cfg, tmp_path / "run", seed=0).fit(data, data)
    student.eval()
    assert result.val_loss_after < result.val_loss_before
    assert kl() < 0.75 * kl_before


def test_topk_teacher_cache_trains_through_the_trainer(tmp_path):
    student, objective = _student_and_objective(tmp_path, dynamic=True, teacher="topk", topk=8, lr=1e-4)
    data = {"input_ids": torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))}
    prepared = objective.prepare_data(data)
    assert prepared["teacher_topk_ids"].shape == (4, 16, 8)
    loss, logs = objective.loss(student, {k: v[:2] for k, v in prepared.items()})
    assert "kl" not in logs and loss > 0  # the teacher was not run for this batch
    cfg = TrainConfig(epochs=1, batch_size=2, warmup_ratio=0.0, save_every=0, log_every=1,
                      grad_checkpointing=False)
    result = Trainer(student, objective, cfg, tmp_path / "run", seed=0).fit(data)
    assert result.steps == 2


class _Killed(Exception):
    pass


def test_kd_resume_equals_uninterrupted(tmp_path):
    """A killed KD run restarts from its last saved step and ends bitwise equal (CPU)."""
    teacher_dir = save_teacher(make_tiny_llama(), tmp_path / "teacher")
    scheme = llm_qat_scheme()
    data = {"input_ids": torch.randint(3, 256, (8, 16), generator=torch.Generator().manual_seed(0))}
    cfg = TrainConfig(epochs=2, batch_size=4, warmup_ratio=0.0, save_every=1, log_every=1,
                      grad_checkpointing=False)

    def trained(work, log_fn=None):
        student = make_tiny_llama()
        quantize_linears(student, scheme)
        ctx = E2EContext(scheme, torch.device("cpu"), torch.float32, teacher_dir=teacher_dir)
        trainer = Trainer(student, setup(student, KDOptions(lr=1e-3), ctx), cfg, work, seed=0,
                          fingerprint="kd", log_fn=log_fn)
        return student, trainer.fit(data)

    ref, _ = trained(tmp_path / "a")

    def kill_at_3(step, _):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        trained(tmp_path / "b", kill_at_3)
    resumed, result = trained(tmp_path / "b")
    assert result.resumed_from == 2 and result.steps == 4
    for (n, a), (_, b) in zip(ref.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_scheme_mismatch_is_refused(tmp_path):
    teacher_dir = save_teacher(make_tiny_llama(), tmp_path / "teacher")
    student = make_tiny_llama()
    quantize_linears(student, QuantScheme.from_name("W4A16KV16", preset="efficientqat", group_size=32))
    ctx = E2EContext(llm_qat_scheme(), torch.device("cpu"), torch.float32, teacher_dir=teacher_dir)
    with pytest.raises(ValueError, match="differ from scheme.weight"):
        setup(student, KDOptions(), ctx)


# ---------------------------------------------------------------------------
# Two processes (gloo, accelerate launch) == one process on the same global batch

WORKER = '''
import json, sys
import torch
from quant.e2e.kd import KDOptions, setup
from quant.calibrate.rtn import quantize_linears
from quant.e2e.distributed import make_accelerator
from quant.e2e.trainer import E2EContext, TrainConfig, Trainer
from tests.conftest import make_tiny_llama
from tests.quant.e2e.test_kd import llm_qat_scheme

teacher_dir, work, out, global_batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
acc = make_accelerator("cpu")
torch.set_num_threads(1)
scheme = llm_qat_scheme()
student = make_tiny_llama()
quantize_linears(student, scheme)
ctx = E2EContext(scheme, acc.device, torch.float32, teacher_dir=teacher_dir)
objective = setup(student, KDOptions(lr=1e-3), ctx)
data = {"input_ids": torch.randint(3, 256, (8, 16), generator=torch.Generator().manual_seed(0))}
cfg = TrainConfig(epochs=1, batch_size=global_batch // acc.num_processes, warmup_ratio=0.0,
                  save_every=0, log_every=1, grad_checkpointing=False)
result = Trainer(student, objective, cfg, work, accelerator=acc, seed=0).fit(data)
losses = torch.tensor([h["loss"] for h in result.history if "loss" in h])
losses = acc.reduce(losses, "mean")  # each rank logs the mean over its half of the batch
if acc.is_main_process:
    params = {n: p.detach() for n, p in student.named_parameters() if p.requires_grad}
    json.dump({"world": acc.num_processes, "backend": acc.state.backend, "losses": losses.tolist(),
               "norm_weight": params["model.norm.weight"].tolist(),
               "q_proj_row0": params["model.layers.0.self_attn.q_proj.weight"][0].tolist()},
              open(out, "w"))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, teacher_dir, procs: int) -> dict:
    script = tmp_path / "kd_worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"result-{procs}.json"
    # several processes: torchrun through accelerate's multi-process launcher; on a machine
    # without CUDA the Accelerator picks MULTI_CPU with the gloo backend
    mode = ["--multi_gpu", "--main_process_port", str(_free_port())] if procs > 1 else ["--cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(procs),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(script), str(teacher_dir), str(tmp_path / f"work-{procs}"), str(out), "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_process_gloo_equals_one_process(tmp_path):
    teacher_dir = save_teacher(make_tiny_llama(), tmp_path / "teacher")
    one = _launch(tmp_path, teacher_dir, 1)
    two = _launch(tmp_path, teacher_dir, 2)
    assert (one["world"], two["world"], two["backend"]) == (1, 2, "gloo")
    assert len(one["losses"]) == 2  # 8 samples / global batch 4: two optimizer steps
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    for key in ("norm_weight", "q_proj_row0"):
        torch.testing.assert_close(torch.tensor(two[key]), torch.tensor(one[key]), rtol=1e-4, atol=1e-6)
