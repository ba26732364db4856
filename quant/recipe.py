"""A recipe: the one description of a quantization. The scheme plus ordered steps.

    recipe = Recipe.parse("quarot+gptq+tesseraq+e2e-qp:W4A8KV4",
                          options={"gptq": {"act_order": True}})
    recipe.calibrate   # (Step(quarot), Step(gptq, act_order=True))  -> the calibrate stage
    recipe.blockwise   # (Step(tesseraq),)                            -> the block_ap stage
    recipe.e2e         # (Step(e2e-qp),)                              -> the e2e stage

A `Step` is a registered method (`quant.methods`) with its options object. The stages
stay calibrate -> block_ap -> e2e; each runs the steps of its kind: calibrate runs its
transforms (QuaRot) and then exactly one weight quantizer (rtn, awq, gptq, fp-search);
block_ap and e2e run at most one step each, and a stage without steps passes its input
model on unchanged. In params.yaml the same recipe is `scheme` plus each stage's
`steps` list (a step is a method name, or `{name: {options}}`), so a change to the e2e
options does not make calibrate stale. The text form, the params form and the Python
objects convert into each other (`parse` / `text` + `options`, `from_params` / `params`),
and every check runs in `check_steps`, before any model is loaded:

- an unknown method, or a method in the wrong stage (tesseraq as a calibrate step);
- a method twice; more than one step in block_ap or e2e;
- calibrate steps that do not end with one weight quantizer, or a quantizer after a
  transform it cannot follow (awq after quarot), or two quantizers (fp-search after gptq);
- options for a method that is not in the recipe (`parse(..., options=...)`);
- a scheme a step cannot honour (each method's `check`: fp-search needs FP weights,
  block-wise and end-to-end training integer grids, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quant import methods
from quant.config import Config, ConfigError
from quant.config.scheme import QuantScheme

# recipe part (= method kind) -> params.yaml key of the stage that runs it
PARAMS_KEYS = {"calibrate": "calibrate.steps", "blockwise": "block_ap.steps", "e2e": "e2e.steps"}


@dataclass(frozen=True)
class Step(Config):
    """One method and its options (`options=None` means the method's defaults)."""

    method: str
    options: Any = None

    def __post_init__(self) -> None:
        m = methods.method(self.method)
        object.__setattr__(self, "options", m.parse_options(self.options, f"{self.method} options"))

    @property
    def kind(self) -> str:
        return methods.method(self.method).kind

    @classmethod
    def parse(cls, value: Any, path: str = "step") -> Step:
        """A method name (`rtn`) or a one-key mapping `{gptq: {act_order: true}}`."""
        if isinstance(value, Step):
            return value
        if isinstance(value, Config):  # an options object selects its method
            return cls(methods.for_options(value).name, value)
        if isinstance(value, str):
            name, opts = value, None
        elif isinstance(value, dict) and len(value) == 1:
            ((name, opts),) = value.items()
        else:
            raise ConfigError(f"{path}={value!r} is not a step; a step is a method name (e.g. rtn) "
                              "or a one-key mapping {method: {options}} (e.g. {gptq: {act_order: true}})")
        m = methods.method(name, where=path)
        return cls(name, m.parse_options(opts, f"{path}.{name}"))

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> Step:
        return cls.parse(data, path or "step")

    def spec(self) -> str | dict[str, dict[str, Any]]:
        """The params form: the bare name when the options are the defaults, else the name and
        the options that differ from them."""
        defaults = type(self.options)().to_dict()
        changed = {k: v for k, v in self.options.to_dict().items() if defaults.get(k) != v}
        return {self.method: changed} if changed else self.method

    def to_dict(self) -> Any:  # type: ignore[override]
        return self.spec()


def parse_steps(value: Any, path: str) -> tuple[Step, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{path} must be a list of steps, got {value!r}")
    return tuple(Step.parse(v, f"{path}[{i}]") for i, v in enumerate(value))


def resolve_scheme(steps: tuple[Step, ...], scheme: QuantScheme) -> QuantScheme:
    """The scheme the calibrate `steps` produce: each step's `resolve` hook, in order."""
    for s in steps:
        m = methods.method(s.method)
        if m.resolve is not None:
            scheme = m.resolve(scheme, s.options)
    return scheme


def check_steps(kind: str, steps: tuple[Step, ...], path: str, scheme: QuantScheme | None = None) -> None:
    """Everything about one stage's steps that needs no model (see the module docstring)."""
    seen: dict[str, int] = {}
    for i, s in enumerate(steps):
        methods.method(s.method, kind, f"{path}[{i}]")  # of this kind
        if s.method in seen:
            raise ConfigError(f"{path}[{i}]: {s.method!r} is already step {seen[s.method]}; a recipe runs "
                              "each method once")
        seen[s.method] = i
    if kind == "calibrate":
        _check_calibrate_order(steps, path)
    elif len(steps) > 1:
        raise ConfigError(f"{path}: {[s.method for s in steps]}: the {kind} stage runs at most one step; "
                          f"keep one of them")
    if scheme is not None:
        for i, s in enumerate(steps):
            m = methods.method(s.method, kind)
            if m.check is not None:
                m.check(scheme, s.options, f"{path}[{i}].{s.method}")


def _check_calibrate_order(steps: tuple[Step, ...], path: str) -> None:
    quantizers = methods.quantizers()
    if not steps:
        raise ConfigError(f"{path}: the calibrate stage needs a weight quantizer; accepted: {quantizers}")
    transforms: list[str] = []
    for i, s in enumerate(steps):
        m = methods.method(s.method, "calibrate")
        if m.role == "transform":
            if i == len(steps) - 1:
                raise ConfigError(f"{path}: {s.method!r} is a transform and the last step; end the calibrate "
                                  f"steps with a weight quantizer: one of {quantizers}")
            transforms.append(s.method)
            continue
        if i != len(steps) - 1:
            nxt = steps[i + 1].method
            raise ConfigError(f"{path}[{i + 1}]: {nxt!r} after the weight quantizer {s.method!r}: the "
                              f"calibrate steps quantize the weights once, with the last step (one of "
                              f"{quantizers}); drop one of them")
        for t in transforms:
            if t not in m.after:
                raise ConfigError(f"{path}[{i}]: {s.method!r} cannot follow {t!r}; {s.method!r} may follow "
                                  f"{list(m.after) or 'no transform'}")


@dataclass(frozen=True)
class Recipe:
    """The scheme and the steps of each stage (see the module docstring)."""

    scheme: QuantScheme = field(default_factory=QuantScheme)
    calibrate: tuple[Step, ...] = field(default_factory=lambda: (Step("rtn"),))
    blockwise: tuple[Step, ...] = ()
    e2e: tuple[Step, ...] = ()
    # set in __post_init__: `scheme` as the calibrate steps resolve it (what the model holds)
    model_scheme: QuantScheme = field(init=False, compare=False, repr=False, default=None)

    def __post_init__(self) -> None:
        for kind in PARAMS_KEYS:
            steps = tuple(Step.parse(s, f"{PARAMS_KEYS[kind]}[{i}]")
                          for i, s in enumerate(getattr(self, kind)))
            object.__setattr__(self, kind, steps)
        check_steps("calibrate", self.calibrate, PARAMS_KEYS["calibrate"], self.scheme)
        # the scheme of the model the calibrate steps produce, which later steps train
        object.__setattr__(self, "model_scheme", resolve_scheme(self.calibrate, self.scheme))
        for kind in ("blockwise", "e2e"):
            check_steps(kind, getattr(self, kind), PARAMS_KEYS[kind], self.model_scheme)

    @property
    def steps(self) -> tuple[Step, ...]:
        return (*self.calibrate, *self.blockwise, *self.e2e)

    # -- text form --------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, options: dict[str, Any] | None = None,
              scheme: QuantScheme | None = None) -> Recipe:
        """`quarot+gptq+tesseraq+e2e-qp:W4A8KV4`: steps joined by `+` in stage order, then the
        scheme's text (`QuantScheme.parse`) or, with `scheme=`, nothing after the colon.
        `options` maps a step's method to its options (a method not in the recipe is an error)."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"recipe {text!r} is empty; e.g. awq+tesseraq+e2e-qp:W3g64")
        names, colon, scheme_text = text.strip().partition(":")
        if scheme is None:
            if not colon or not scheme_text:
                raise ConfigError(f"recipe {text!r} has no scheme; write it after a colon, e.g. "
                                  f"{names}:W4g64 or {names}:W4A8KV4")
            scheme = QuantScheme.parse(scheme_text, f"recipe {text!r}: scheme")
        elif scheme_text:
            raise ConfigError(f"recipe {text!r}: give the scheme either in the text or as scheme=, not both")
        options = dict(options or {})
        parts = [n.strip() for n in names.split("+")]
        extra = sorted(set(options) - set(parts))
        if extra:
            raise ConfigError(f"recipe {text!r}: options given for {extra}, which "
                              f"{'is' if len(extra) == 1 else 'are'} not a step of the recipe; steps: {parts}")
        by_kind: dict[str, list[Step]] = {k: [] for k in PARAMS_KEYS}
        order = list(PARAMS_KEYS)
        last = 0
        for i, name in enumerate(parts):
            where = f"recipe {text!r}: step {i + 1}"
            m = methods.method(name, where=where)
            if order.index(m.kind) < last:
                raise ConfigError(f"{where}: {name!r} is a {m.kind} step and must come before the "
                                  f"{order[last]} steps (stage order: calibrate, blockwise, e2e)")
            last = order.index(m.kind)
            try:
                opts = m.parse_options(options.get(name), f"options.{name}")
            except ConfigError as exc:
                raise ConfigError(f"recipe {text!r}: {exc}") from None
            by_kind[m.kind].append(Step(name, opts))
        try:
            return cls(scheme, *(tuple(by_kind[k]) for k in PARAMS_KEYS))
        except ConfigError as exc:
            raise ConfigError(f"recipe {text!r}: {exc}") from None

    @property
    def text(self) -> str:
        """The text form (`parse`); the options are `options()`. Raises when the scheme has
        no text (FP formats, asymmetric activations, ...): use the params form then."""
        scheme = self.scheme.text
        if scheme is None:
            raise ConfigError(f"scheme {self.scheme.to_dict()} has no text form; use Recipe.params()")
        return "+".join(s.method for s in self.steps) + ":" + scheme

    def options(self) -> dict[str, dict[str, Any]]:
        """Options that differ from each method's defaults, by method."""
        return {s.method: s.spec()[s.method] for s in self.steps if isinstance(s.spec(), dict)}

    def __str__(self) -> str:
        try:
            return self.text
        except ConfigError:
            return "+".join(s.method for s in self.steps) + ":" + self.scheme.name

    # -- params form ------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """params.yaml keys -> values that select this recipe (DVC `-S` / sweep overrides)."""
        return {"scheme": self.scheme.to_dict(),
                **{key: [s.spec() for s in getattr(self, kind)] for kind, key in PARAMS_KEYS.items()}}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Recipe:
        """The recipe of a params.yaml mapping (its `scheme` and stages' `steps`)."""
        def get(key: str) -> Any:
            node: Any = params
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            return node

        scheme = QuantScheme.from_dict(params.get("scheme"), "scheme")
        return cls(scheme, *(parse_steps(get(key), key) for key in PARAMS_KEYS.values()))
