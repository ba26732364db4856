"""Typed, self-validating configuration.

Every section of params.yaml maps to a frozen dataclass derived from `Config`.
`Config.from_dict` rejects unknown keys (a typo in a recipe fails loudly instead
of silently falling back to a default) and wraps every validation error so the
message names the full dotted field path, e.g. `scheme.weight.group_size`.

A field typed with a class that has a `parse` classmethod (a number format,
`quant.numerics.formats`) also accepts that class's short string form.

A float must be finite (YAML's `.nan`, `.inf` are refused, naming the field): no knob of
this project means anything at NaN or infinity, and a non-finite learning rate, weight
decay or clipping norm trains a model into garbage without any error. A field that does
accept them says so with `field(metadata={ALLOW_NONFINITE: True})`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what is accepted."""


class InputError(ConfigError):
    """An input file or working state is unusable (corrupt, truncated, tampered, locked by
    another process): the message names the file. A ConfigError so stages exit 2 with one
    line: re-running the same command cannot heal it."""


class TrainingDivergedError(ConfigError):
    """Training made the model far worse (a non-finite loss, or a validation loss that ended
    far above where it started). A ConfigError because runs are deterministic: the same
    params diverge the same way, so it is reported in one line (exit 2) and never retried."""


ALLOW_NONFINITE = "allow_nonfinite"  # dataclasses.field metadata: this float may be nan/inf


class MissingDependencyError(RuntimeError):
    """An optional package is not installed; the message gives the install command."""


def _qualify(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(value: Any, tp: Any, path: str, nonfinite: bool = False) -> Any:
    """Convert a plain (YAML) value into the annotated type `tp`, naming `path` on error.
    `nonfinite`: a float may be nan/inf (refused otherwise)."""
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
                return _coerce(value, arg, path, nonfinite)
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
        items = [_coerce(v, item_tp, f"{path}[{i}]", nonfinite) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if hasattr(tp, "parse") and not isinstance(value, dict):
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
        if not nonfinite and not math.isfinite(value):
            raise ConfigError(f"{path}={value} is not accepted; use a finite number")
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
        kwargs = {k: _coerce(v, hints[k], _qualify(path, k), fields[k].metadata.get(ALLOW_NONFINITE, False))
                  for k, v in data.items()}
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
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(v: Any) -> Any:
    """A config value as plain data: nested configs by their `spec()` (a number format's short
    string, a recipe step's params form) or `to_dict()`, sequences as lists."""
    if isinstance(v, Config):
        return v.spec() if hasattr(v, "spec") else v.to_dict()
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def flatten(d: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys (for MLflow params and DVC); a non-mapping
    `d` is the one leaf `{prefix: d}`, an empty mapping stays a leaf."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out
