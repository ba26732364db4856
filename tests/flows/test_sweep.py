"""The recipe sweep (flows/sweep.py, flows/grid.py): grid expansion and bad grids, the
ranking text, gates / Pareto front / promotion on hand-made tables, resume of a half-finished
sweep (recipes faked), and one real tiny sweep through DVC experiments end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import grid as R
from quant.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _expand(grid, params):
    from flows.sweep import validate_params

    return R.expand(grid, params, "g", validate_params)


def test_grid_expands_to_the_cartesian_product_plus_explicit_recipes(params):
    grid = {"base": {"evaluate.tasks": []},
            "axes": {"scheme.weight.format": ["int4", "int3"], "scheme.weight.group_size": [64, 32]},
            "recipes": [{"scheme.weight.format": "int2", "block_ap.steps": [{"block-ap": {"weight_lr": 1e-5}}]}]}
    rs = _expand(grid, params)
    assert len(rs) == 5 and len({r.digest for r in rs}) == 5
    assert rs[0].overrides == ("evaluate.tasks=[]", "scheme.weight.format=int4", "scheme.weight.group_size=64")
    assert rs[0].name == "defaults"  # int4 g64 is params.yaml's own scheme; the base is common
    assert rs[1].name == "scheme.weight.group_size=32"
    assert rs[-1].effective["block_ap"]["steps"] == [{"block-ap": {"weight_lr": 1e-5}}]
    assert rs[-1].targets == ("register",)
    assert R.weight_bits(rs[-1].effective) == 2 and R.weight_bits(rs[0].effective) == 4


@pytest.mark.parametrize("grid, match", [
    ({"axes": {"scheme.weight.formt": ["int4"]}}, r"unknown knob 'scheme.weight.formt'"),
    ({"axes": {"recipe": ["rtn:W4g64", "omniquant:W4g64"]}}, r"'omniquant' is not a known method; known: \["),
    ({"axes": {"block_ap.steps": [["omniquant"]]}}, r"block_ap.steps\[0\]: 'omniquant' is not a known method"),
    ({"axes": {"calibrate.steps": [["tesseraq"]]}}, r"calibrate.steps\[0\]: 'tesseraq' is a blockwise step"),
    ({"axes": {"scheme.weight.format": ["int9"]}}, r"bits=9 is not supported"),
    ({"axes": {"scheme.weight.format": ["fp4-e2m1"]}}, r"block-ap trains and stores integer grids"),
    ({}, r"sweep.grids.g is empty"),
    ({"axes": {"calibrate.steps": []}}, r"axes.calibrate.steps must be a non-empty list"),
    ({"axis": {"calibrate.steps": [["rtn"]]}}, r"unknown key\(s\) \['axis'\]"),
    ({"recipes": [{"calibrate.steps": ["rtn"]}, {}]}, r"are the same after defaults"),
    ({"recipes": [{"recipe": "awq:W4g64", "calibrate.steps": ["rtn"]}]}, r"set what the recipe 'awq:W4g64' sets"),
    ({"recipes": [{"recipe": {"text": "rtn:W4g64", "opts": {}}}]}, r"recipe must be a text or \{text, options\}"),
])
def test_bad_grids_fail_before_any_recipe_runs(params, grid, match):
    with pytest.raises(ConfigError, match=match):
        _expand(grid, params)


def test_method_options_are_checked_by_the_method(params):
    ok = {"recipes": [{"calibrate.steps": [{"rtn": {"clip_ratio": 0.9}}]}]}
    assert _expand(ok, params)[0].effective["calibrate"]["steps"] == [{"rtn": {"clip_ratio": 0.9}}]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['calibrate.steps\[0\].rtn.clip'\]; accepted keys under "
                                          r"calibrate.steps\[0\].rtn"):
        _expand({"recipes": [{"calibrate.steps": [{"rtn": {"clip": 0.9}}]}]}, params)


def test_a_recipe_text_sets_the_scheme_and_every_stage(params):
    grid = {"axes": {"recipe": ["awq:W4g64", "awq+tesseraq+e2e-qp:W3g64",
                                {"text": "gptq:W4g64", "options": {"gptq": {"act_order": False}}}]}}
    rs = _expand(grid, params)
    assert [r.name for r in rs][:2] == ["recipe=awq:W4g64", "recipe=awq+tesseraq+e2e-qp:W3g64"]
    awq, tq, gptq = (r.effective for r in rs)
    assert (awq["calibrate"]["steps"], awq["block_ap"]["steps"], awq["e2e"]["steps"]) == (["awq"], [], [])
    assert tq["block_ap"]["steps"] == ["tesseraq"] and tq["scheme"]["weight"]["format"] == "int3"
    assert gptq["calibrate"]["steps"] == [{"gptq": {"act_order": False}}]
    assert "calibrate.steps=[awq]" in rs[0].overrides and not any(o.startswith("recipe=") for o in rs[0].overrides)
    assert R.weight_bits(tq) == 3


def test_ranking_text_comes_from_another_corpus(params):
    assert R.rank_text("auto", {"calib_source": "embedded-wiki", "eval_sets": ["embedded-wiki", "lee"]}) == "lee"
    assert R.rank_text("auto", {"calib_source": "c4", "eval_sets": ["c4", "wikitext2"]}) == "wikitext2"
    with pytest.raises(ConfigError, match="no evaluation text from another source"):
        R.rank_text("auto", {"calib_source": "wikitext2", "eval_sets": ["embedded-wiki"]})
    with pytest.raises(ConfigError, match=r"rank_text='c4' is not one of prepare.eval_sets"):
        R.rank_text("c4", {"calib_source": "wikitext2", "eval_sets": ["lee"]})


def _row(name, bits, bpw, ppl, ratio, status="finished", acc_drop=None):
    return {"recipe": name, "bits": bits, "bits_per_weight": bpw, "rank_ppl": ppl, "ppl_ratio": ratio,
            "status": status, "acc_drop": acc_drop}


def test_pareto_front_and_promotion_on_a_hand_made_table():
    rows = [
        _row("rtn-w4", 4, 4.5, 30.0, 1.15),
        _row("awq-w4", 4, 4.5, 28.0, 1.07),
        _row("bap-w4-g32", 4, 5.0, 27.5, 1.05),
        _row("rtn-w3", 3, 3.5, 60.0, 2.3),       # fails the PPL gate
        _row("bap-w3", 3, 3.5, 35.0, 1.34),
        _row("tq-w3", 3, 3.5, 33.0, 1.26, acc_drop=0.05),  # best W3 PPL, fails the accuracy gate
        _row("w2", 2, 2.5, 500.0, 19.0),
        _row("crashed", 4, None, None, None, status="failed"),
    ]
    assert R.pareto_front(rows) == {"awq-w4", "bap-w4-g32", "tq-w3", "w2"}
    for r in rows:
        if r["status"] == "finished":
            r["failed_gates"] = R.check_gates(r, max_ppl_ratio=1.5, max_acc_drop=0.02)
    assert rows[3]["failed_gates"] == ["ppl_ratio 2.3 > 1.5"]
    assert rows[5]["failed_gates"] == ["acc_drop 0.0500 > 0.02"]
    chosen = R.choose_promotions(rows)
    assert {b: r["recipe"] for b, r in chosen.items()} == {4: "bap-w4-g32", 3: "bap-w3"}
    # a gate-failing recipe is never promoted, even when it is the only one of its width
    assert 2 not in chosen


def _sweep_repo(tmp: Path, grid: dict, **sweep) -> Path:
    shutil.copy2(ROOT / "params.yaml", tmp / "params.yaml")
    p = yaml.safe_load((tmp / "params.yaml").read_text())
    p["sweep"]["grids"]["t"] = grid
    p["sweep"].update(grid="t", **sweep)
    (tmp / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return tmp


# Runs the real flow in its own process (its own temporary Prefect API and database) with
# the recipe runner faked: no DVC, the numbers made up per bit width.
FAKE_DRIVER = """
import json, sys
from pathlib import Path
from flows import grid as R
from flows import sweep as S

