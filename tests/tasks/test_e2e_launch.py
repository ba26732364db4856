"""The e2e stage on several processes: `e2e.distributed`, the relaunch through accelerate's
launcher, DDP and FSDP2 training with checkpoints and resume, and bad values refused
before any process starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tiny_llama
from quant.calibrate.rtn import quantize_linears
from quant.checkpoint import save_quantized
from quant.config import ConfigError
from quant.config.scheme import QuantScheme
from quant.e2e import distributed as D
from quant.e2e.distributed import DistributedConfig, resolve_processes
from tasks import launch
from tasks.common import BaseParams, ModelParams, Params

ROOT = Path(__file__).resolve().parents[2]
SCHEME = QuantScheme.from_name("W3A16KV16", preset="efficientqat", group_size=32)
TEXT = " ".join(f"Sentence {i} tells of rivers, hills and the towns between them." for i in range(400))


# ---------------------------------------------------------------------------
# Config


def test_distributed_config_round_trip_and_defaults():
    from tasks.e2e import E2EStageConfig

    assert DistributedConfig() == DistributedConfig(processes=1, strategy="ddp")
    for d in ({"processes": 4, "strategy": "fsdp"}, {"processes": "auto", "strategy": "ddp"}):
        cfg = DistributedConfig.from_dict(d, "e2e.distributed")
        assert cfg.to_dict() == d and DistributedConfig.from_dict(cfg.to_dict()) == cfg
    stage = E2EStageConfig.from_dict({"distributed": {"processes": 2}}, "e2e")
    assert stage.distributed == DistributedConfig(processes=2)
    assert E2EStageConfig.from_dict(stage.to_dict(), "e2e") == stage
    # params.yaml's default is today's one process
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["e2e"]
    assert E2EStageConfig.from_dict(raw, "e2e").distributed == DistributedConfig(processes=1, strategy="ddp")


@pytest.mark.parametrize(("value", "match"), [
    ({"processes": 0}, r"e2e\.distributed\.processes=0 must be an integer >= 1 or 'auto'"),
    ({"processes": -2}, r"e2e\.distributed\.processes=-2 must be"),
    ({"processes": "all"}, r"e2e\.distributed\.processes='all' is not accepted; use one of \['auto'\]"),
    ({"processes": 1.5}, r"e2e\.distributed\.processes must be an integer"),
    ({"strategy": "zero3"}, r"e2e\.distributed\.strategy='zero3' is not accepted; use one of \['ddp', 'fsdp'\]"),
    ({"nodes": 2}, r"unknown key\(s\) \['e2e\.distributed\.nodes'\]; accepted keys under e2e\.distributed: "
                   r"\['processes', 'strategy'\]"),
])
def test_bad_distributed_values_name_the_field(value, match):
    with pytest.raises(ConfigError, match=match):
        DistributedConfig.from_dict(value, "e2e.distributed")


def _gpus(monkeypatch, n: int) -> None:
    """Pretend to be a machine with `n` visible GPUs (the checks only count them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_processes_resolve_against_the_machine(monkeypatch):
    _gpus(monkeypatch, 2)
    assert resolve_processes(DistributedConfig(processes="auto"), "cuda") == 2
    assert resolve_processes(DistributedConfig(processes=2, strategy="fsdp"), "cuda") == 2
    assert resolve_processes(DistributedConfig(processes=1), "cuda:1", "cuda:1") == 1
    assert resolve_processes(DistributedConfig(processes="auto"), "cpu", "cpu") == 1
    assert resolve_processes(DistributedConfig(processes=3), "cpu", "cpu") == 3  # gloo processes
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match=r"e2e\.distributed\.processes=4 asks for 4 processes, one per GPU, "
                                          r"but 2 GPU\(s\) are visible \(CUDA_VISIBLE_DEVICES='0,1'\); "
                                          r"use at most 2 or 'auto'"):
        resolve_processes(DistributedConfig(processes=4), "cuda")
    with pytest.raises(ConfigError, match=r"base\.device='cuda:1' pins one"):
        resolve_processes(DistributedConfig(processes=2), "cuda:1", "cuda:1")
    with pytest.raises(ConfigError, match=r"strategy='fsdp' shards over processes, but processes=1 gives 1"):
        resolve_processes(DistributedConfig(processes=1, strategy="fsdp"), "cuda")


