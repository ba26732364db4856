"""Block plumbing of the block-wise engine: input capture, the full-precision block, and the
forward passes over activation caches (quant.blockwise.engine runs them; methods call
make_loss_fn / mean_loss).

Forward-only passes are pipelined like training steps: the whole batch plan is
known, so the next batch is fetched on a side stream (read ahead on a thread
from disk) while the current one computes, and results go back to the cache
through a `CacheWriter` (non_blocking into pinned memory with one sync per pass,
a writer thread for disk, a plain copy on the device). A pass over `src` into
`dst = src` is safe: batch k+1's rows are read before anything writes them, and
a pass's writes are complete when it returns.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from quant.blockwise.cache import ActivationCache, Prefetcher
from quant.models.arch import ArchMapping, decoder_layers, get_module, mapping_for, set_module
from quant.modules.linear import QuantLinear
from quant.modules.rotation import QKRotation, drop_key_quantizers, move_input_rotation


def _decoder(model: nn.Module, mapping: ArchMapping) -> nn.Module:
    """The module that owns the decoder layer list (LlamaModel for LlamaForCausalLM)."""
    parent = mapping.layers.rpartition(".")[0]
    return get_module(model, parent) if parent else model


def _layers_attr(mapping: ArchMapping) -> str:
    return mapping.layers.rpartition(".")[2]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, ids: torch.Tensor, cache: ActivationCache, batch_size: int,
                         device: torch.device, mapping: ArchMapping | None = None,
                         amp: bool = False) -> dict[str, Any]:
    """Fill `cache` with the inputs of decoder block 0 for `ids` [N, L]; return the block's
    other keyword inputs (position embeddings, mask), captured for a batch of one so that
    they broadcast over any batch size. Only the embedding part and block 0 run (block 0
    under bf16 autocast with `amp`: its output is discarded, the embeddings are exact)."""
    mapping = mapping or mapping_for(model)
    decoder, attr = _decoder(model, mapping), _layers_attr(mapping)
    layers = decoder_layers(model, mapping)
    first = layers[0]
    captured: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["hidden"] = hidden
        if "kwargs" not in captured:
            captured["kwargs"] = {k: v for k, v in kwargs.items()
                                  if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")}
        return None

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(decoder, attr, nn.ModuleList([first]))
    moved = [m for m in decoder.children() if m is not first]
    try:
        decoder.to(device)
        decoder(input_ids=ids[:1].to(device), use_cache=False)  # kwargs for a batch of one
        with cache.writer() as w:
            for i in range(0, ids.shape[0], batch_size):
                with autocast(device, amp):
                    decoder(input_ids=ids[i : i + batch_size].to(device), use_cache=False)
                w.put(i, captured["hidden"].to(cache.data.dtype))
    finally:
        handle.remove()
        setattr(decoder, attr, layers)
        for m in [*moved, first]:
            m.to("cpu")
    return captured["kwargs"]


class _KwargsProbe(nn.Module):
    """Stands in for decoder layer i: records the keyword inputs the decoder gives it."""

    def __init__(self, layer: nn.Module, seen: dict[int, dict[str, Any]], i: int) -> None:
        super().__init__()
        self.seen, self.i = seen, i
        for attr in ("attention_type", "layer_type", "layer_idx"):  # read by some decoders' loops
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, hidden_states, *args, **kwargs):
        self.seen[self.i] = {k: v for k, v in kwargs.items() if k not in _NOT_KWARGS}
        return hidden_states


_NOT_KWARGS = ("hidden_states", "past_key_values", "past_key_value", "use_cache")


@torch.no_grad()
def layer_kwargs(model: nn.Module, ids: torch.Tensor, device: torch.device,
                 mapping: ArchMapping | None = None) -> list[dict[str, Any]]:
    """The keyword inputs of every decoder block (attention mask, position embeddings) for a
    batch of one sequence like `ids[:1]`. Blocks differ where the family mixes layer types:
    Gemma 2/3 alternate sliding-window and full attention (different masks) and Gemma 3
    gives them RoPE of different bases; a block must run with its own. Every layer is
    replaced by a probe while the decoder runs once, so only the embedding part computes."""
    mapping = mapping or mapping_for(model)
    decoder, attr = _decoder(model, mapping), _layers_attr(mapping)
    layers = decoder_layers(model, mapping)
    seen: dict[int, dict[str, Any]] = {}
    setattr(decoder, attr, nn.ModuleList([_KwargsProbe(layer, seen, i) for i, layer in enumerate(layers)]))
    moved = [m for m in decoder.children() if m is not getattr(decoder, attr)]
    try:
        for m in moved:
            m.to(device)
        decoder(input_ids=ids[:1].to(device), use_cache=False)
    finally:
        setattr(decoder, attr, layers)
        for m in moved:
            m.to("cpu")
    return [seen[i] for i in range(len(layers))]


def float_block(block: nn.Module) -> nn.Module:
    """A copy of `block` in full precision: every QuantLinear becomes a plain linear holding
    its full-precision weight (`QuantLinear.full_precision_weight`: the reference weight
    where one is kept, else the float weight), the function block-wise training reconstructs."""
    fp = copy.deepcopy(block)
    for name, m in list(fp.named_modules()):
        if isinstance(m, QuantLinear):
            if m.frozen:
                raise RuntimeError(f"{name} is frozen: its float weight is gone; block-wise training "
                                   "needs the calibrated (trainable) model")
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                            device=m.weight.device, dtype=m.weight.dtype)
            w = m.full_precision_weight()
            lin.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
            if m.bias is not None:
                lin.bias = m.bias
            move_input_rotation(m, lin)  # QuaRot's online rotation is part of the fp function
            set_module(fp, name, lin)
    drop_key_quantizers(fp)  # QuaRot: keys rotated after RoPE, but not quantized, in the target
    return fp


@contextmanager
def full_precision(block: nn.Module):
    """Inside: `block` computes what `float_block(block)` computes, in place: every QuantLinear
    multiplies by its full-precision weight (the reference weight where it keeps one) with no
    input quantizer, and no key / value quantizer
    runs (online rotations stay: they are part of the full-precision function). The
    block-wise engine computes MoE blocks' targets this way instead of keeping a second,
    full-precision copy of every expert on the device."""
    qls = [m for m in block.modules() if isinstance(m, QuantLinear)]
    if any(m.frozen for m in qls):
        raise RuntimeError("full_precision() on a frozen QuantLinear: its float weight is gone")
    # (module, attribute, value while bypassed, value to restore)
    swaps = [(m, "fp_bypass", True, False) for m in qls]
    swaps += [(m, "output_quantizer", None, m.output_quantizer) for m in block.modules()
              if getattr(m, "output_quantizer", None)]
    swaps += [(m, "key_quantizer", None, m.key_quantizer) for m in block.modules()
              if isinstance(m, QKRotation) and m.key_quantizer]
    try:
        for m, attr, bypassed, _ in swaps:
            setattr(m, attr, bypassed)
        yield block
    finally:
        for m, attr, _, restored in swaps:
            setattr(m, attr, restored)


def same_structure(a: nn.Module | dict[str, torch.Tensor], b: nn.Module | dict[str, torch.Tensor]) -> bool:
    """Whether two blocks (or state dicts) hold the same tensors (names and shapes): one
    workspace serves both."""
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def reference_keys(block: nn.Module) -> set[str]:
    """The state_dict keys of the reference weights `block`'s QuantLinears keep."""
    return {f"{name}.reference_weight" for name, m in block.named_modules()
            if isinstance(m, QuantLinear) and m.reference_weight is not None}


