"""FP8 kernels for Hopper: per-token quantization of activations (``quantize_rows``) and the
few-row GEMV (``fp8_gemv``) that serves calls of up to ``GEMV_MAX_ROWS`` rows, where the
weights' bytes are the whole cost and cuBLASLt's FP8 kernels, made for large tiles, read them
far below the copy bandwidth (docs/benchmarks.md). The layer that uses them is
``models/fp8.py``'s ``Fp8Linear``."""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

log = logging.getLogger("stepserve")

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
MIN_SCALE = 1e-12  # all-zero rows quantize to zeros instead of NaN


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` -> (e4m3 ``[N, K]``, float32 scales ``[N]``) with ``weight ~ q * scale[:, None]``."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_(min=MIN_SCALE)
    return (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of ``quantize_rows`` (tests): per-row scales ``[M, 1]`` float32."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_(min=MIN_SCALE)
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


@triton.jit
def _quantize_rows_kernel(
    x_ptr, out_ptr, scale_ptr, n_cols, stride_x, BLOCK: tl.constexpr, FMAX: tl.constexpr, SMIN: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        v = tl.load(x_ptr + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0) / FMAX, SMIN)
    tl.store(scale_ptr + row, scale)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        v = tl.load(x_ptr + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(v / scale, -FMAX), FMAX)
        tl.store(out_ptr + row * n_cols + start + cols, q.to(tl.float8e4nv), mask=mask)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) dynamic quantization of ``x`` ``[M, K]``: one kernel, two reads of a row."""
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=FP8, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(rows,)](
            x, out, scale, cols, x.stride(0), BLOCK=1024, FMAX=FP8_MAX, SMIN=MIN_SCALE, num_warps=4
        )
    return out, scale


GEMV_MAX_ROWS = 2  # from 4 rows on, _scaled_mm reads the weights faster (bench/fp8_gemv.py)


# (BLOCK_N, BLOCK_K, num_warps) by padded row count, the best of bench/fp8_gemv.py's sweep for the
# Llama-8B projections (docs/benchmarks.md). Fp8Linear takes it up to GEMV_MAX_ROWS only; the
# 4- and 8-row tiles serve direct calls (its tests go to 8 rows).
GEMV_CONFIGS = {1: (8, 1024, 4), 2: (8, 1024, 4), 4: (8, 512, 4), 8: (8, 256, 4)}


def _gemv_config(rows: int, k: int) -> tuple[int, int, int]:
    block_n, block_k, warps = GEMV_CONFIGS[rows]
    return block_n, max(16, min(block_k, 1 << (k - 1).bit_length())), warps


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_x,
    stride_o,
    ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, ROWS)
    m_mask = m < M
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k_mask = start + k < K
        w = tl.load(
            w_ptr + n[:, None].to(tl.int64) * K + start + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
        )
        x = tl.load(
            x_ptr + m[:, None] * stride_x + start + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    y = acc * tl.load(scale_ptr + n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + m[:, None] * stride_o + n[None, :],
        y.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def fp8_gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` for few rows: ``x`` [M, K] in bf16 (or float32),
    ``weight`` [N, K] e4m3, ``scale`` [N] or [1, N] float32; out in ``x``'s dtype."""
    rows, k = x.shape
    n = weight.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    padded = 1 << max(0, (rows - 1).bit_length())
    block_n, block_k, warps = _gemv_config(padded, k)
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        scale,
        bias if bias is not None else scale,
        out,
        rows,
        n,
        k,
        x.stride(0),
        out.stride(0),
        ROWS=padded,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return out
