"""Hadamard matrices and the fast Hadamard transform (QuaRot's rotations).

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n)
is orthogonal. Orders used here:

- n = 2^m: Sylvester's construction, H_2n = [[H_n, H_n], [H_n, -H_n]];
- n = k * 2^m with k not a power of two: H_k (x) H_2^m (Kronecker product),
  where H_k is a known base matrix. The base matrices are not typed in here:
  they are read from the `hadamards.safetensors` that compressed-tensors ships
  (`compressed_tensors/transform/utils/`, one int8 +-1 matrix per order, keyed
  by the order as a string: every multiple of 4 up to 256). Among the base
  orders that fit, the smallest is taken (the cheapest online transform):
  576 = 36 x 16, 1536 = 12 x 128, 11008 = 172 x 64, as in QuaRot.

Any other n (an odd factor with no base matrix, e.g. 9 heads) raises
`ConfigError` naming the size and what is accepted.

`hadamard_transform(x, n)` computes x @ (H_n / sqrt(n)) along the last
dimension without forming H_n: x viewed as [..., k, 2^m] is multiplied by
H_k^T on the left and transformed by the fast Walsh-Hadamard butterfly
(log2(2^m) additions) on the right, which is (H_k (x) H_2^m) for a row vector.
`random_hadamard(n, seed)` = H_n diag(s) / sqrt(n) with seeded random signs s:
QuaRot's random orthogonal Hadamard for the residual stream.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from quant.config import ConfigError

_BASE_FILE = ("compressed_tensors", "transform/utils/hadamards.safetensors")


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.cache
def _base_matrices() -> dict[int, torch.Tensor]:
    """Non-power-of-two base Hadamard matrices {order: int8 [k, k]} from compressed-tensors."""
    spec = importlib.util.find_spec(_BASE_FILE[0])
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "Hadamard matrices of non-power-of-two orders need the base matrices shipped by "
            "compressed-tensors: pip install compressed-tensors==0.20.0"
        )
    from safetensors.torch import load_file

    path = Path(spec.submodule_search_locations[0]) / _BASE_FILE[1]
    return {int(k): v for k, v in load_file(str(path)).items() if not is_pow2(int(k))}


def base_orders() -> list[int]:
    return sorted(_base_matrices())


def factor(n: int) -> tuple[int, int]:
    """n -> (k, p) with n = k * p, p a power of two and k = 1 or a known base order."""
    if is_pow2(n):
        return 1, n
    for k in base_orders():
        if n % k == 0 and is_pow2(n // k):
            return k, n // k
    raise ConfigError(
        f"no Hadamard matrix construction for size {n}: accepted are powers of two and "
        f"k * 2^m with k one of the base orders {base_orders()} (compressed-tensors' "
        "hadamards.safetensors)"
    )


def check_size(n: int, what: str) -> None:
    """Raise ConfigError naming `what` if no Hadamard matrix of order n is constructible."""
    try:
        factor(n)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def sylvester(p: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order p (a power of two), entries +-1."""
    if not is_pow2(p):
        raise ValueError(f"sylvester order {p} is not a power of two")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < p:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def base_matrix(k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    if k == 1:
        return torch.ones(1, 1, dtype=dtype)
    return _base_matrices()[k].to(dtype)


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (unnormalised, +-1) Hadamard matrix of order n = H_k (x) H_p."""
    k, p = factor(n)
    return torch.kron(base_matrix(k, dtype), sylvester(p, dtype))


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthogonal Q = H_n diag(s) / sqrt(n), s uniform random signs from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(dtype) * 2 - 1
    return hadamard(n, dtype) * signs / n**0.5


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ H_p (Sylvester, unnormalised) along the last dim, p a power of two."""
    p = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, p)
        h *= 2
    return x


def hadamard_transform(
    x: torch.Tensor, n: int, base: torch.Tensor | None = None, transpose: bool = False
) -> torch.Tensor:
    """x @ (H_n / sqrt(n)) along the last dim (which must be n), or x @ (H_n / sqrt(n))^T
    with `transpose`; `base` = H_k in x's dtype (saves a host->device copy per call)."""
    k, p = factor(n)
    if x.shape[-1] != n:
        raise ValueError(f"last dim {x.shape[-1]} != Hadamard size {n}")
    lead = x.shape[:-1]
    y = x.reshape(*lead, k, p)  # row vector (i, j) -> (H_k^T X H_p)[a, b]
    if k > 1:
        hk = base if base is not None else base_matrix(k, x.dtype).to(x.device)
        y = torch.matmul(hk if transpose else hk.t(), y)  # H_p is symmetric
    return (fwht(y) / n**0.5).reshape(*lead, n)
