"""Name -> implementation registries (one per pipeline stage).

Algorithms register themselves with a decorator; a stage looks its method up
by the name in params.yaml, and an unknown name gets an error listing the
known ones. Each entry carries the options dataclass the method accepts, so
`calibrate.options` is validated by the method that will use it.

Every registry is discovered the same way: it names the modules that hold its
methods (`modules`), and the first lookup imports all of them. A listed module
that does not exist is an error, never silently skipped (a misspelt module
would otherwise make its methods vanish).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from quant.config import Config, ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Any]
    options: type[Config]


class Registry:
    def __init__(self, stage: str, modules: Sequence[str] = ()) -> None:
        self.stage = stage
        self.modules = tuple(modules)
        self._entries: dict[str, Entry] = {}
        self._discovered = False

    def discover(self) -> Registry:
        """Import every module of `modules` (once), so their methods register."""
        if not self._discovered:
            self._discovered = True
            for name in self.modules:
                try:
                    importlib.import_module(name)
                except ModuleNotFoundError as exc:
                    if exc.name != name:
                        raise
                    self._discovered = False
                    raise RuntimeError(
                        f"the {self.stage} registry lists the method module {name!r}, which does "
                        "not exist; fix the module list of this registry"
                    ) from None
        return self

    def register(self, name: str, options: type[Config]) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            if name in self._entries:
                raise RuntimeError(f"{self.stage} method {name!r} registered twice")
            self._entries[name] = Entry(name, fn, options)
            return fn

        return deco

    def get(self, name: str, field: str | None = None) -> Entry:
        self.discover()
        if name not in self._entries:
            raise ConfigError(
                f"{field or self.stage + '.method'}={name!r} is not a known method; "
                f"known: {sorted(self._entries)}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)
