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


def integer_weights_only(scheme: QuantScheme, options: Any = None, where: str = "this step") -> None:
    """`check` hook (quant.methods) of steps that train or round integer grids (block-wise,
    end-to-end): the scheme must quantize the weights to int2..int8."""
    scheme.require_integer_weights(where)


_SCHEME_RE = re.compile(r"^W(\d+)A(\d+)KV(\d+)$", re.IGNORECASE)
# the compact text of a scheme in a recipe: W4g64 (weight-only, efficientqat preset),
# W4A8KV4 / W4A8KV4g64 (llm-qat preset); no g = one group per output channel
_TEXT_RE = re.compile(r"^W(\d+)(A\d+KV\d+)?(?:g(\d+))?$")

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

    def require_integer_weights(self, stage: str) -> None:
        """Steps that train integer step sizes / zero points (block-wise, end-to-end) or pack
        integer codes cannot carry FP weight formats: say so before any work."""
        if self.weight is None:
            raise ConfigError(f"scheme.weight=null: {stage} trains quantized weights; set scheme.weight")
        if not isinstance(self.weight.format, IntFormat):
            raise ConfigError(
                f"scheme.weight.format={self.weight.format.spec()!r}: {stage} trains and stores "
                "integer grids; accepted: int2..int8 (FP formats are calibrated by rtn or "
                "fp-search, with no block_ap or e2e steps)"
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
    def parse(cls, text: str, path: str = "scheme") -> QuantScheme:
        """The compact text form: `W<w>[g<group>]` is weight-only with the `efficientqat`
        preset (asymmetric, learned step sizes and zero points); `W<w>A<a>KV<kv>[g<group>]`
        uses the `llm-qat` preset (symmetric min-max). Without `g`: per output channel."""
        m = _TEXT_RE.match(text.strip()) if isinstance(text, str) else None
        if not m:
            raise ConfigError(f"{path}={text!r} is not a scheme text; accepted: W<w>[g<group>] "
                              "(weight-only, e.g. W4g64) or W<w>A<a>KV<kv>[g<group>] (e.g. W4A8KV4)")
        w, akv, g = m.groups()
        group = int(g) if g else -1
        if akv is None:
            return cls.from_name(f"W{w}A16KV16", preset="efficientqat", group_size=group, path=path)
        return cls.from_name(f"W{w}{akv}", preset="llm-qat", group_size=group, path=path)

    @property
    def text(self) -> str | None:
        """The compact text (`parse`) of this scheme, or None when no text spells it."""
        if self.weight is None:
            return None
        g = "" if self.weight.group_size == -1 else f"g{self.weight.group_size}"
        a = self.activation.format.bits if self.activation else 16
        kv = self.kv_cache.format.bits if self.kv_cache else 16
        for candidate in (f"W{self.weight.bits}{g}", f"W{self.weight.bits}A{a}KV{kv}{g}"):
            try:
                if QuantScheme.parse(candidate) == self:
                    return candidate
            except ConfigError:
                continue
        return None

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
