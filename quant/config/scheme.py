"""The quantization scheme: what is quantized (weights, activations, KV cache) and how."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from quant.config.base import Config, ConfigError
from quant.numerics.formats import BlockFPFormat, IntFormat, NumberFormat


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
        if isinstance(self.format, BlockFPFormat) and self.group_size != self.format.block_size:
            raise ConfigError(
                f"group_size={self.group_size} does not match format={self.format.spec()!r}, whose "
                f"blocks are {self.format.block_size} elements; accepted: mxfp4 with group_size 32, "
                "nvfp4 with group_size 16"
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

    def require_integer_weights(self, stage: str) -> None:
        """Stages that train integer step sizes / zero points (block_ap, e2e) or pack integer
        codes cannot carry FP weight formats: say so before any work."""
        if self.weight is not None and not isinstance(self.weight.format, IntFormat):
            raise ConfigError(
                f"scheme.weight.format={self.weight.format.spec()!r}: the {stage} stage trains and "
                "stores integer grids; accepted: int2..int8 (FP formats are calibrated by "
                "calibrate.method rtn or fp-search and evaluated from the calibrate stage)"
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
