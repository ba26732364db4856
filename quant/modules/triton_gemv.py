"""This project's own Triton kernel for low-bit decode: `y = x @ ((q - z) * s)^T` from
GPTQ-layout packed weights, for bits 2/4/8 (codes never straddle a word).

Why a kernel of our own: at batch 1 a decode step only streams weights, and the
shipped kernels (gemlite, torch's tinygemm) move ~1.4 TB/s on an H200 where fp16 moves
3.2 (ASSETS.md), short of the 2.5x target. This kernel reads the packed words exactly
once, in the layout the checkpoint already has (`qweight` [K*b/32, N], contiguous
along N, so a block of output columns is one coalesced load per word row), unpacks
32/b codes per word in registers, and applies one step size and zero point per
(group, column) - loaded once per K block, because a K block never crosses a group.
Split-K spreads the reduction over enough programs to fill the GPU at N = 4096, and
partial sums (fp32 inside a program) meet through an atomic add into the half output. Batch 1 reduces with `tl.sum` (no tensor
cores needed: it is bandwidth-bound); batches up to 16 use `tl.dot` on a 16-row tile.
Block sizes, split and warps are autotuned per (M, N, K) at the first call (outside
any CUDA graph: the decode benchmark warms up eagerly before capture).

Zero points are kept unpacked as half floats [G, N] beside the packed codes (2 bytes
per group and column instead of b bits: +0.19 bits per weight at g64), so the kernel
does no second unpacking. Not bit-equal to the CPU reference (fp32 accumulation in
another order, split-K partial sums added in half precision): compared within a
tolerance in the tests (GPU-marked) and under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend reports the install command when asked for
    triton = None

KERNEL_BITS = (2, 4, 8)


def available() -> bool:
    return triton is not None


if triton is not None:

    def _configs():
        out = []
        for bn in (32, 64, 128):
            for bk in (32, 64, 128, 256):
                for split in (1, 2, 4, 8):
                    for warps in (4, 8):
                        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split},
                                                 num_warps=warps, num_stages=3))
        return out

    def _prune(configs, named_args, **kw):
        k, g = named_args["K"], named_args["GROUP"]
        ok = [c for c in configs if g % c.kwargs["BLOCK_K"] == 0
              and k % (c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"]) == 0]
        return ok or configs[:1]

    @triton.jit
    def _packed_matmul(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, GROUP,
                       BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        PER: tl.constexpr = 32 // BITS  # codes per int32 word
        WORDS: tl.constexpr = BLOCK_K // PER  # word rows per K block
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        shifts = (tl.arange(0, PER) * BITS)[None, :, None]  # [1, PER, 1]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, K // (BLOCK_K * SPLIT_K)):  # split k: every SPLIT_K-th block
            k0 = (i * SPLIT_K + pid_k) * BLOCK_K
            rows = k0 // PER + tl.arange(0, WORDS)  # [WORDS]
            words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            q = (words[:, None, :] >> shifts) & ((1 << BITS) - 1)  # [WORDS, PER, BLOCK_N]
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))  # k = word * PER + j, GPTQ's order
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0)
            w = ((q.to(tl.float32) - z[None, :].to(tl.float32)) * s[None, :].to(tl.float32))
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None], other=0.0)
            if BLOCK_M == 1:
                acc += tl.sum(x.to(tl.float32).reshape(BLOCK_K, 1) * w, axis=0)[None, :]
            else:
                acc += tl.dot(x, w.to(x.dtype))
        out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        # straight into the half-precision output (zeroed by the caller): no fp32 buffer and no
        # cast kernel per linear; with SPLIT_K = 1 the add onto zero is an exact store
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    _autotuned = triton.autotune(configs=_configs(), key=["M", "N", "K", "GROUP"],
                                 prune_configs_by={"early_config_prune": _prune},
                                 reset_to_zero=["out_ptr"])(_packed_matmul)


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  bits: int, group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (half) @ dequant(qweight [K*b/32, N], scales/zeros [G, N])^T -> [M, N] in x.dtype.
    `config` (BLOCK_N, BLOCK_K, SPLIT_K) skips the autotuner (tests under TRITON_INTERPRET=1)."""
    m, k = x.shape
    n = qweight.shape[1]
    block_m = 1 if m == 1 else max(16, triton.next_power_of_2(m))
    out = torch.zeros(m, n, dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel = _autotuned if config is None else _packed_matmul
    kernel[grid](x.contiguous(), qweight, scales, zeros, out, m, n, k, group_size, BITS=bits, BLOCK_M=block_m,
                 **(config or {}))
    return out
