"""Number formats: what a quantized value can be.

Formats are *types*, not ints: `IntFormat(bits=4)`, `FPFormat(exponent=2,
mantissa=1)` (LLM-FP4) and the block-scaled FP4 formats `MXFP4Format` /
`NVFP4Format`. A format is written in params as a short string (`int4`,
`fp4-e2m1`, `fp8-e4m3`, `mxfp4`, `nvfp4`) and parsed by `parse_format`, so a new
format is a new class plus one parser entry. Every format is a `NumberFormat`,
the type scheme fields carry; code that quantizes dispatches on the type
(`quant.numerics.grid` for integers, `quant.numerics.fp` for floating point).

FP formats here follow LLM-FP4: one sign bit, E exponent and M mantissa bits,
subnormals, no inf/NaN codes (the all-ones exponent is an ordinary binade) and
a real-valued exponent bias chosen per tensor/channel by calibration, so the
format fixes only the *shape* of the grid. The block-scaled formats follow
their hardware definitions instead: E2M1 elements with the standard bias 1
(values 0, 0.5, 1, 1.5, 2, 3, 4, 6) and a shared scale per block: a power of two
(E8M0) per 32 elements for MXFP4 (OCP MX v1.0), an FP8 E4M3 scale per 16
elements times a per-tensor fp32 scale for NVFP4.
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


@dataclass(frozen=True)
class FPFormat(NumberFormat):
    """Sign + `exponent` + `mantissa` bits, subnormals, no inf/NaN, real-valued bias."""

    exponent: int
    mantissa: int
    kind: ClassVar[str] = "fp"
    # (E, M) pairs accepted: 4, 6 and 8 bits, as LLM-FP4 and the OCP formats use them.
    ACCEPTED: ClassVar[tuple[tuple[int, int], ...]] = (
        (2, 1), (3, 0), (1, 2), (2, 3), (3, 2), (4, 3), (5, 2),
    )

    def __post_init__(self) -> None:
        if (self.exponent, self.mantissa) not in self.ACCEPTED:
            raise ConfigError(
                f"e{self.exponent}m{self.mantissa} is not a supported floating-point format; "
                f"accepted: {accepted_formats()}"
            )

    @property
    def bits(self) -> int:
        return 1 + self.exponent + self.mantissa

    @property
    def standard_bias(self) -> int:
        """The IEEE-style bias 2^(E-1) - 1 (E2M1: 1, E4M3: 7, E5M2: 15)."""
        return 2 ** (self.exponent - 1) - 1

    def same_bits(self) -> tuple[FPFormat, ...]:
        """Every accepted FP format of this bit width (the format-search candidates)."""
        return tuple(FPFormat(e, m) for e, m in self.ACCEPTED if 1 + e + m == self.bits)

    def spec(self) -> str:
        return f"fp{self.bits}-e{self.exponent}m{self.mantissa}"


@dataclass(frozen=True)
class BlockFPFormat(NumberFormat):
    """E2M1 elements sharing one scale per block of `block_size` elements (RTN only)."""

    name: ClassVar[str] = ""
    block_size: ClassVar[int] = 0
    bits: ClassVar[int] = 4

    def spec(self) -> str:
        return self.name


@dataclass(frozen=True)
class MXFP4Format(BlockFPFormat):
    """OCP MXFP4: E2M1 elements, one E8M0 (power-of-two) scale per 32 elements."""

    name: ClassVar[str] = "mxfp4"
    block_size: ClassVar[int] = 32


@dataclass(frozen=True)
class NVFP4Format(BlockFPFormat):
    """NVIDIA NVFP4: E2M1 elements, an FP8 E4M3 scale per 16 elements, an fp32 tensor scale."""

    name: ClassVar[str] = "nvfp4"
    block_size: ClassVar[int] = 16


BLOCK_FORMATS: dict[str, type[BlockFPFormat]] = {"mxfp4": MXFP4Format, "nvfp4": NVFP4Format}


def accepted_formats() -> list[str]:
    fps = [f"fp{1 + e + m}-e{e}m{m}" for e, m in FPFormat.ACCEPTED]
    return ["int2..int8", *fps, *BLOCK_FORMATS]


_FORMAT_RE = re.compile(r"^int(\d+)$")
_FP_RE = re.compile(r"^fp(\d+)-e(\d+)m(\d+)$")


def parse_format(value: Any, path: str = "format") -> NumberFormat:
    """Parse `int4`, `fp4-e2m1`, `mxfp4`, ... (or a format object); the error names `path`."""
    if isinstance(value, NumberFormat):
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
        text = value.strip().lower()
        if text in BLOCK_FORMATS:
            return BLOCK_FORMATS[text]()
        m = _FP_RE.match(text)
        if m:
            bits, e, mant = (int(g) for g in m.groups())
            if 1 + e + mant != bits:
                raise ConfigError(
                    f"{path}={value!r}: sign + exponent + mantissa = 1 + {e} + {mant} = "
                    f"{1 + e + mant} bits, not {bits}; accepted: {accepted_formats()}"
                )
            try:
                return FPFormat(e, mant)
            except ConfigError as exc:
                raise ConfigError(f"{path}={value!r}: {exc}") from None
    raise ConfigError(
        f"{path}={value!r} is not a known number format; accepted: {accepted_formats()}"
    )


