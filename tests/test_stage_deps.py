"""dvc.yaml gives every stage the code it runs as deps: the project modules a stage's
`python -m tasks.<stage>` imports (at module level or inside functions, transitively, plus
the method modules `quant.methods` discovers) each lie under one of the stage's deps. A
stage whose code changed must be stale; a missing dep would let DVC reuse an old output."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("quant", "tasks", "flows")


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def imports_of(name: str) -> set[str]:
    """Project modules `name` imports anywhere in its body (absolute imports only)."""
    f = module_file(name)
    out: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text())):
        mods: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if node.module == "quant":  # the public API: each name is imported from its module
                import quant

                mods += [quant._EXPORTS[a.name] for a in node.names if a.name in quant._EXPORTS]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        for m in mods:
            if m.split(".")[0] in PACKAGES and module_file(m) is not None:
                out.add(m)
    # a package's __init__ runs when any of its modules is imported
    for m in list(out):
        parts = m.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)) if module_file(".".join(parts[:i])))
    # method modules are imported by name on the first lookup of their kind: recipes look up
    # the step kinds, the exporters the export kind
    from quant.methods import METHOD_MODULES, STEP_KINDS

    kinds = {"quant.recipe": STEP_KINDS, "quant.export.base": ("export",)}.get(name, ())
    out.update(m for k in kinds for m in METHOD_MODULES[k])
    return out


def closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(imports_of(m) - seen)
    return seen


def stages() -> list[tuple[str, str, list[str]]]:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in dvc.items():
        body = stage.get("do", stage)
        cmd = body["cmd"]
        m = re.search(r"python -m (tasks\.\w+)", cmd)
        assert m, f"stage {name}: cmd {cmd!r} does not run `python -m tasks.<stage>`"
        deps = [d for d in body.get("deps", []) if not str(d).startswith("artifacts/") and "$" not in str(d)]
        out.append((name, m.group(1), deps))
    return out


@pytest.mark.parametrize("stage,module,deps", stages(), ids=[s[0] for s in stages()])
def test_stage_deps_cover_the_code_it_imports(stage, module, deps):
    covered = [ROOT / d for d in deps]
    missing = sorted(
        str(module_file(m).relative_to(ROOT)) for m in closure(module)
        if not any(module_file(m) == c or c in module_file(m).parents for c in covered)
    )
    assert not missing, f"dvc.yaml stage {stage!r} imports code that is not among its deps: {missing}"


def test_closure_sees_lazy_and_discovered_imports():
    """The closure follows imports inside functions and the registry's discovery: a test of the
    test, so an empty closure cannot pass everything."""
    c = closure("tasks.calibrate")
    assert {"quant.calibrate.gptq", "quant.blockwise.tesseraq", "tasks.common", "quant.recipe"} <= c
    assert "quant.export.loader" in closure("tasks.evaluate")  # imported inside quant.load.load_model
