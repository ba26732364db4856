"""quant.io: the one implementation of atomic writes."""

from __future__ import annotations

import json

import pytest

from quant.io import atomic_dir, replace_dir, write_json_atomic, write_text_atomic


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_replace_dir_swaps_whole_directories(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    src = tmp_path / "work"
    src.mkdir()
    (src / "new.txt").write_text("new")
    replace_dir(src, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_json_atomic_format_and_failure(tmp_path):
    f = write_json_atomic(tmp_path / "d" / "x.json", {"b": 1, "a": [1, 2]})
    assert f.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True) + "\n"
    with pytest.raises(TypeError):
        write_json_atomic(f, {"a": object()})  # not serialisable: the old file stays
    assert json.loads(f.read_text()) == {"a": [1, 2], "b": 1}
    write_text_atomic(f, "plain")
    assert f.read_text() == "plain"
    assert sorted(p.name for p in f.parent.iterdir()) == ["x.json"]
