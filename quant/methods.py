"""Every method of the library in one registry: name -> `Method` (kind, options class, code).

A method is registered once, where it is implemented, with the options dataclass it
accepts (the options object is what a recipe step holds, so a name and its options
cannot drift apart)::

    @register("gptq", kind="calibrate", options=GPTQOptions, role="quantizer",
              after=("quarot",), check=check_gptq)
    def gptq(model, options: GPTQOptions, ctx: CalibrationContext) -> dict[str, float]: ...

One call contract, `fn(model, options, ctx)`, with a context per kind:

| kind | stage | ctx | returns |
|---|---|---|---|
| calibrate | calibrate | `quant.calibrate.CalibrationContext` | metrics (in place: linears -> QuantLinear) |
| blockwise | block_ap | `quant.blockwise.engine.BlockwiseContext` | `BlockwiseResult` |
| e2e | e2e | `quant.e2e.trainer.E2EContext` | `Objective` (the trainer runs it) |
| export | convert | - | `fn` is the exporter class (`quant.export.base.Exporter`) |

Composition is data too. A calibrate method is a `transform` (changes the model's
weights without quantizing them: QuaRot's rotations) or a `quantizer` (turns linears
into QuantLinears: rtn, awq, gptq, fp-search); a quantizer names the transforms it may
follow in `after`. `check(scheme, options, where)` refuses, before any model is
loaded, a scheme the method cannot honour. `quant.recipe` applies these rules; `check_inputs(model, options, ctx)` checks a calibrate
step against the loaded model and data before the first step of the stage changes anything.

Discovery: `METHOD_MODULES` lists, per kind, the modules that register methods; the first
lookup of a kind imports them (a recipe step lookup: the three step kinds). A listed module that does not exist is an error, never skipped
(a misspelt module would make its methods vanish). This is the one place the library
looks upward (by module name, lazily): plug-ins register into it, it imports none of
them at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from quant.config import Config, ConfigError

Kind = Literal["calibrate", "blockwise", "e2e", "export"]
KINDS: tuple[Kind, ...] = ("calibrate", "blockwise", "e2e", "export")
# the DVC stage that runs each kind's steps, and its params key
STAGES: dict[str, str] = {"calibrate": "calibrate.steps", "blockwise": "block_ap.steps",
                          "e2e": "e2e.steps", "export": "convert.formats"}

# the modules that register each kind's methods: a lookup imports only its kind's (an
# export lookup does not import the training code, so stages depend on what they run)
METHOD_MODULES: dict[str, tuple[str, ...]] = {
    "calibrate": ("quant.calibrate.rtn", "quant.calibrate.awq", "quant.calibrate.quarot",
                  "quant.calibrate.gptq", "quant.calibrate.fp_search"),
    "blockwise": ("quant.blockwise.block_ap", "quant.blockwise.tesseraq"),
    "e2e": ("quant.e2e.e2e_qp", "quant.e2e.kd"),
    "export": ("quant.export.half", "quant.export.compressed_tensors", "quant.export.gptq",
               "quant.export.gguf_format"),
}


@dataclass(frozen=True)
class Method:
    name: str
    kind: Kind
    options: type[Config]
    fn: Callable[..., Any]
    role: Literal["transform", "quantizer", "step"] = "step"  # calibrate: transform | quantizer
    after: tuple[str, ...] = ()  # calibrate quantizers: the transforms they may follow
    check: Callable[..., None] | None = None  # check(scheme, options, where): before any model loads
    # check_inputs(model, options, ctx): calibrate steps, on the loaded model and data, for every
    # step before the first one changes anything (GPTQ after QuaRot refuses before rotating)
    check_inputs: Callable[..., None] | None = None
    # resolve(scheme, options) -> scheme: a calibrate step that cannot honour part of the
    # scheme where the intent is clear says what it does instead (GPTQ/AWQ store static
    # qparams, so a preset's `dynamic_minmax` is turned off for the model they produce)
    resolve: Callable[..., Any] | None = None
    summary: str = ""  # one line for listings and errors
    data: bool = False  # calibrate: searches on calibration windows (the stage makes them only then)

    def parse_options(self, data: Any, where: str) -> Config:
        """The options object of this method from plain data (None = defaults)."""
        if isinstance(data, self.options):
            return data
        if isinstance(data, Config):
            raise ConfigError(f"{where}: {type(data).__name__} are not the options of {self.name!r}; "
                              f"it takes {self.options.__name__}")
        return self.options.from_dict(data, where)


_METHODS: dict[tuple[str, str], Method] = {}  # (kind, name): a format may share a method's name
_discovered: set[str] = set()
STEP_KINDS: tuple[Kind, ...] = ("calibrate", "blockwise", "e2e")  # what a recipe's steps are


def register(name: str, *, kind: Kind, options: type[Config], role: str = "step",
             after: tuple[str, ...] = (), check: Callable[..., None] | None = None,
             check_inputs: Callable[..., None] | None = None, resolve: Callable[..., Any] | None = None,
             summary: str = "", data: bool = False) -> Callable[[Any], Any]:
    """Decorator: register `fn` (a function, or an exporter class) as method `name`."""
    if kind not in KINDS:
        raise RuntimeError(f"method {name!r}: kind {kind!r} is not one of {KINDS}")
    if kind == "calibrate" and role not in ("transform", "quantizer"):
        raise RuntimeError(f"calibrate method {name!r} needs role 'transform' or 'quantizer'")

    def deco(fn: Any) -> Any:
        if (kind, name) in _METHODS or (kind in STEP_KINDS and any(
                k in STEP_KINDS and n == name for k, n in _METHODS)):
            raise RuntimeError(f"{kind} method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _METHODS[kind, name] = Method(name, kind, options, fn, role, tuple(after),  # type: ignore[arg-type]
                                      check, check_inputs, resolve, summary or (doc[0] if doc else ""), data)
        return fn

    return deco


def _discover(kinds: tuple[str, ...] = KINDS) -> None:
    for kind in kinds:
        if kind in _discovered:
            continue
        for module in METHOD_MODULES[kind]:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
                raise RuntimeError(f"quant.methods.METHOD_MODULES[{kind!r}] lists {module!r}, which does "
                                   "not exist; fix the list") from None
        _discovered.add(kind)


def names(kind: Kind | None = None) -> list[str]:
    """Registered names of one kind (None: every recipe-step kind), sorted."""
    kinds = (kind,) if kind else STEP_KINDS
    _discover(kinds)
    return sorted(n for k, n in _METHODS if k in kinds)


def method(name: str, kind: Kind | None = None, where: str | None = None) -> Method:
    """The method `name` of `kind` (None: any recipe-step kind: calibrate, blockwise, e2e).
    A step of another kind is an error naming where it belongs; `where` is the field the
    error names (e.g. `calibrate.steps[1]`)."""
    field = where or (STAGES[kind] if kind else "recipe")
    kinds = (kind,) if kind else STEP_KINDS
    _discover(STEP_KINDS if kind in STEP_KINDS else kinds)  # a misplaced step names its stage
    for k in kinds:
        if isinstance(name, str) and (k, name) in _METHODS:
            return _METHODS[k, name]
    for k in STEP_KINDS:
        if kind in STEP_KINDS and isinstance(name, str) and (k, name) in _METHODS:
            raise ConfigError(f"{field}: {name!r} is a {k} step (it belongs in {STAGES[k]}); "
                              f"{STAGES[kind]} accepts: {names(kind)}")
    what = f"{kind} method" if kind and kind != "export" else ("format" if kind else "method")
    raise ConfigError(f"{field}: {name!r} is not a known {what}; known: {names(kind)}")


def quantizers() -> list[str]:
    """The calibrate methods that quantize the weights (the last calibrate step)."""
    _discover(("calibrate",))
    return sorted(n for (k, n), m in _METHODS.items() if k == "calibrate" and m.role == "quantizer")


def for_options(options: Config) -> Method:
    """The recipe-step method whose options class `options` is (the options object as selector)."""
    _discover(STEP_KINDS)
    found = [m for (k, _), m in _METHODS.items() if k in STEP_KINDS and type(options) is m.options]
    if len(found) != 1:
        raise ConfigError(f"{type(options).__name__} selects {'no' if not found else 'more than one'} method; "
                          "name the method: Step('name', options)")
    return found[0]


def catalogue() -> list[dict[str, str]]:
    """One row per method: name, kind, role, options class, summary (docs and `--help`)."""
    _discover()
    return [{"name": m.name, "kind": m.kind, "role": m.role, "options": m.options.__name__,
             "module": m.fn.__module__, "summary": m.summary}
            for m in sorted(_METHODS.values(), key=lambda m: (KINDS.index(m.kind), m.name))]
