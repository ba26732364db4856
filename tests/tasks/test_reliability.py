"""Reliability: bad params, corrupt inputs, faults and divergence, each a one-line error (exit 2)
or a handled outcome. Every test here failed on the code before these checks existed; where
that is not obvious from the assertion, the docstring says what the old code did. The same
cases, run as stage processes against both codes, are scripts/reliability_catalogue.py
(results in docs/results/reliability.json)."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from quant.config import ALLOW_NONFINITE, Config, ConfigError, InputError, TrainingDivergedError
from tasks import common

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def repo_params(**updates) -> common.Params:
    """The repository's params.yaml with dotted `updates`, loaded as a stage loads it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in updates.items():
        *path, last = dotted.split(".")
        node = params
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return common.Params(common.BaseParams.from_dict(params["base"], "base"),
                         common.ModelParams.from_dict(params["model"], "model"),
                         common.QuantScheme.from_dict(params["scheme"], "scheme"),
                         {k: v for k, v in params.items() if k not in common.SHARED_SECTIONS})


# ---------------------------------------------------------------------------
# Params: no value that cannot be finite


@pytest.mark.parametrize(("updates", "field"), [
    ({"e2e.train.max_grad_norm": math.nan}, "e2e.train.max_grad_norm"),
    ({"e2e.train.weight_decay": math.inf}, "e2e.train.weight_decay"),
    ({"e2e.steps": [{"kd": {"temperature": math.nan}}]}, "e2e.steps[0].kd.temperature"),
    ({"e2e.steps": [{"e2e-qp": {"kd_temperature": -math.inf}}]}, "e2e.steps[0].e2e-qp.kd_temperature"),
    ({"synthesize.top_p": math.nan}, "synthesize.top_p"),
    ({"merge.val_fraction": math.nan}, "merge.val_fraction"),
    ({"calibrate.steps": [{"rtn": {"clip_ratio": math.nan}}]}, "calibrate.steps[0].rtn.clip_ratio"),
    ({"register.gates.max_ppl_ratio": math.inf}, "register.gates.max_ppl_ratio"),
])
def test_non_finite_floats_are_refused_naming_the_field(updates, field):
    """The old code accepted each of these (a nan max_grad_norm trained, an inf gate passed
    everything): only some fields compared against bounds, and nan passes no comparison's
    `raise` branch written as `if x < 0`."""
    from tasks.params_check import check_params

    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}=-?(nan|inf) is not accepted; use a finite number"):
        check_params(repo_params(**updates))


def test_a_field_may_accept_non_finite_values_when_it_says_so():
    @dataclass(frozen=True)
    class Bounds(Config):
        limit: float = field(default=1.0, metadata={ALLOW_NONFINITE: True})
        other: float = 1.0

    assert Bounds.from_dict({"limit": math.inf}).limit == math.inf
    with pytest.raises(ConfigError, match=r"^b\.other=nan is not accepted"):
        Bounds.from_dict({"other": math.nan}, "b")


# ---------------------------------------------------------------------------
# Divergence: the result is judged, not only its finiteness


def _e2e_qp(model, lr):
    from quant.calibrate.rtn import quantize_linears
    from quant.config.scheme import QuantScheme
    from quant.e2e.trainer import E2EContext
    from quant.methods import method

    scheme = QuantScheme.from_name("W4A16KV16", preset="efficientqat", group_size=32)
    quantize_linears(model, scheme)
    entry = method("e2e-qp", "e2e")
    return entry.fn(model, entry.options.from_dict({"lr": lr}), E2EContext(scheme, torch.device("cpu"),
                                                                             torch.float32))


def _ids(n, length=32, seed=1):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _far_worse(model):
    """lr 100 on the RMSNorm weights: every loss finite, the validation loss 5.6 -> 17."""
    from tests.quant.e2e.test_train import _norm_objective

    return _norm_objective(model, 100.0)


