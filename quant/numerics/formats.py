"""Number formats: what a quantized value can be.

Formats are *types*, not ints: `IntFormat(bits=4)` today, floating-point
formats (LLM-FP4) next. A format is written in params as a short string
(`int4`) and parsed by `parse_format`, so a new format is a new class plus one
parser entry. Every format is a `NumberFormat`, the type scheme fields carry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from quant.config.base import Config, ConfigError


@dataclass(frozen=True)
class NumberFormat(Config):
    """Base of every number format; parses the short string form of any format."""

    @classmethod
    def parse(cls, text: Any, path: str = "format") -> NumberFormat:
        return parse_format(text, path)


@dataclass(frozen=True)
class IntFormat(NumberFormat):
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