def on_grid_without_reference(block: nn.Module) -> list[str]:
    """`block`'s trainable QuantLinears whose full-precision function is their own quantized
    one: no reference weight, and a float weight its fake-quant leaves unchanged (a model
    whose quantizer put the weights on the grid and kept no reference: block-wise targets
    from it would be the quantized outputs themselves, a zero loss)."""
    with torch.no_grad():
        return [name for name, m in block.named_modules()
                if isinstance(m, QuantLinear) and not m.frozen and m.reference_weight is None
                and torch.equal(m.dequantized_weight(), m.weight)]


def cast_linears(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the weights and biases of `block`'s plain linears to `dtype`, in place: what
    autocast does to them on every call, done once (norms and rotations stay as they are)."""
    for m in block.modules():
        if type(m) is nn.Linear:
            m.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
    return block


@torch.no_grad()
def load_float_weights(fp: nn.Module, block: nn.Module) -> None:
    """Load `block`'s full-precision function into `fp`, a float_block of a block of the same
    architecture (full-precision weights into the plain linears, every other state as it is)."""
    src = block.state_dict()
    for name, m in block.named_modules():
        if isinstance(m, QuantLinear):
            if m.frozen:
                raise RuntimeError(f"{name} is frozen: its float weight is gone; block-wise training "
                                   "needs the calibrated (trainable) model")
            src[f"{name}.weight"] = m.full_precision_weight()
    for key, value in fp.state_dict().items():
        value.copy_(src[key])


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def make_forward_fn(block: nn.Module, kwargs: dict[str, Any], device: torch.device, amp: bool,
                    compile: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """forward(x) = block(x) under autocast, optionally through torch.compile (build it once
    per workspace: the weights change in place, the compiled graph stays)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return call_block(block, x, kwargs)

    return torch.compile(forward, dynamic=False) if compile else forward


def _slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def forward_pass(forward: Callable[[torch.Tensor], torch.Tensor], src: ActivationCache, dst: ActivationCache,
                 batch_size: int, prefetch: Prefetcher) -> None:
    """dst[i] = forward(src[i]) for every sample, in batches (dst may be src): batch k+1 is
    fetched while batch k computes, results are written back without waiting."""
    plan = _slices(len(src), batch_size)
    with dst.writer() as w:
        for rows, (x,) in zip(plan, prefetch.batches([src], plan), strict=True):
            w.put(rows.start, forward(x).to(dst.data.dtype))


def run_block(block: nn.Module, src: ActivationCache, dst: ActivationCache, kwargs: dict[str, Any],
              batch_size: int, amp: bool, prefetch: Prefetcher | None = None) -> None:
    """dst[i] = block(src[i]) for every sample, in batches (dst may be src), pipelined."""
    forward_pass(make_forward_fn(block, kwargs, src.device, amp, False), src, dst, batch_size,
                 prefetch or Prefetcher(src.device))


def make_loss_fn(block: nn.Module, kwargs: dict[str, Any], device: torch.device, amp: bool,
                 compile: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(x, y) = MSE(block(x), y) in fp32, optionally through torch.compile (one graph for
    fake-quant, the block and the loss, so fake-quant fuses into a few kernels)."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            out = call_block(block, x, kwargs)
        return F.mse_loss(out.float(), y.float())

    return torch.compile(loss, dynamic=False) if compile else loss


@torch.no_grad()
def mean_loss(loss_fn: Callable, inputs: ActivationCache, targets: ActivationCache, batch_size: int,
              prefetch: Prefetcher | None = None) -> float:
    """Sample-weighted mean of loss_fn over all rows (one host sync); nan without rows."""
    if not len(inputs):
        return float("nan")
    total = torch.zeros((), device=inputs.device)
    plan = _slices(len(inputs), batch_size)
    for x, y in (prefetch or Prefetcher(inputs.device)).batches([inputs, targets], plan):
        total += loss_fn(x, y) * x.shape[0]
    return (total / len(inputs)).item()


def first_nonfinite(losses: torch.Tensor) -> int | None:
    """Index of the first non-finite entry of a 1-d loss record (host sync), or None."""
    bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten()
    return int(bad[0]) if len(bad) else None