def test_e2e_fails_when_training_makes_the_model_far_worse(tiny_llama, tmp_path):
    """Every loss stays finite, the validation loss ends far above where it started. The old
    trainer returned normally (and the stage wrote the model, exit 0)."""
    from quant.e2e.trainer import TrainConfig, Trainer

    cfg = TrainConfig.from_dict({"epochs": 1, "batch_size": 2, "log_every": 1, "save_every": 0,
                                 "grad_checkpointing": False}, "e2e.train")
    trainer = Trainer(tiny_llama, _far_worse(tiny_llama), cfg, tmp_path, seed=0)
    with pytest.raises(TrainingDivergedError, match=r"^e2e: training made the model far worse: validation loss "
                                                    r"[\d.]+ -> [\d.]+ \(perplexity x.* > "
                                                    r"e2e\.train\.max_val_ppl_ratio=2\.0\); nothing was written"):
        trainer.fit({"input_ids": _ids(8)}, {"input_ids": _ids(4, seed=2)})
    assert issubclass(TrainingDivergedError, ConfigError)  # main(): one line, exit 2, not retried


def test_e2e_judge_without_validation_rows_uses_the_training_loss(tiny_llama, tmp_path):
    from quant.e2e.trainer import TrainConfig, Trainer

    cfg = TrainConfig.from_dict({"epochs": 1, "batch_size": 2, "log_every": 1, "save_every": 0,
                                 "grad_checkpointing": False}, "e2e.train")
    with pytest.raises(TrainingDivergedError, match=r"training loss [\d.]+ -> [\d.]+"):
        Trainer(tiny_llama, _far_worse(tiny_llama), cfg, tmp_path, seed=0).fit({"input_ids": _ids(8)})


def test_e2e_judge_can_be_turned_off_and_has_a_checked_bound(tiny_llama, tmp_path):
    from quant.e2e.trainer import TrainConfig, Trainer

    cfg = TrainConfig.from_dict({"epochs": 1, "batch_size": 2, "log_every": 1, "save_every": 0,
                                 "grad_checkpointing": False, "max_val_ppl_ratio": None}, "e2e.train")
    result = Trainer(tiny_llama, _far_worse(tiny_llama), cfg, tmp_path, seed=0).fit(
        {"input_ids": _ids(8)}, {"input_ids": _ids(4, seed=2)})
    assert result.val_loss_after - result.val_loss_before > math.log(2)  # what the judge refuses by default
    with pytest.raises(ConfigError, match=r"^e2e\.train\.max_val_ppl_ratio=1\.0 must be > 1"):
        TrainConfig.from_dict({"max_val_ppl_ratio": 1.0}, "e2e.train")


def test_block_diverged_error_exits_2_like_e2e():
    """BlockDivergedError was a RuntimeError: a traceback and exit 1, which the flow retried."""
    from quant.blockwise.engine import BlockDivergedError
    from quant.e2e.trainer import NonFiniteLossError

    assert issubclass(BlockDivergedError, TrainingDivergedError)
    assert issubclass(NonFiniteLossError, TrainingDivergedError)


def test_register_refuses_a_model_far_worse_than_its_baseline():
    from tasks.register import RegisterConfig, check_baseline

    cfg = RegisterConfig()
    ok = {"ppl": {"lee": 30.0, "wiki": 20.0}, "baseline_ppl": {"lee": 28.0, "wiki": 19.0}}
    check_baseline(ok, cfg)
    bad = {"ppl": {"lee": 30.0, "wiki": 400.0}, "baseline_ppl": {"lee": 28.0, "wiki": 19.0}}
    with pytest.raises(ConfigError, match=r"^register: the evaluated model's PPL on wiki is 400, 21.1 times its "
                                          r"baseline's 19 \(more than register\.max_baseline_ppl_ratio=2\.0\)"):
        check_baseline(bad, cfg)
    with pytest.raises(ConfigError, match=r"has no baseline_ppl"):
        check_baseline({"ppl": {"lee": 30.0}}, cfg)
    check_baseline(bad, RegisterConfig.from_dict({"max_baseline_ppl_ratio": None}))


