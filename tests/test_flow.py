"""The DVC side of the pipeline flow (flows/dvc_stages.py) on small DVC projects built here:
graph reading with foreach expansion, wave planning, overrides through DVC's -S machinery,
one `dvc repro --single-item` with its ran / up-to-date / failure outcomes. No Prefect API."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from flows import dvc_stages
from flows.dvc_stages import OverrideError, StageFailed, StageGraph


def make_project(root: Path, dvc_yaml: str, params: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(textwrap.dedent(dvc_yaml))
    (root / "params.yaml").write_text(textwrap.dedent(params))
    for name, text in (files or {}).items():
        (root / name).write_text(textwrap.dedent(text))
    return root


TOY_DVC = """\
    stages:
      prep:
        cmd: python -c "open('prep.txt', 'w').write('p')"
        outs: [prep.txt]
      shard:
        foreach: ${shards}
        do:
          cmd: python -c "open('shard-${item}.txt', 'w').write('${item}')"
          deps: [prep.txt]
          outs: ["shard-${item}.txt"]
      merge:
        cmd: python -c "open('merged.txt', 'w').write('m')"
        deps: [shard-0.txt, shard-1.txt]
        params: [shards]
        outs: [merged.txt]
      report:
        cmd: python -c "open('report.md', 'w').write('| a |')"
        deps: [merged.txt]
        outs:
          - report.md:
              cache: false
"""
TOY_PARAMS = """\
    # the shards
    shards: [0, 1]   # one process each
    nested:
      lr: 0.1
"""


@pytest.fixture
def toy(tmp_path) -> Path:
    return make_project(tmp_path / "toy", TOY_DVC, TOY_PARAMS)


def test_read_graph_expands_foreach_and_keeps_dvc_yaml_order(toy):
    g = dvc_stages.read_graph(toy)
    assert g.order == ["prep", "shard@0", "shard@1", "merge", "report"]
    assert g.upstream == {"prep": set(), "shard@0": {"prep"}, "shard@1": {"prep"},
                          "merge": {"shard@0", "shard@1"}, "report": {"merge"}}
    assert dvc_stages.waves(g) == [["prep"], ["shard@0", "shard@1"], ["merge"], ["report"]]


def test_graph_follows_params_overrides(toy):
    dvc_stages.apply_overrides(toy, ["shards=[0,1,2]"])
    g = dvc_stages.read_graph(toy)
    assert [s for s in g.order if s.startswith("shard@")] == ["shard@0", "shard@1", "shard@2"]


def test_waves_group_only_foreach_items_and_respect_dependencies():
    g = StageGraph(
        order=["a", "b", "syn@0", "syn@1", "syn@2", "c"],
        upstream={"a": set(), "b": set(), "syn@0": {"a"}, "syn@1": {"a"}, "syn@2": {"a"},
                  "c": {"syn@0", "syn@1", "syn@2", "b"}},
    )
    # independent plain stages run one at a time (they may each want every GPU)
    assert dvc_stages.waves(g) == [["a"], ["b"], ["syn@0", "syn@1", "syn@2"], ["c"]]
    # an item that waits for another item of its family lands in a later wave
    g2 = StageGraph(order=["x@0", "x@1"], upstream={"x@0": set(), "x@1": {"x@0"}})
    assert dvc_stages.waves(g2) == [["x@0"], ["x@1"]]
    # targets: the stage and its upstream, a foreach family by its name
    assert dvc_stages.waves(dvc_stages.restrict(g, ["syn"])) == [["a"], ["syn@0", "syn@1", "syn@2"]]
    assert dvc_stages.restrict(g, ["b"]).order == ["b"]
    with pytest.raises(ValueError, match=r"targets \['d'\] are not stages of dvc.yaml; known: \['a', 'b', 'c', 'syn'\]"):
        dvc_stages.restrict(g, ["d"])
    cyclic = StageGraph(order=["a", "b"], upstream={"a": {"b"}, "b": {"a"}})
    with pytest.raises(ValueError, match="cycle"):
        dvc_stages.waves(cyclic)


def test_overrides_change_values_keep_comments_and_reject_bad_ones(toy):
    before = (toy / "params.yaml").read_text()
    dvc_stages.apply_overrides(toy, ["nested.lr=0.5", "params.yaml:shards=[3]"])
    text = (toy / "params.yaml").read_text()
    assert yaml.safe_load(text) == {"shards": [3], "nested": {"lr": 0.5}}
    assert "# one process each" in text and "# the shards" in text
    (toy / "params.yaml").write_text(before)

    with pytest.raises(OverrideError, match=r"override 'nested\.typo=1'"):
        dvc_stages.apply_overrides(toy, ["nested.lr=0.9", "nested.typo=1"])
    assert (toy / "params.yaml").read_text() == before  # all or nothing
    with pytest.raises(OverrideError, match=r"overrides\[0\]='bits'.*key=value"):
        dvc_stages.apply_overrides(toy, ["bits"])
    with pytest.raises(OverrideError, match="params file 'other.yaml' not found"):
        dvc_stages.apply_overrides(toy, ["other.yaml:a=1"])


def test_repro_reports_ran_then_up_to_date(toy, tmp_path):
    env = dvc_stages.stage_env(dict(__import__("os").environ))
    r = dvc_stages.repro("prep", toy, env, tmp_path / "logs" / "prep.log")
    assert r.ran and (toy / "prep.txt").read_text() == "p"
    r = dvc_stages.repro("prep", toy, env, tmp_path / "logs" / "prep.log")
    assert not r.ran
    assert "didn't change" in (tmp_path / "logs" / "prep.log").read_text()


def test_repro_failure_tells_bad_params_from_other_errors(tmp_path):
    import os

    proj = make_project(tmp_path / "bad", """\
        stages:
          config:
            cmd: python fail.py 2
          crash:
            cmd: python fail.py 1
        """, "a: 1\n", {"fail.py": """\
        import sys
        print("error: calibrate.samples=-1 must be positive")  # what tasks.common.main prints
        sys.exit(int(sys.argv[1]))
        """})
    env = dvc_stages.stage_env(dict(os.environ))
    with pytest.raises(StageFailed, match="bad params") as exc:
        dvc_stages.repro("config", proj, env, tmp_path / "c.log")
    assert exc.value.config_error and "calibrate.samples=-1" in str(exc.value)
    with pytest.raises(StageFailed, match="exit code") as exc:
        dvc_stages.repro("crash", proj, env, tmp_path / "d.log")
    assert not exc.value.config_error


def test_gpu_slots_follow_cuda_visible_devices():
    assert dvc_stages.gpu_slots({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert dvc_stages.gpu_slots({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert dvc_stages.gpu_slots({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_metrics_and_report_files(toy):
    import os

    env = dvc_stages.stage_env(dict(os.environ))
    for stage in ("prep", "shard@0", "shard@1", "merge", "report"):
        dvc_stages.repro(stage, toy, env, toy / "log.txt")
    assert [p.name for p in dvc_stages.report_files(toy)] == ["report.md"]
    assert dvc_stages.metrics(toy) == {}