def test_fsdp_on_the_cpu_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match=r"e2e\.distributed\.strategy='fsdp' needs CUDA GPUs .* this run is "
                                          r"on the CPU \(base\.device='cpu'\); use strategy 'ddp'"):
        resolve_processes(DistributedConfig(processes=2, strategy="fsdp"), "cpu", "cpu")
    _gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match="strategy 'fsdp' needs CUDA GPUs"):
        D.make_accelerator("auto", "fsdp")


def test_fsdp_plugin_is_fsdp2_with_fp32_masters():
    plugin = D.fsdp_plugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    policy = plugin.mixed_precision_policy
    assert policy.param_dtype is None and policy.reduce_dtype == torch.float32  # no bf16 cast of the masters


def test_meta_skeleton_holds_no_memory_and_loads_a_full_state(tiny_llama):
    quantize_linears(tiny_llama, SCHEME)
    skeleton = D.meta_skeleton(tiny_llama)
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(p.is_meta for p in tiny_llama.parameters())  # the original is untouched
    rotary = dict(skeleton.named_buffers())["model.rotary_emb.inv_freq"]  # non-persistent: copied
    assert not rotary.is_meta
    skeleton.load_state_dict(tiny_llama.state_dict(), strict=True, assign=True)
    ids = torch.randint(3, 256, (1, 8))
    torch.testing.assert_close(skeleton(ids).logits, tiny_llama(ids).logits, rtol=0, atol=0)


def test_launcher_arguments():
    args = launch.launcher_args(2, ["-m", "tasks.e2e"], port=29555)
    assert args[:3] == ["--multi_gpu", "--main_process_port", "29555"]
    assert args[args.index("--num_processes") + 1] == "2" and args[args.index("--num_machines") + 1] == "1"
    assert args[-2:] == ["-m", "tasks.e2e"]
    from accelerate.commands.launch import launch_command_parser

    parsed = launch_command_parser().parse_args(args)  # accelerate accepts them as they are
    assert (parsed.multi_gpu, parsed.num_processes, parsed.module, parsed.training_script) == (
        True, 2, True, "tasks.e2e")
    one = launch.launcher_args(1, ["bench.py", "--x"])
    assert "--multi_gpu" not in one and one[-2:] == ["bench.py", "--x"]


def test_exit_status_is_the_first_failed_process_own():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failed(*codes):
        failures = {}
        for rank, code in enumerate(codes):
            f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="")
            f.timestamp = rank  # rank 0 failed first
            failures[rank] = f
        return ChildFailedError("tasks.e2e", failures)

    assert launch._exit_status(failed(2, -15)) == 2  # bad params: not worth retrying
    assert launch._exit_status(failed(143, 2)) == 2  # rank 1's bad input; rank 0 then stopped by torchrun
    assert launch._exit_status(failed(1, 143)) == 1
    assert launch._exit_status(failed(-9)) == 137  # killed by SIGKILL


# ---------------------------------------------------------------------------
# The stage: checks before any process starts


def _params(**e2e) -> Params:
    section = {"model": "calibrate", "data": {"source": "calib", "train_samples": 8, "val_samples": 2, "seq_len": 32},
               "train": {"epochs": 1, "batch_size": 2, "log_every": 1, "save_every": 1}, "steps": [{"e2e-qp": {"lr": 1e-3}}]}
    section.update(e2e)
    return Params(BaseParams(device="cpu"), ModelParams(), SCHEME, {"e2e": section})