def test_evaluate_writes_the_baseline_ppl_from_the_scores_it_has(monkeypatch, tmp_path):
    """The model training started from (evaluate.baseline) is scored once: reused when it is
    the evaluated or a compared model, else scored for PPL only."""
    from tasks import evaluate as ev

    texts = {"lee": "x", "wiki": "y"}
    res = lambda v: {"ppl": {t: {"ppl": v + i} for i, t in enumerate(texts)}}  # noqa: E731
    results = {"e2e q": res(10.0), "calibrate rtn W4g64": res(20.0)}
    compare = {"calibrate": tmp_path / "calibrate"}
    monkeypatch.setattr(ev, "_label", lambda stage, d: f"{stage} rtn W4g64")
    cfg = ev.EvaluateConfig.from_dict({"model": "e2e", "tasks": []}, "evaluate")
    assert ev._baseline_ppl(cfg, compare, results, "e2e q", tmp_path, texts, "cpu", None, tmp_path) == \
        {"lee": 20.0, "wiki": 21.0}
    same = ev.EvaluateConfig.from_dict({"model": "calibrate", "tasks": []}, "evaluate")
    assert ev._baseline_ppl(same, {}, results, "e2e q", tmp_path, texts, "cpu", None, tmp_path)["lee"] == 10.0
    seen = {}

    def scored(model_dir, texts_, cfg_, *a):
        seen["tasks"] = cfg_.tasks
        return res(30.0)

    monkeypatch.setattr(ev, "scored_model", scored)
    with_tasks = ev.EvaluateConfig.from_dict({"model": "e2e", "tasks": ["piqa"]}, "evaluate")
    assert ev._baseline_ppl(with_tasks, {}, results, "e2e q", tmp_path, texts, "cpu", None, tmp_path)["wiki"] == 31.0
    assert seen["tasks"] == ()  # PPL only


