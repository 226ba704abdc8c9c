"""FP8 kernels for Hopper: the weights' quantization and per-token quantization of activations
(``quantize_rows``). Calls of up to ``GEMV_MAX_ROWS`` rows skip the latter and take
``gemv.gemv`` (its docstring says why). The layer that uses them is ``models/fp8.py``'s
``Fp8Linear``."""

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


GEMV_MAX_ROWS = 2  # from 4 rows on, _scaled_mm reads the weights faster (bench/gemv.py)