@pytest.fixture
def project(tmp_path, monkeypatch, embedded_tokenizer):
    """A project directory with the calibration text and a quantized tiny model (artifacts/calibrate)."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "artifacts" / "prepare" / "data"
    data.mkdir(parents=True)
    (data / "calib.txt").write_text(TEXT)
    model = make_tiny_llama(vocab=len(embedded_tokenizer), layers=2)
    quantize_linears(model, SCHEME)
    save_quantized(model, embedded_tokenizer, SCHEME, tmp_path / "artifacts" / "calibrate" / "model")
    return tmp_path


@pytest.mark.parametrize(("distributed", "train", "match"), [
    ({"processes": 2, "strategy": "fsdp"}, {}, r"e2e\.distributed\.strategy='fsdp' needs CUDA GPUs"),
    ({"processes": 0}, {}, r"e2e\.distributed\.processes=0 must be"),
    ({"strategy": "zero"}, {}, r"e2e\.distributed\.strategy='zero' is not accepted"),
    ({"processes": 3}, {"batch_size": 4},
     r"e2e: 8 training samples over 3 process\(es\) \(e2e\.distributed\.processes\) make no full step of "
     r"e2e\.train\.batch_size x grad_accum = 4 x 1 per process"),
])
def test_bad_distributed_params_fail_before_launch_or_load(project, monkeypatch, capsys, distributed, train, match):
    """`python -m tasks.e2e` with bad values: one error line, exit 2, a FAILED MLflow run; no
    process launched and no model loaded."""
    import mlflow

    from tasks import common, e2e

    params = _params(distributed=distributed, train={"epochs": 1, "batch_size": 2, **train})
    monkeypatch.setattr(common, "load_params", lambda *a, **k: params)
    monkeypatch.setattr(e2e, "load_quantized", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(launch, "relaunch", lambda *a, **k: pytest.fail("processes were launched"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.setenv("QUANT_EXPERIMENT", "test-launch")
    monkeypatch.delenv("QUANT_PARENT_RUN_ID", raising=False)
    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as exited:
        launch.stage_entry("e2e", "tasks.e2e", e2e.run, e2e.launch_processes)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert re.search(match, err), err[-2000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test-launch").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (project / "artifacts" / "e2e").exists()


def test_several_processes_relaunch_and_one_runs_here(project, monkeypatch):
    from tasks import common, e2e

    calls = []
    monkeypatch.setattr(launch, "relaunch", lambda module, n: calls.append(("launch", module, n)))
    monkeypatch.setattr(common, "main", lambda stage, run: calls.append(("main", stage)))
    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)
    for n, expected in ((3, ("launch", "tasks.e2e", 3)), (1, ("main", "e2e"))):
        params = _params(distributed={"processes": n}, train={"epochs": 1, "batch_size": 1})
        monkeypatch.setattr(common, "load_params", lambda *a, p=params, **k: p)
        launch.stage_entry("e2e", "tasks.e2e", e2e.run, e2e.launch_processes)
        assert calls.pop() == expected
    # inside a launched process: rank 0 runs the stage with its MLflow run, never relaunches
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    launch.stage_entry("e2e", "tasks.e2e", e2e.run, e2e.launch_processes)
    assert calls == [("main", "e2e")]


def test_run_refuses_a_process_count_other_than_the_params(project):
    from tasks import e2e

    with pytest.raises(ConfigError, match=r"processes=2 gives 2 process\(es\) but this run has 1; start the "
                                          r"stage with `python -m tasks.e2e`"):
        e2e.run(_params(distributed={"processes": 2}))


# ---------------------------------------------------------------------------
# Through accelerate's launcher (gloo on the CPU)


def _cpu_env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


@pytest.mark.slow
def test_stage_two_process_ddp_through_its_own_command(project):
    """`python -m tasks.e2e` with processes 2 on the CPU: relaunched as two gloo DDP processes;
    trains, and rank 0 alone writes the model, the metrics and one MLflow run."""
    import mlflow

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(device="cpu", threads=1)
    params["e2e"].update(model="calibrate", data={"source": "calib", "train_samples": 8, "val_samples": 3,
                                                 "seq_len": 32},
                         train={"epochs": 2, "batch_size": 2, "log_every": 1, "save_every": 1},
                         steps=[{"e2e-qp": {"lr": 1e-3}}], distributed={"processes": 2, "strategy": "ddp"})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = _cpu_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", QUANT_EXPERIMENT="test-ddp")
    env.pop("QUANT_PARENT_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "tasks.e2e"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "launching 2 processes" in proc.stderr
    metrics = json.loads((project / "metrics" / "e2e.json").read_text())
    assert (metrics["processes"], metrics["strategy"], metrics["global_batch"]) == (2, "ddp", 4)
    assert metrics["steps"] == 4  # 2 epochs x 8 samples / (2 per process x 2 processes)
    assert metrics["val_loss"] < metrics["val_loss_before"]
    out = project / "artifacts" / "e2e" / "model"
    assert json.loads((out / "quantization.json").read_text())["method"].endswith("e2e-qp")
    assert [p.name for p in (project / "artifacts" / "e2e").iterdir()] == ["model"]  # no temporaries
    assert not (project / ".state" / "e2e").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test-ddp").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("e2e", "FINISHED")]
    assert runs[0].data.metrics["processes"] == 2


@pytest.mark.slow
def test_a_failure_inside_the_processes_keeps_its_exit_status(project, embedded_tokenizer):
    """KD with lr 1e30 diverges in both DDP processes at the same step (the logged loss is
    averaged over processes): the stage exits 2 like a one-process run, its run is FAILED
    and nothing is written."""
    import mlflow

    teacher = project / "artifacts" / "prepare" / "model"
    make_tiny_llama(vocab=len(embedded_tokenizer), layers=2).save_pretrained(teacher)
    embedded_tokenizer.save_pretrained(teacher)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(device="cpu", threads=1)
    params["e2e"].update(steps=[{"kd": {"lr": 1e30}}], model="calibrate",
                         data={"source": "calib", "train_samples": 8, "val_samples": 0, "seq_len": 32},
                         train={"epochs": 1, "batch_size": 1, "log_every": 1, "save_every": 2},
                         distributed={"processes": 2, "strategy": "ddp"})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = _cpu_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", QUANT_EXPERIMENT="test-fail")
    env.pop("QUANT_PARENT_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "tasks.e2e"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert re.search(r"^error: e2e: training diverged at step 2: loss (nan|inf)", proc.stderr, re.M), \
        proc.stderr[-3000:]
    assert not (project / "artifacts" / "e2e").exists() and not (project / "metrics" / "e2e.json").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test-fail").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def _launch_worker(tmp_path: Path, strategy: str, device: str, env: dict[str, str]) -> dict:
    from tests.quant.e2e.test_kd import _peaky_tiny_llama, save_teacher

    teacher = tmp_path / "teacher"
    if not teacher.exists():
        save_teacher(_peaky_tiny_llama(), teacher)
    out = tmp_path / f"{strategy}-{device}.json"
    cmd = [*launch.LAUNCHER, *launch.launcher_args(2, ["-m", "tests.dist_worker", str(teacher),
                                                         str(tmp_path / f"work-{strategy}"), str(out), strategy,
                                                         device])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _check_resumed(r: dict, sharded: bool) -> None:
    assert (r["world"], r["sharded"]) == (2, sharded)
    assert r["killed_steps"] == ["step-000002"]  # killed after its second saved step
    per_rank = {"rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors", "trainer.json"}
    if sharded:  # each process wrote its own shards (safetensors, no pickle)
        assert per_rank <= set(r["step_files"]) and not {"trainable.safetensors"} & set(r["step_files"])
        shards = [f for f in r["step_files"] if f.startswith("shards/")]
        assert len(shards) == 2 and all(f.endswith(".safetensors") for f in shards), r["step_files"]
    else:
        assert set(r["step_files"]) == per_rank | {"trainable.safetensors", "optimizer.safetensors"}
    assert (r["resumed_from"], r["steps"]) == (2, 8)
    assert r["val_loss_after"] < r["val_loss_before"]
    assert r["max_diff_resumed_vs_ref"] == 0.0, r  # the resumed run ends where the uninterrupted one does
    assert r["resumed_val_loss_after"] == r["val_loss_after"]
    assert {"model.safetensors", "qparams.safetensors", "quantization.json"} <= set(r["saved_files"])


@pytest.mark.slow
def test_ddp_and_fsdp2_resume_through_the_launcher_on_gloo(tmp_path):
    """Two processes each: DDP, and FSDP2 through accelerate's prepare on gloo (the stand-in for
    GPUs, see tests/dist_worker.py): killed after a saved step, resumed, bitwise equal to an
    uninterrupted run; sharded parameters; the gathered model saves; DDP == FSDP up to rounding."""
    ddp = _launch_worker(tmp_path, "ddp", "cpu", _cpu_env())
    _check_resumed(ddp, sharded=False)
    assert ddp["backend"] == "gloo" and ddp["param_types"] == ["Parameter"]
    fsdp = _launch_worker(tmp_path, "fsdp", "cpu", _cpu_env())
    _check_resumed(fsdp, sharded=True)
    assert fsdp["param_types"] == ["DTensor"]
    for key in ("norm_weight", "q_proj_row0"):
        torch.testing.assert_close(torch.tensor(fsdp[key]), torch.tensor(ddp[key]), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# GPUs (two or more)

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.gpu
@two_gpus
def test_fsdp2_on_two_gpus_resumes_and_matches_ddp(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "0,1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    ddp = _launch_worker(tmp_path, "ddp", "cuda", env)
    fsdp = _launch_worker(tmp_path, "fsdp", "cuda", env)
    for r, sharded in ((ddp, False), (fsdp, True)):
        assert (r["world"], r["sharded"], r["backend"]) == (2, sharded, "nccl")
        assert r["killed_steps"] == ["step-000002"] and (r["resumed_from"], r["steps"]) == (2, 8)
        assert r["val_loss_after"] < r["val_loss_before"]
        assert r["max_diff_resumed_vs_ref"] <= 1e-5, r  # deterministic kernels (tests/dist_worker.py)
        assert {"model.safetensors", "qparams.safetensors"} <= set(r["saved_files"])
    assert fsdp["param_types"] == ["DTensor"]
    for key in ("norm_weight", "q_proj_row0"):  # bf16 compute: the same training up to rounding
        torch.testing.assert_close(torch.tensor(fsdp[key]), torch.tensor(ddp[key]), rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@two_gpus
def test_stage_kd_fsdp_on_two_gpus(project, embedded_tokenizer):
    """`python -m tasks.e2e` with KD, FSDP over 2 GPUs: the student sharded, the teacher
    replicated, the gathered model saved by rank 0."""
    teacher = project / "artifacts" / "prepare" / "model"
    make_tiny_llama(vocab=len(embedded_tokenizer), layers=2).save_pretrained(teacher)
    embedded_tokenizer.save_pretrained(teacher)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(device="auto")
    params["e2e"].update(method="kd", model="calibrate",
                         data={"source": "calib", "train_samples": 8, "val_samples": 3, "seq_len": 32},
                         train={"epochs": 1, "batch_size": 2, "log_every": 1, "save_every": 1},
                         steps=[{"e2e-qp": {"lr": 1e-4}}], distributed={"processes": 2, "strategy": "fsdp"})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "0,1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "QUANT_EXPERIMENT": "test-fsdp"}
    proc = subprocess.run([sys.executable, "-m", "tasks.e2e"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((project / "metrics" / "e2e.json").read_text())
    assert (metrics["processes"], metrics["strategy"], metrics["steps"]) == (2, "fsdp", 2)
    assert metrics["val_loss"] < metrics["val_loss_before"]
    assert (project / "artifacts" / "e2e" / "model" / "model.safetensors").exists()