# ---------------------------------------------------------------------------
# Corrupt inputs: one checked reader per kind, an InputError naming the file


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tests.tasks.test_synth import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tokenizer_files_name_the_directory(model_dir, tmp_path):
    """transformers said "install sentencepiece or tiktoken", naming no file."""
    from quant.checkpoint import load_tokenizer
    from quant.load import load_model

    d = copy_of(model_dir, tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    for load in (load_tokenizer, load_model):
        with pytest.raises(InputError, match=rf"^{d} holds no tokenizer \(none of \['tokenizer.json'"):
            load(d)


def test_quantization_json_that_is_not_utf8_names_the_file(model_dir, tmp_path):
    """read_scheme raised UnicodeDecodeError (e2e and convert read it before any check)."""
    from quant.checkpoint import read_scheme, read_steps

    d = copy_of(model_dir, tmp_path / "m")
    (d / "quantization.json").write_bytes(b"\xff\xfe{\x00")
    for read in (read_scheme, read_steps):
        with pytest.raises(InputError, match=rf"^{d / 'quantization.json'} is not valid UTF-8 JSON"):
            read(d)
    (d / "quantization.json").write_text("{}")  # JSON, but no scheme: a KeyError before
    with pytest.raises(InputError, match=r"must hold a JSON object with a 'scheme' mapping"):
        read_scheme(d)


def test_packed_export_without_its_quantization_config_names_config_json(model_dir, tmp_path):
    """A convert output whose config.json lost `quantization_config` was read as this project's
    format and failed with FileNotFoundError on qparams.safetensors (the wrong file)."""
    from quant.load import load_model

    d = copy_of(model_dir, tmp_path / "m")
    (d / "quantization.json").write_text(json.dumps({"scheme": {"weight": {"format": "int4"}},
                                                     "format": "compressed-tensors"}))
    with pytest.raises(InputError, match=rf"^{d / 'config.json'} has no quantization_config, but "
                                         rf"{d / 'quantization.json'} says this is a packed 'compressed-tensors'"):
        load_model(d)


def test_quantized_checkpoint_without_qparams_names_the_file(model_dir, tmp_path):
    from quant.checkpoint import load_quantized

    d = copy_of(model_dir, tmp_path / "m")
    (d / "quantization.json").write_text(json.dumps({"scheme": {"weight": {"format": "int4"}},
                                                     "layers": ["model.layers.0.mlp.up_proj"]}))
    with pytest.raises(InputError, match=rf"^{d / 'qparams.safetensors'} not found"):
        load_quantized(d)


@pytest.mark.parametrize(("tensor", "message"), [
    (None, r"is not a readable safetensors file"),
    (torch.randint(3, 256, (8, 16)).float(), r"'input_ids' is float32; token ids must be integers"),
    (torch.randint(3, 256, (128,)), r"'input_ids' has shape \(128,\); expected \[rows, seq_len\] \(2-D\)"),
    (torch.full((8, 16), 300), r"'input_ids' holds token id 300, outside the model's vocabulary \[0, 256\)"),
    (torch.full((8, 16), -1), r"holds token id -1"),
])
def test_training_ids_are_checked_naming_the_file(tmp_path, tensor, message):
    """Old: garbage -> SafetensorError, id 300 -> IndexError inside the embedding, float32 ->
    silently cast, 1-D -> blamed on seq_len without naming the file."""
    from quant.data import read_token_file

    f = tmp_path / "train.safetensors"
    if tensor is None:
        f.write_bytes(b"garbage" * 50)
    else:
        save_file({"input_ids": tensor.contiguous()}, str(f))
    with pytest.raises(InputError, match=rf"^{f}(:| ).*{message}"):
        read_token_file(f, 256)


def test_good_training_ids_pass(tmp_path):
    from quant.data import read_token_file

    f = tmp_path / "train.safetensors"
    save_file({"input_ids": torch.randint(0, 256, (8, 16), dtype=torch.int32)}, str(f))
    assert read_token_file(f, 256)["input_ids"].shape == (8, 16)


def test_text_that_is_not_utf8_names_the_file(tmp_path):
    from quant.data import read_text

    f = tmp_path / "calib.txt"
    f.write_bytes(b"abc \xff\xfe def")
    with pytest.raises(InputError, match=rf"^{f} is not UTF-8 text \(invalid start byte at byte 4\)"):
        read_text(f)


def _trainer(model, work):
    from quant.e2e.trainer import TrainConfig, Trainer

    cfg = TrainConfig.from_dict({"epochs": 1, "batch_size": 2, "log_every": 1, "grad_checkpointing": False},
                                "e2e.train")
    return Trainer(model, _e2e_qp(model, 1e-5), cfg, work, seed=0)


@pytest.mark.parametrize(("files", "message"), [
    ({"latest": "step-000001", "step-000001/trainer.json": "{garbage"}, r"step-000001/trainer.json: the saved e2e"),
    ({"latest": "step-000009"}, r"latest: the saved e2e step cannot be read \(it names 'step-000009'"),
    ({"latest": "step-000001", "step-000001/trainer.json": '{"step": 1, "fingerprint": "", "scheduler": {}, '
                                                           '"history": []}',
      "step-000001/trainable.safetensors": "garbage"}, r"trainable.safetensors: the saved e2e step"),
])
def test_a_garbage_saved_e2e_step_names_the_file(tiny_llama, tmp_path, files, message):
    """Old: JSONDecodeError / FileNotFoundError / SafetensorError tracebacks."""
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(content)
    with pytest.raises(InputError, match=rf"{message}.*delete {tmp_path} to start the e2e stage over"):
        _trainer(tiny_llama, tmp_path).fit({"input_ids": _ids(8)})


def test_garbage_block_wise_state_names_the_file(tiny_llama, tmp_path):
    from quant.blockwise.engine import BlockwiseContext
    from quant.calibrate.rtn import quantize_linears
    from quant.methods import method
    from tests.quant.blockwise.test_block_ap import SCHEME, BlockAP

    quantize_linears(tiny_llama, SCHEME)
    work = tmp_path / "work"
    work.mkdir()
    (work / "state.json").write_text("{")
    opts = method("block-ap", "blockwise").options.from_dict({"epochs": 1, "batch_size": 2})
    runner = BlockAP(tiny_llama, _ids(4), _ids(2, seed=2), opts,
                     BlockwiseContext(torch.device("cpu"), work, fingerprint="t"), SCHEME.weight.bits)
    runner.capture()
    with pytest.raises(InputError, match=rf"^{work / 'state.json'}: the saved block-wise state cannot be read"):
        runner.resume()


# ---------------------------------------------------------------------------
# Windows and samples against the model and the machine


def test_windows_longer_than_the_context_are_refused():
    from quant.data import check_windows

    with pytest.raises(ConfigError, match=r"^calibrate\.seq_len=100000 is longer than the model's context \(8192 "
                                          r"tokens, max_position_embeddings\); use at most 8192$"):
        check_windows(4, 100_000, 8192, "calibrate.samples", "calibrate.seq_len", room=1 << 40)


def test_windows_that_do_not_fit_in_memory_are_refused():
    from quant.data import check_windows

    with pytest.raises(ConfigError, match=r"^calibrate\.samples x calibrate\.seq_len = 1000000000 x 512 token ids "
                                          r"need 3\.81e\+03 GiB of host memory; 16 GiB is available"):
        check_windows(10**9, 512, 8192, "calibrate.samples", "calibrate.seq_len", room=16 << 30)
    check_windows(128, 512, 8192, "calibrate.samples", "calibrate.seq_len", room=16 << 30)


def test_calibrate_makes_no_windows_for_steps_that_use_none():
    """RTN with calibrate.samples 1e9 ended in MemoryError: the stage sampled windows nobody read."""
    from quant.recipe import Step
    from tasks.calibrate import uses_data

    assert not uses_data((Step("rtn"),)) and not uses_data((Step("quarot"), Step("rtn")))
    assert uses_data((Step("awq"),)) and uses_data((Step("gptq"),)) and uses_data((Step("fp-search"),))


# ---------------------------------------------------------------------------
# No params value reaches a shell; every entry path checks every param


def test_no_dvc_command_interpolates_a_value():
    """`cmd: python -m tasks.synthesize ${item}` ran `synthesize.shards: [0, "1; touch /tmp/x #"]`'s
    `touch` in DVC's shell."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    cmds = {name: s.get("do", s)["cmd"] for name, s in stages.items()}
    assert {n: c for n, c in cmds.items() if "$" in c} == {}


def test_synthesize_takes_its_shard_from_dvc_stage():
    from tasks.synthesize import shard_from_argv

    assert shard_from_argv([], {"DVC_STAGE": "synthesize@3"}) == 3
    assert shard_from_argv(["2"], {"DVC_STAGE": "synthesize@3"}) == 2  # by hand: the argument
    for bad in ("synthesize@1; touch /tmp/x #", "synthesize@0/../../x", "synthesize@-1", "prepare@0", "synthesize"):
        with pytest.raises(ConfigError, match=r"^DVC_STAGE=.*is not a shard index"):
            shard_from_argv([], {"DVC_STAGE": bad})


def test_a_shard_item_with_shell_code_never_runs_it(tmp_path):
    """The real dvc.yaml, `dvc repro` of the item `1; touch <marker> #`: the old command line
    ran the `touch`. Now the stage exits 2 naming synthesize.shards, and no shell saw the item."""
    from tests.tasks.test_hardening import copy_repo, set_params

    marker = tmp_path / "PWNED"
    work = copy_repo(tmp_path / "repo")
    (work / "artifacts" / "prepare" / "model").mkdir(parents=True)  # the stage's data dep, for DVC
    (work / "artifacts" / "prepare" / "model" / "config.json").write_text("{}")
    set_params(work, {"synthesize.shards": [0, f"1; touch {marker} #"]})
    env = {**os.environ, "PYTHONPATH": str(work), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    r = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", f"synthesize@1; touch {marker} #"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and not marker.exists(), r.stdout[-2000:] + r.stderr[-2000:]
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "synthesize.shards" in errors[0], r.stdout[-2000:] + r.stderr[-2000:]


def test_make_passes_values_to_commands_without_a_shell_or_make_expanding_them(tmp_path):
    """`make flow-run S="..."` pasted S into the recipe line (a quote ended the quoting) and make
    expanded `$(shell ...)` in any command-line value it exported."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    echo = tmp_path / "echo_args.py"
    echo.write_text("import sys, json; print(json.dumps(sys.argv[1:]))\n")
    marker = tmp_path / "PWNED"
    evil = f"a=1'; touch {marker}; ' $(shell touch {marker}) `touch {marker}` $$(touch {marker})"

    def make(*args: str) -> list[str]:
        r = subprocess.run(["make", "-s", "-o", "setup", *args, f"PY={sys.executable} {echo}", "SERVER_ENV=true",
                            "SERVERS=false"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    assert make("flow-run", f"S={evil}", f"T={evil}")[4::2] == [evil, evil]
    assert make("promote", f"VERSION={evil}")[-1] == evil
    assert make("sweep", f"GRID={evil}", "S=a=1 b=2")[-5:] == [evil, "-S", "a=1", "-S", "b=2"]
    assert not marker.exists()


def test_every_stage_checks_every_section_before_it_starts(tmp_path):
    """A bad synthesize.shards failed only the synthesize stage (after DVC had run its command);
    calibrate ran on. Now the first stage that runs refuses it, before any work."""
    work = tmp_path / "work"
    work.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synthesize"]["shards"] = [0, "1; touch x #"]
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    r = subprocess.run([sys.executable, "-m", "tasks.calibrate"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=600)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "synthesize.shards" in errors[0], r.stderr[-3000:]
    assert not (work / "artifacts").exists() or not any((work / "artifacts").rglob("*.safetensors"))


def test_the_flow_checks_params_yaml_even_without_overrides(tmp_path):
    """resolve_overrides checked only the sections an override touched: a flow run without
    overrides handed a bad params.yaml straight to DVC."""
    from flows import dvc_stages

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synthesize"]["shards"] = [0, "0/../../../mlflow"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(dvc_stages.OverrideError, match=r"^params\.yaml rejected: synthesize\.shards"):
        dvc_stages.resolve_overrides(tmp_path, [])
    with pytest.raises(dvc_stages.OverrideError, match=r"^overrides rejected by the params checks: e2e\.train"):
        dvc_stages.resolve_overrides(tmp_path, ["synthesize.shards=[0,1]", "e2e.train.max_grad_norm=.inf"])


def test_the_sweep_checks_the_synthesize_section(tmp_path):
    """A verification, not a fix: the sweep's grid check already ran check_params on every
    section (this test passes on the old code too); it stays so that it keeps doing so."""
    from flows import sweep

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sweep"]["grids"]["smoke"]["base"] = {**params["sweep"]["grids"]["smoke"].get("base", {}),
                                                 "synthesize.shards": [0, "1; touch x #"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"synthesize\.shards"):
        sweep.load_grid(tmp_path, "smoke", [])


# ---------------------------------------------------------------------------
# Faults: signals, stores, unwritable paths, leaks

STAGE = """
import signal, sys, time
from pathlib import Path
from tasks import common
from quant.config import ConfigError

def run(params):
    mode = sys.argv[1]
    if mode == "native":  # SIGTERM lands in another thread: the main thread stays in native code
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        from quant.io import atomic_dir
        with atomic_dir(common.stage_dir("calibrate") / "model") as tmp:
            Path("started").write_text("1")
            time.sleep(120)
    if mode == "bar":
        from tqdm import tqdm
        bar = tqdm(total=100, desc="work", file=sys.stderr, mininterval=0)
        for _ in range(30):
            bar.update(1)
        raise ConfigError("work.thing=3 is not accepted")
    if mode == "readonly":
        raise PermissionError(1, "Operation not permitted", "artifacts/calibrate/.model.tmp-1-x")
    if mode == "sleep":
        Path("started").write_text("1")
        time.sleep(120)
    return {}

common.main(sys.argv[2] if len(sys.argv) > 2 else "calibrate", run)
"""


def fake_stage(tmp_path: Path, *args: str, **kw) -> subprocess.Popen:
    from tests.tasks.test_hardening import stage_env, workdir_with_params

    work = tmp_path / "work"
    if not work.exists():
        work = workdir_with_params(tmp_path)
    (work / "stage.py").write_text(STAGE)
    return subprocess.Popen([sys.executable, "stage.py", *args], cwd=work, env=stage_env(tmp_path),
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield mlflow.MlflowClient(tracking_uri=uri)


def stage_runs(client, stage=None):
    exp = client.get_experiment_by_name("hardening")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return [r for r in runs if stage is None or r.data.tags.get("stage") == stage]


def test_sigterm_ends_a_stage_stuck_in_native_code_within_10_seconds(tmp_path, store):
    """The main thread blocked in native code never ran the Python handler: the old stage
    stayed alive (and RUNNING) until SIGKILL."""
    import signal
    import time

    from tests.tasks.test_hardening import wait_for

    p = fake_stage(tmp_path, "native")
    wait_for(tmp_path / "work" / "started")
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the stage was still alive 10 s after SIGTERM")
    assert p.returncode == 143 and time.time() - t0 < 10, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "stopped by SIGTERM" in errors[0] and "Traceback" not in err, err
    (run,) = stage_runs(store, "calibrate")
    assert run.info.status == "FAILED" and "SIGTERM" in run.data.tags["error"]
    assert list((tmp_path / "work" / "artifacts" / "calibrate").iterdir()) == []  # its temporary removed


def test_the_error_line_after_a_progress_bar_starts_its_own_line(tmp_path, store):
    """It was glued to the bar's last update (`...30/100 [00:00<...]error: ...`)."""
    p = fake_stage(tmp_path, "bar")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err
    assert [ln for ln in err.splitlines() if "error: " in ln] == ["error: work.thing=3 is not accepted"], err


def test_print_error_adds_a_newline_only_after_an_unfinished_line(monkeypatch):
    out = io.StringIO()
    tracked = common._LastChar(out)
    monkeypatch.setattr(sys, "stderr", tracked)
    common.print_error("a")
    tracked.write("\rbar 50%")
    common.print_error("b")
    assert out.getvalue() == "error: a\n\rbar 50%\nerror: b\n"


def test_an_unwritable_path_is_one_error_line(tmp_path, store):
    """A PermissionError from the output directory was a traceback (exit 1, retried by the flow)."""
    p = fake_stage(tmp_path, "readonly")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: calibrate: artifacts/calibrate/.model.tmp-1-x: permission denied (Operation not "
                      "permitted); the stage cannot write or read there: free space or fix the permissions of "
                      "that path and run it again"], err


def test_an_mlflow_store_on_a_full_disk_is_one_error_line(tmp_path):
    """The sqlite store cannot grow (RLIMIT_FSIZE: EFBIG, what a full disk gives): four chained
    SQLAlchemy tracebacks, exit 1."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    p = fake_stage(tmp_path, "sleep-not", preexec_fn=small_files)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: the MLflow store {tmp_path / 'mlflow.db'} cannot be "
                                                     "used: "), err[-3000:]


def test_a_killed_run_of_any_stage_is_failed_when_the_next_stage_starts(tmp_path, store):
    """Only a later run of the *same* stage ended it: a SIGKILLed e2e stayed RUNNING while the
    pipeline moved on."""
    from tests.tasks.test_hardening import wait_for

    p = fake_stage(tmp_path, "sleep", "e2e")
    wait_for(tmp_path / "work" / "started")
    p.kill()
    p.wait()
    q = fake_stage(tmp_path, "ok", "evaluate")
    q.communicate(timeout=300)
    (killed,) = stage_runs(store, "e2e")
    assert killed.info.status == "FAILED" and "ended without closing this run" in killed.data.tags["error"]


def test_store_errors_read_as_one_line():
    from tasks.tracking import StoreError, store_error

    class OperationalError(Exception):
        __module__ = "sqlalchemy.exc"

        def __init__(self):
            super().__init__("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT ...]")
            self.orig = Exception("database or disk is full")

    try:
        try:
            raise OperationalError()
        except OperationalError as inner:
            raise RuntimeError("mlflow wrapper") from inner
    except RuntimeError as exc:
        err = store_error(exc, "sqlite:////x/mlflow.db")
    assert isinstance(err, StoreError) and isinstance(err, InputError)
    assert str(err).startswith("the MLflow store /x/mlflow.db cannot be used: database or disk is full;")


def test_a_published_shard_leaves_no_lock_file(tmp_path):
    from quant.synth.store import ShardWriter

    w = ShardWriter(tmp_path / "work" / "shard-0", {"x": 1})
    w.append([{"index": 0, "ids": [1, 2]}])
    w.publish(tmp_path / "shard-0", {"shard": 0})
    assert list((tmp_path / "work").iterdir()) == []  # the old writer left shard-0.lock here
    ShardWriter(tmp_path / "work" / "shard-0", {"x": 1}).close()  # and the next writer is not blocked


# ---------------------------------------------------------------------------
# Recovery that never deletes a good output


def toy_dvc_repo(root: Path) -> tuple[Path, dict[str, str]]:
    root.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    (root / "dvc.yaml").write_text("stages:\n  make:\n    cmd: mkdir -p out && echo good > out/model.txt\n"
                                   "    outs:\n      - out\n")
    for cmd in (["init", "--no-scm", "-q"], ["repro", "-q"]):
        subprocess.run([sys.executable, "-m", "dvc", *cmd], cwd=root, env=env, check=True, capture_output=True)
    return root, env


def recover(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "recover.py"), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_recover_keeps_a_good_output_that_dvc_checkout_deletes(tmp_path):
    """A wrong hash in dvc.lock: `dvc checkout` (the docs' old advice) deletes the good workspace
    output and fails; the recovery keeps it and says what to do."""
    repo, env = toy_dvc_repo(tmp_path / "a")
    lock = repo / "dvc.lock"
    lock.write_text(lock.read_text().replace("md5: ", "md5: 0000", 1))
    r = recover(repo, env)
    assert r.returncode == 1 and (repo / "out" / "model.txt").read_text() == "good\n"
    assert r.stdout.startswith("kept     out (make): differs from dvc.lock; kept as it is. `dvc commit make` "
                               "records it; dvc.lock's copy 0000"), r.stdout
    assert "is not in the cache, so `dvc checkout` would delete this one and fail" in r.stdout
    # what DVC itself does, which the docs warn about
    d = subprocess.run([sys.executable, "-m", "dvc", "checkout"], cwd=repo, env=env, capture_output=True, text=True)
    assert d.returncode != 0 and not (repo / "out").exists()


def test_recover_restores_what_the_cache_has_and_names_what_it_lacks(tmp_path):
    repo, env = toy_dvc_repo(tmp_path / "a")
    shutil.rmtree(repo / "out")
    r = recover(repo, env, "--check")
    assert r.returncode == 1 and r.stdout.startswith("restore  out (make): missing; dvc.lock's copy")
    assert not (repo / "out").exists()  # --check changes nothing
    r = recover(repo, env)
    assert r.returncode == 0 and r.stdout.startswith("restored out (make)")
    assert (repo / "out" / "model.txt").read_text() == "good\n"
    # a missing cache object: the workspace copy that matches dvc.lock is left alone
    shutil.rmtree(repo / ".dvc" / "cache")
    r = recover(repo, env)
    assert r.returncode == 0 and r.stdout.startswith("ok       out (make): matches dvc.lock")
    shutil.rmtree(repo / "out")  # and with the workspace copy gone too, nothing to restore from
    r = recover(repo, env)
    assert r.returncode == 1 and "is not in the cache: `dvc pull out` if a remote has it, else `dvc repro make`" \
        in r.stdout


@pytest.mark.slow
def test_sigterm_ends_every_process_of_a_launched_e2e_within_10_seconds(tmp_path, embedded_tokenizer):
    """Two DDP processes on gloo (CPU) and their launcher, SIGTERM to the process group as a
    terminal or a process manager sends it: all gone within 10 s, exit 143, the run FAILED.
    A guard, not a reproduction: the report of workers alive 30 s after printing the message
    (torchrun's kill timeout) was not reproduced here, and the old code passes this test on
    this machine (7-10 s, also with 4 processes, SIGTERM to the launcher only or to one
    worker). What closes the gap is `exit_now` (no interpreter teardown after a signal) and
    the watchdog (a worker stuck in a collective, tested above with a stage in native code)."""
    import signal
    import time

    import psutil

    from conftest import make_tiny_llama
    from quant.calibrate.rtn import quantize_linears
    from quant.checkpoint import save_quantized
    from tests.tasks.test_e2e_launch import SCHEME, TEXT, _cpu_env
    from tests.tasks.test_hardening import wait_for

    work = tmp_path / "p"
    (work / "artifacts" / "prepare" / "data").mkdir(parents=True)

    (work / "artifacts" / "prepare" / "data" / "calib.txt").write_text(TEXT)
    model = make_tiny_llama(vocab=len(embedded_tokenizer), layers=2)
    quantize_linears(model, SCHEME)
    save_quantized(model, embedded_tokenizer, SCHEME, work / "artifacts" / "calibrate" / "model")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(device="cpu", threads=1)
    params["e2e"].update(model="calibrate", data={"source": "calib", "train_samples": 8, "val_samples": 2,
                                                 "seq_len": 32},
                         train={"epochs": 1000, "batch_size": 2, "log_every": 1, "save_every": 1},
                         steps=[{"e2e-qp": {"lr": 1e-4}}], distributed={"processes": 2, "strategy": "ddp"})
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = _cpu_env(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", QUANT_EXPERIMENT="test-term")
    env.pop("QUANT_PARENT_RUN_ID", None)
    p = subprocess.Popen([sys.executable, "-m", "tasks.e2e"], cwd=work, env=env, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    wait_for(work / ".state" / "e2e" / "latest", 300)  # both processes are training
    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    assert len(procs) >= 3
    t0 = time.time()
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    gone, alive = psutil.wait_procs(procs, timeout=max(0.1, 10 - (time.time() - t0)))
    for q in alive:
        q.kill()
    assert not alive and time.time() - t0 < 10, f"alive after {time.time() - t0:.0f} s: {alive}"
    assert p.returncode == 143, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.startswith("error: ")], err[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test-term").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
