"""Fused Triton kernels for the Llama layer's small ops on CUDA.

Each replaces several PyTorch launches (which dominate a decode step once the matmuls are small)
with one, rounding exactly where the PyTorch code in ``layers.py`` and ``rope.py`` rounds, so the two paths agree
to within reduction order:

- ``rms_norm``: optional residual add (rounded to the activation dtype, as ``x + residual`` is),
  then RMSNorm in float32, rounded, then times the weight.
- ``rotary_``: rotate_half rotary embedding of q and k, in place on the fused qkv output (its
  steps ``rotary_table`` and ``rotate_heads_`` are shared with ``attention.rotary_write_kv``,
  which also stores K and V in the cache).
- ``rms_norm_heads_``: the per-head RMSNorm of q and k (Qwen3), in place on the same output (its
  step ``norm_heads_`` is shared with ``attention.rotary_write_kv``, which can norm q and k first).
- ``silu_and_mul``: ``silu(gate)`` rounded, times ``up``, rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    out_ptr,
    res_out_ptr,
    w_ptr,
    eps,
    n_cols,
    stride_x,
    stride_r,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(
            x.dtype
        )
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``norm(x)``, or ``(norm(x + residual), x + residual)`` when a residual is given."""
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else out
    if rows:
        block = triton.next_power_of_2(cols)
        _rms_norm_kernel[(rows,)](
            x,
            residual if residual is not None else x,
            out,
            res_out,
            weight,
            eps,
            cols,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            HAS_RES=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return out if residual is None else (out, res_out)


@triton.jit
def rotary_table(cos_sin_ptr, pos, HALF: tl.constexpr):
    """cos and sin of position ``pos`` from the ``[max_positions, 2 * HALF]`` table, as ``[1, HALF]`` rows."""
    d = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * (2 * HALF) + d)[None, :]
    sin = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + d)[None, :]
    return cos, sin


@triton.jit
def rotate_heads_(base, cos, sin, mask, HALF: tl.constexpr):
    """Rotate the leading ``2 * HALF`` dims of the heads at ``base`` (``[heads, 1]`` pointers) in
    place, rotate_half in float32 rounded once; returns the rotated halves as stored."""
    d = tl.arange(0, HALF)[None, :]
    x1 = tl.load(base + d, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + d, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    y1 = (a * cos - b * sin).to(x1.dtype)
    y2 = (b * cos + a * sin).to(x1.dtype)
    tl.store(base + d, y1, mask=mask)
    tl.store(base + HALF + d, y2, mask=mask)
    return y1, y2


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cos_sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    NUM_Q: tl.constexpr,
    NUM_K: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = rotary_table(cos_sin_ptr, tl.load(pos_ptr + t), HALF)
    h = tl.arange(0, HEADS_PAD)[:, None]
    rotate_heads_(q_ptr + t * stride_qt + h * stride_qh, cos, sin, h < NUM_Q, HALF)
    rotate_heads_(k_ptr + t * stride_kt + h * stride_kh, cos, sin, h < NUM_K, HALF)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate q ``[T, H, D]`` and k ``[T, Hkv, D]`` in place (strided views of the qkv output):
    the leading ``cos_sin.shape[1]`` dims of each head (all of them unless partial rotary)."""
    tokens, num_q, _ = q.shape
    if tokens == 0:
        return
    _rotary_kernel[(tokens,)](
        q,
        k,
        positions,
        cos_sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        NUM_Q=num_q,
        NUM_K=k.shape[1],
        HEADS_PAD=triton.next_power_of_2(num_q),
        HALF=cos_sin.shape[1] // 2,
        num_warps=4,
    )


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for the fused gate_up output ``[T, 2I]``."""
    rows, width = x.shape
    cols = width // 2
    out = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    if rows:
        block = 1024
        _silu_and_mul_kernel[(rows, triton.cdiv(cols, block))](x, out, cols, x.stride(0), BLOCK=block, num_warps=4)
    return out


@triton.jit
def norm_heads_(base, w, eps, mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """RMSNorm of the heads at ``base`` (``[heads, 1]`` pointers, each head's values contiguous)
    in place, each over its own ``HEAD_DIM`` values: float32, rounded, times ``w`` (float32,
    ``[1 or heads, BLOCK_D]``), rounded; ``rms_norm``'s rounding. Shared with
    ``attention.rotary_write_kv``, which norms q and k before it rotates them."""
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = mask & (d < HEAD_DIM)
    x = tl.load(base + d, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / HEAD_DIM + eps)
    normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    tl.store(base + d, (w * normed).to(x.dtype), mask=mask)


@triton.jit
def _rms_norm_heads_kernel(
    x_ptr,
    q_w_ptr,
    k_w_ptr,
    eps,
    stride_t,
    num_heads,
    NUM_Q: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One token's heads as rows: each normed over its own dims, q's with one weight, k's with the other.
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    q_w = tl.load(q_w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
    k_w = tl.load(k_w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
    w = tl.where(h < NUM_Q, q_w, k_w)
    norm_heads_(x_ptr + t * stride_t + h * HEAD_DIM, w, eps, h < num_heads, HEAD_DIM, BLOCK_D)


def rms_norm_heads_(qk: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_q: int, eps: float) -> None:
    """RMSNorm of every head of ``qk`` [T, Hq + Hk, D] in place (a strided view of the qkv output,
    each head's D values contiguous): the first ``num_q`` heads with ``q_weight``, the rest with
    ``k_weight``; rounding as ``rms_norm``'s. One launch for what took two norms, two copies and
    a concatenation."""
    tokens, heads, head_dim = qk.shape
    assert qk.stride(2) == 1 and qk.stride(1) == head_dim, "each head's values must be contiguous, heads adjacent"
    if tokens == 0:
        return
    _rms_norm_heads_kernel[(tokens,)](
        qk,
        q_weight,
        k_weight,
        eps,
        qk.stride(0),
        heads,
        NUM_Q=num_q,
        HEADS_PAD=triton.next_power_of_2(heads),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
