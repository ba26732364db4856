"""The library's layers, as DESIGN.md draws them: every import inside `quant/` (module level or
inside a function) goes to a lower layer or sideways within one, never up, and no module
imports itself back through others. A new upward import must be justified here, in one line,
or removed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# bottom to top; a unit is a module (quant.io) or a sub-package (quant.models)
LAYERS = [
    ["quant", "quant.config", "quant.io"],
    ["quant.numerics"],
    ["quant.config.scheme", "quant.methods", "quant.data"],
    ["quant.models", "quant.recipe"],
    ["quant.modules"],
    ["quant.checkpoint", "quant.synth"],
    ["quant.blockwise", "quant.e2e", "quant.export"],
    ["quant.calibrate", "quant.eval"],
    ["quant.load"],
    ["quant.api"],
]
# upward edges that stay, each with its one-line reason (none today; `quant.methods` imports
# the method modules by name on first lookup, which is plug-in discovery, not a layer edge)
JUSTIFIED: dict[tuple[str, str], str] = {}


def unit(module: str) -> str:
    """The longest unit of LAYERS that `module` is or lies in (`quant` itself only for quant)."""
    units = [u for layer in LAYERS for u in layer]
    found = [u for u in units if module == u or (u != "quant" and module.startswith(u + "."))]
    if not found:
        raise AssertionError(f"{module} is in no layer of tests/test_layering.py: add it")
    return max(found, key=len)


def level(u: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if u in layer)


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "quant").rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p
    return out


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("quant"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("quant"))
    return found


def upward(edges: list[tuple[str, str]]) -> list[str]:
    bad = []
    for name, target in edges:
        src, dst = unit(name), unit(target)
        if dst != src and level(dst) > level(src) and (src, dst) not in JUSTIFIED:
            bad.append(f"{name} -> {target} ({src} is below {dst})")
    return bad


def test_imports_go_down_the_layers():
    mods = modules()
    edges = [(name, t) for name, path in mods.items() for t in imports(path) if t in mods]
    assert len(edges) > 100  # the walk sees the library's imports, lazy ones included
    assert ("quant.load", "quant.export.loader") in edges  # imported inside a function
    bad = upward(edges)
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))
    # what the old layout had: checkpoints in models importing the exporters, modules importing
    # packing from export; each is flagged
    old = [("quant.models.arch", "quant.export.loader"), ("quant.modules.packed", "quant.export.base"),
           ("quant.numerics.grid", "quant.config.scheme")]
    assert len(upward(old)) == 3


def test_no_import_cycle_between_modules():
    mods = modules()
    graph = {m: {t for t in imports(p) if t in mods and t != m and not (t == "quant" or m == "quant")}
             for m, p in mods.items()}
    # a package's __init__ re-exporting its own modules is not a cycle worth reporting
    graph = {m: {t for t in ts if not (m.startswith(t + ".") and t in mods)} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_every_module_has_a_layer():
    for name in modules():
        unit(name)
