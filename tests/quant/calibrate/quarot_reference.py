"""An independent QuaRot + round-to-nearest, written from the paper on a plain state dict.

It shares no code with `quant/` (no Hadamard transform, no grid, no model mapping): the
Hadamard matrix is Sylvester's (scipy.linalg.hadamard) times the base matrix that
compressed-tensors ships, the residual rotation is a dense matmul, RMSNorm scales are
multiplied into the linears that read them (QuaRot as published: `norms: fuse`), and RTN
is written out here. test_quarot_weights.py (beside it) compares `quant.calibrate.quarot` with it.

Llama parameter names (`model.layers.{i}.self_attn.q_proj.weight`, ...); weight-only
(no online rotations: those only exist when activations or the KV cache are quantized).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import scipy.linalg
import torch
from safetensors.torch import load_file

READS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITES = ("self_attn.o_proj", "mlp.down_proj")


def hadamard(n: int) -> torch.Tensor:
    """+-1 Hadamard of order n = k * 2^m: kron(H_k, H_2^m), H_k from compressed-tensors."""
    for k in [1] + sorted(int(key) for key in _ct_bases()):
        p = n // k
        if n % k == 0 and p & (p - 1) == 0:
            base = torch.ones(1, 1, dtype=torch.float64) if k == 1 else _ct_bases()[str(k)].double()
            return torch.kron(base, torch.from_numpy(scipy.linalg.hadamard(p)).double())
    raise ValueError(f"no Hadamard of order {n} here")


def _ct_bases() -> dict[str, torch.Tensor]:
    root = Path(importlib.util.find_spec("compressed_tensors").submodule_search_locations[0])
    return load_file(str(root / "transform" / "utils" / "hadamards.safetensors"))


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """H diag(s) / sqrt(n), signs s = 2 * randint(0, 2) - 1 from torch.Generator(seed)."""
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    return hadamard(n) * signs / n**0.5


def rotate_state_dict(sd: dict[str, torch.Tensor], n_layers: int, seed: int) -> dict[str, torch.Tensor]:
    """Untie, fuse every RMSNorm scale into its readers, rotate the residual by Q. fp32 out."""
    sd = {k: v.clone() for k, v in sd.items()}
    sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"].clone())  # untie
    q = random_hadamard(sd["model.embed_tokens.weight"].shape[1], seed)
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        for norm, readers in (("input_layernorm", READS[:3]), ("post_attention_layernorm", READS[3:])):
            g = sd[pre + norm + ".weight"].float()
            for r in readers:
                sd[pre + r + ".weight"] = sd[pre + r + ".weight"].float() * g
            sd[pre + norm + ".weight"] = torch.ones_like(g)
        for r in READS:
            sd[pre + r + ".weight"] = (sd[pre + r + ".weight"].double() @ q).float()
        for w in WRITES:
            sd[pre + w + ".weight"] = (q.t() @ sd[pre + w + ".weight"].double()).float()
    g = sd["model.norm.weight"].float()
    sd["lm_head.weight"] = ((sd["lm_head.weight"].float() * g).double() @ q).float()
    sd["model.norm.weight"] = torch.ones_like(g)
    sd["model.embed_tokens.weight"] = (sd["model.embed_tokens.weight"].double() @ q).float()
    return sd


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Min-max round-to-nearest per row (group -1) or per group of `group` columns."""
    rows, cols = w.shape
    g = cols if group == -1 else group
    x = w.float().reshape(rows, cols // g, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-6)
        return (torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s).reshape(rows, cols)
    qmax = 2**bits - 1
    hi, lo = x.amax(-1, keepdim=True).clamp(min=0), x.amin(-1, keepdim=True).clamp(max=0)
    s = ((hi - lo) / qmax).clamp(min=1e-6)
    z = torch.clamp(-torch.round(lo / s), 0, qmax)
    return ((torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s).reshape(rows, cols)


def quantize_state_dict(sd: dict[str, torch.Tensor], n_layers: int, bits: int, group: int,
                        symmetric: bool) -> dict[str, torch.Tensor]:
    """RTN on every decoder linear (embeddings, norms and lm_head stay as they are)."""
    out = dict(sd)
    for i in range(n_layers):
        for name in READS + WRITES:
            key = f"model.layers.{i}.{name}.weight"
            out[key] = rtn(sd[key], bits, group, symmetric)
    return out
