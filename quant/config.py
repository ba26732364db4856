"""Typed, self-validating configuration.

Every section of params.yaml maps to a frozen dataclass derived from `Config`.
`Config.from_dict` rejects unknown keys (a typo in a recipe fails loudly instead
of silently falling back to a default) and wraps every validation error so the
message names the full dotted field path, e.g. `scheme.weight.group_size`.

Numeric formats are *types*, not ints: `IntFormat(bits=4)` today, an FP format
(LLM-FP4 search) later. A format is written in params as a short string
(`int4`, later `fp4_e2m1`) and parsed by `parse_format`, so a new format is a
new class plus one parser entry.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what is accepted."""


def _qualify(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a plain (YAML) value into the annotated type `tp`, naming `path` on error."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}={value!r} is not accepted; use one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is NumberFormat:
        return parse_format(value, path)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and hasattr(tp, "parse"):
            return tp.parse(value, path)
        return tp.from_dict(value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class Config:
    """Base for every config dataclass: strict dict round trip, field-named errors."""

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> typing.Self:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path or cls.__name__} must be a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {[_qualify(path, k) for k in unknown]}; "
                f"accepted keys under {path or cls.__name__}: {sorted(fields)}"
            )
        kwargs = {k: _coerce(v, hints[k], _qualify(path, k)) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            msg = str(exc)
            if path and not msg.startswith(path):
                msg = f"{path}.{msg}"
            raise ConfigError(msg) from None
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{path or cls.__name__}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict() if not hasattr(v, "spec") else v.spec()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


# ---------------------------------------------------------------------------
# Number formats


@dataclass(frozen=True)
class IntFormat(Config):
    """Uniform integer grid of `bits` bits.

    Asymmetric grids are unsigned [0, 2^b - 1] with an integer zero point in that
    range; symmetric grids are signed [-2^(b-1), 2^(b-1) - 1] with zero point 0.
    """

    bits: int
    kind: ClassVar[str] = "int"
    min_bits: ClassVar[int] = 2
    max_bits: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if not self.min_bits <= self.bits <= self.max_bits:
            raise ConfigError(
                f"bits={self.bits} is not supported; integer formats accept "
                f"{self.min_bits}..{self.max_bits} bits"
            )

    def qrange(self, symmetric: bool) -> tuple[int, int]:
        if symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def spec(self) -> str:
        return f"int{self.bits}"

    @classmethod
    def parse(cls, text: str, path: str = "format") -> IntFormat:
        return parse_format(text, path)  # type: ignore[return-value]


NumberFormat = IntFormat  # FP formats join this union in the LLM-FP4 issue

_FORMAT_RE = re.compile(r"^int(\d+)$")


def parse_format(value: Any, path: str = "format") -> NumberFormat:
    """Parse `int4` (or an IntFormat) into a format object; the error names `path`."""
    if isinstance(value, IntFormat):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"int{value}"
    if isinstance(value, str):
        m = _FORMAT_RE.match(value.strip().lower())
        if m:
            try:
                return IntFormat(int(m.group(1)))
            except ConfigError as exc:
                raise ConfigError(f"{path}={value!r}: {exc}") from None
    raise ConfigError(
        f"{path}={value!r} is not a known number format; accepted: "
        f"'int2'..'int8' (floating-point formats are planned)"
    )


# ---------------------------------------------------------------------------
# Quantization scheme


@dataclass(frozen=True)
class WeightSpec(Config):
    """Static weight quantization: format, granularity and symmetry."""

    format: NumberFormat = field(default_factory=lambda: IntFormat(4))
    group_size: int = 64  # -1 = one group per output channel
    symmetric: bool = False
    # LLM-QAT: recompute the min-max step size (and zero point) from the current
    # weight at every forward pass instead of using the stored, learnable ones.
    dynamic_minmax: bool = False

    def __post_init__(self) -> None:
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(
                f"group_size={self.group_size} is not accepted; use -1 (per output channel) "
                "or a positive group size that divides in_features"
            )

    @property
    def bits(self) -> int:
        return self.format.bits

    def check_layer(self, name: str, in_features: int, path: str = "scheme.weight") -> None:
        """Raise if the group size does not divide this layer's input width."""
        if self.group_size != -1 and in_features % self.group_size:
            divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            raise ConfigError(
                f"{path}.group_size={self.group_size} does not divide in_features={in_features} "
                f"of {name}; use -1 (per channel) or a divisor such as {divisors or [in_features]}"
            )


@dataclass(frozen=True)
class ActivationSpec(Config):
    """Dynamic quantization of every quantized linear's input (LLM-QAT: per token)."""

    format: NumberFormat = field(default_factory=lambda: IntFormat(8))
    granularity: Literal["per_token", "per_tensor"] = "per_token"
    symmetric: bool = False


@dataclass(frozen=True)
class KVCacheSpec(Config):
    """Quantization of keys and values where they are produced (and stored in the cache)."""

    format: NumberFormat = field(default_factory=lambda: IntFormat(8))
    granularity: Literal["per_token", "per_head"] = "per_token"
    symmetric: bool = False


_SCHEME_RE = re.compile(r"^W(\d+)A(\d+)KV(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class QuantScheme(Config):
    """What is quantized and how. `None` means that tensor stays in high precision."""

    weight: WeightSpec | None = field(default_factory=WeightSpec)
    activation: ActivationSpec | None = None
    kv_cache: KVCacheSpec | None = None
    quantize_lm_head: bool = False
    quantize_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.quantize_embeddings:
            raise ConfigError(
                "quantize_embeddings=true is not supported yet (embedding quantization "
                "arrives with packed export); use false"
            )

    @property
    def name(self) -> str:
        """W{w}A{a}KV{kv} with 16 for a tensor that is not quantized, plus group size."""
        w = self.weight.bits if self.weight else 16
        a = self.activation.format.bits if self.activation else 16
        kv = self.kv_cache.format.bits if self.kv_cache else 16
        text = f"W{w}A{a}KV{kv}"
        if self.weight and self.weight.group_size != -1:
            text += f"g{self.weight.group_size}"
        return text

    @classmethod
    def from_name(cls, name: str, group_size: int = -1, **kwargs: Any) -> QuantScheme:
        """Parse `W4A8KV4` (16 = not quantized) into a scheme."""
        m = _SCHEME_RE.match(name.strip())
        if not m:
            raise ConfigError(f"scheme name {name!r} is not of the form W<w>A<a>KV<kv>, e.g. W4A8KV4")
        w, a, kv = (int(g) for g in m.groups())
        return cls(
            weight=None if w == 16 else WeightSpec(IntFormat(w), group_size, kwargs.pop("symmetric", False)),
            activation=None if a == 16 else ActivationSpec(IntFormat(a)),
            kv_cache=None if kv == 16 else KVCacheSpec(IntFormat(kv)),
            **kwargs,
        )


def flatten(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys (for MLflow params and DVC)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out
