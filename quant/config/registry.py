"""Name -> implementation registries (one per pipeline stage).

Algorithms register themselves with a decorator; a stage looks its method up
by the name in params.yaml, and an unknown name gets an error listing the
known ones. Each entry carries the options dataclass the method accepts, so
`calibrate.options` is validated by the method that will use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quant.config import Config, ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Any]
    options: type[Config]


class Registry:
    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, options: type[Config]) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            if name in self._entries:
                raise RuntimeError(f"{self.stage} method {name!r} registered twice")
            self._entries[name] = Entry(name, fn, options)
            return fn

        return deco

    def get(self, name: str, field: str | None = None) -> Entry:
        if name not in self._entries:
            raise ConfigError(
                f"{field or self.stage + '.method'}={name!r} is not a known method; "
                f"known: {sorted(self._entries)}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)