calls, fail = Path(sys.argv[1]), set(json.loads(sys.argv[2]))

def fake_execute(recipe, root, env, log):
    with calls.open("a") as f:
        f.write(recipe.overrides[0] + "\\n")
    if recipe.overrides[0] in fail:
        raise RuntimeError("simulated crash")

def fake_collect(client, experiment_id, run_id, recipe, text):
    bits = R.weight_bits(recipe.effective)
    ppl = {4: 22.0, 3: 30.0, 2: 400.0}[bits]
    return {"recipe": recipe.name, "digest": recipe.digest, "bits": bits, "status": "finished",
            "rank_ppl": ppl, "ppl_ratio": ppl / 20, "bits_per_weight": bits + 0.5, "seconds": 1.0,
            "stage_seconds": {"calibrate": 1.0}, "ppl": {text: ppl}}

S.execute_recipe, S.collect_row = fake_execute, fake_collect
S.main(sys.argv[3:])
"""


def _sweep_env(tmp: Path, repo: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}", MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
               DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_HOME=str(tmp / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    for var in ("QUANT_PARENT_RUN_ID", "PREFECT_API_URL"):  # its own temporary Prefect API and database
        env.pop(var, None)
    return env


def test_interrupted_sweep_resumes_with_only_the_rest(tmp_path):
    """The first run loses one recipe (retries 0), a re-run runs only that one; the table
    names the ranking text and the failed gate of the W2 recipe."""
    repo = _sweep_repo(tmp_path, {"axes": {"scheme.weight.format": ["int4", "int3", "int2"]}}, retries=0)
    (tmp_path / "driver.py").write_text(FAKE_DRIVER)
    calls = tmp_path / "calls.txt"

    def run(fail: list[str]) -> dict:
        calls.write_text("")
        proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(calls), json.dumps(fail)],
                              cwd=repo, env=_sweep_env(tmp_path, repo), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return json.loads((repo / ".state/sweep/t/report/sweep.json").read_text())

    first = run(["scheme.weight.format=int3"])
    assert sorted(calls.read_text().split()) == sorted(f"scheme.weight.format={f}" for f in ("int4", "int3", "int2"))
    status = {r["recipe"]: r["status"] for r in first["rows"]}
    assert status == {"defaults": "finished", "scheme.weight.format=int3": "failed",
                      "scheme.weight.format=int2": "finished"}
    second = run([])
    assert calls.read_text().split() == ["scheme.weight.format=int3"]
    assert all(r["status"] == "finished" for r in second["rows"])
    report = repo / ".state/sweep/t/report"
    md = (report / "sweep.md").read_text()
    assert "Ranked on `lee`" in md and "scheme.weight.format=int2" in md
    assert "ppl_ratio 20.0 > 1.5" in md  # the W2 recipe's failed gate is in the table
    for name in ("sweep.csv", "ppl_vs_bits.png", "acc_vs_bits.png", "time_vs_quality.png"):
        assert (report / name).is_file()


def _git_repo(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("metrics/", "artifacts/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


@pytest.mark.slow
def test_tiny_sweep_end_to_end_through_dvc_experiments(tmp_path, embedded_model_dir, request):
    """Two RTN recipes (W4, W3) on the embedded model at tiny settings: each a real `dvc exp run
    --temp` (prepare runs once, from the run cache the second time), numbers from the evaluate
    runs, the W4 recipe promoted as w4-best, the W3 one refused by the PPL gate; params.yaml
    byte-identical afterwards. About 4 minutes on an idle 2-core machine: opt-in with -m slow."""
    if "slow" not in (request.config.getoption("markexpr") or "").replace("not slow", ""):
        pytest.skip("a real sweep through DVC experiments: select it with -m slow")
    repo = _git_repo(tmp_path / "repo")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["model"]["name_or_path"] = str(embedded_model_dir)
    p["sweep"]["gates"]["max_ppl_ratio"] = 1.6
    p["sweep"]["grids"]["smoke"]["base"].update({"evaluate.max_windows": 1, "evaluate.seq_len": 512,
                                                 "evaluate.report": False})
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "commit", "-qam", "tiny"], cwd=repo, check=True)
    before = (repo / "params.yaml").read_bytes()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(repo),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    for var in ("QUANT_PARENT_RUN_ID", "PREFECT_API_URL"):  # its own temporary Prefect API and database
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "flows.sweep"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.rindex('{\n  "aliases"'):])
    report = json.loads((repo / ".state/sweep/smoke/report/sweep.json").read_text())
    rows = {r["recipe"]: r for r in report["rows"]}
    assert set(rows) == {"defaults", "scheme.weight.format=int3"}
    w4, w3 = sorted(rows.values(), key=lambda r: -r["bits"])
    assert w4["status"] == w3["status"] == "finished" and w4["rank_text"] == "lee"
    assert w3["rank_ppl"] > w4["rank_ppl"] > 0 and w4["bits_per_weight"] < 5
    assert w4["promoted"] == "w4-best" and summary["aliases"]["w4-best"]["recipe"] == w4["recipe"]
    assert w3["failed_gates"] and "promoted" not in w3
    assert (repo / "params.yaml").read_bytes() == before
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mv = client.get_model_version_by_alias("quant-pipeline", "w4-best")
    assert "lowest PPL on lee" in mv.description
