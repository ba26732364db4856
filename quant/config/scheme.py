"""The quantization scheme: what is quantized (weights, activations, KV cache) and how."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from quant.config.base import Config, ConfigError
from quant.numerics.formats import IntFormat, NumberFormat


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

# Named schemes: the bit widths come from a name like W4A8KV4, the rest from the preset.
# llm-qat: the published LLM-QAT scheme (symmetric min-max everywhere; weights per output
#   channel with the step size recomputed from the weight at every step; activations and
#   the KV cache per token).
# efficientqat: learned asymmetric weight step sizes and zero points per group (64 unless
#   group_size says otherwise); activations / KV (not in the paper) per token, asymmetric.
PRESETS = ("llm-qat", "efficientqat")


def _bits(name: str, path: str) -> tuple[int, int, int]:
    m = _SCHEME_RE.match(name.strip()) if isinstance(name, str) else None
    if not m:
        raise ConfigError(f"{path}={name!r} is not of the form W<w>A<a>KV<kv>, e.g. W4A8KV4")
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


@dataclass(frozen=True)
class QuantScheme(Config):
    """What is quantized and how. `None` means that tensor stays in high precision.

    In params a scheme is either spelled out (`weight`, `activation`, `kv_cache`, ...) or
    named: `{preset: llm-qat, name: W4A8KV4}` (optionally `group_size`), see `PRESETS`."""

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
    def from_dict(cls, data: Any, path: str = "") -> QuantScheme:
        if isinstance(data, dict) and ("preset" in data or "name" in data):
            data = dict(data)
            preset, name = data.pop("preset", None), data.pop("name", None)
            group_size = data.pop("group_size", None)
            where = f"{path}." if path else ""
            if data:
                raise ConfigError(
                    f"{where}preset/{where}name cannot be combined with {sorted(data)}: "
                    "spell the scheme out, or name it as {preset, name, group_size}"
                )
            if preset is None or name is None:
                raise ConfigError(f"a named scheme needs both {where}preset (one of "
                                  f"{list(PRESETS)}) and {where}name (e.g. W4A8KV4)")
            return cls.from_name(name, preset=preset, group_size=group_size, path=path)
        return super().from_dict(data, path)

    @classmethod
    def from_name(cls, name: str, preset: str = "llm-qat", group_size: int | None = None,
                  path: str = "scheme") -> QuantScheme:
        """`W4A8KV4` (16 = not quantized) with the rest of the scheme from `preset`."""
        where = f"{path}." if path else ""
        w, a, kv = _bits(name, f"{where}name")
        if preset not in PRESETS:
            raise ConfigError(f"{where}preset={preset!r} is not known; accepted: {list(PRESETS)}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
            raise ConfigError(f"{where}group_size must be an integer, got {group_size!r}")
        sym = preset == "llm-qat"
        g = group_size if group_size is not None else (-1 if sym else 64)
        try:
            weight = None if w == 16 else WeightSpec(IntFormat(w), g, symmetric=sym, dynamic_minmax=sym)
            act = None if a == 16 else ActivationSpec(IntFormat(a), "per_token", symmetric=sym)
            kvs = None if kv == 16 else KVCacheSpec(IntFormat(kv), "per_token", symmetric=sym)
        except ConfigError as exc:
            raise ConfigError(f"{where}name={name!r}: {exc}") from None
        return cls(weight=weight, activation=act, kv_cache=kvs)
