"""Triton kernels for attention over the paged KV cache.

Cache layout per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V). Block
tables map a sequence's logical blocks to physical ones; the null block 0 pads them.

- ``write_kv``: one launch stores K and V of every new token at its slot (the projections'
  outputs are strided views of the fused qkv matmul, so no copy is made first).
- ``rotary_write_kv``: the rotary embedding of q and k (``fused.rotary_``) and ``write_kv`` in
  one launch, the rotated K stored from registers: one launch fewer per layer, which a decode
  step of a CUDA graph pays for in idle GPU time; with Qwen3's per-head q/k norms
  (``fused.rms_norm_heads_``) first, two fewer.
- ``paged_decode``: one new token per sequence. A program owns one (sequence, KV head, split):
  the query heads sharing that KV head are stacked as the rows of one ``tl.dot`` (GQA), so each
  K/V tile is read once for the whole group. Long contexts are split along the sequence into
  ``num_splits`` parts whose partial results are merged by a second kernel (flash-decoding);
  split ranges are computed from the sequence length on the device, so a CUDA graph captured
  with a fixed split count stays valid as sequences grow.
- ``paged_prefill``: variable-length query runs (prompt chunks) attending causally to their
  whole context in the cache, prefix-cache hits included (flash-attention over pages). With GQA
  a program owns (position, head) rows of a whole group, so each K/V tile is loaded once for all
  the query heads that share it (``grouped=False``: one query head per program, the twin, used
  for long runs where it measured faster).

An FP8 cache (``float8_e4m3fn``) holds ``value / scale`` with one scale for K and one for V
per layer: ``write_kv`` divides and saturates, the attention kernels multiply back as they load a
tile (in float32, then the activations' dtype for the dot products).

Both take a sliding ``window`` (keys a query sees, itself included): the loops start at the
window's first key, so pages wholly outside it are never read. ``softcap`` (Gemma 2) maps the
scores to ``softcap * tanh(scores / softcap)`` before the softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepserve.kernels.triton.fused import norm_heads_, rotary_table, rotate_heads_

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # a window no context reaches: the kernels' "attend to everything"
# Prefill runs up to this many tokens take the GQA-grouped program (bench/prefill_kernel.py): it
# wins for short chunks over a long prefix and loses for whole long prompts, where 64 positions
# of one head per program reuse each K/V tile as well (figures in docs/benchmarks.md).
GROUPED_MAX_QUERY_LEN = 64


def _precision(q: torch.Tensor) -> str:
    """float32 stays float32 (tf32 would break parity with the CPU reference); 16-bit is native."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def _cached(x, scale, cache_ptr, KV_FP8: tl.constexpr):
    """``x`` as the cache stores it: ``x / scale`` saturated to e4m3 (it has no infinity) for FP8."""
    if KV_FP8:
        x = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -448.0), 448.0).to(cache_ptr.dtype.element_ty)
    return x


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_ch,
    k_scale,
    v_scale,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < NUM_KV_HEADS
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = slot * stride_cs + h * stride_ch + d
    tl.store(k_cache_ptr + dst, _cached(k, k_scale, k_cache_ptr, KV_FP8), mask=mask)
    tl.store(v_cache_ptr + dst, _cached(v, v_scale, v_cache_ptr, KV_FP8), mask=mask)


def _fp8(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == torch.float8_e4m3fn


def write_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_scale=(1.0, 1.0)
) -> None:
    """Store K/V ``[T, Hkv, D]`` (any row stride, contiguous last dim) at their cache slots."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        kv_scale[0],
        kv_scale[1],
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        KV_FP8=_fp8(kv_cache),
    )


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    pos_ptr,
    cos_sin_ptr,
    q_w_ptr,
    k_w_ptr,
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_ch,
    k_scale,
    v_scale,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    Q_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    TAIL: tl.constexpr,
    KV_FP8: tl.constexpr,
    QK_NORM: tl.constexpr,
    QK_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # rms_norm_heads_'s arithmetic where QK_NORM, then rotary_'s, then write_kv's stores. The
    # rotated K goes to the cache from registers: reloading what this program just stored in place
    # needs a barrier to see it (the rotation's loads of the normed heads take one).
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cos, sin = rotary_table(cos_sin_ptr, tl.load(pos_ptr + t), HALF)
    hq = tl.arange(0, Q_PAD)[:, None]
    h = tl.arange(0, KV_PAD)[:, None]
    mask = h < NUM_KV_HEADS
    k_heads = k_ptr + t * stride_kt + h * stride_kh
    if QK_NORM:  # each head normed in place, then rotated from what was stored
        # q's heads then k's as the rows of one tile, shaped as rms_norm_heads_'s, so that each
        # head's squares are summed in the same order where the compiler lays both out alike
        # (two smaller tiles differed in float32's last bit on an H100).
        hn = tl.arange(0, QK_PAD)[:, None]
        is_q = hn < NUM_HEADS
        heads = tl.where(
            is_q, q_ptr + t * stride_qt + hn * stride_qh, k_ptr + t * stride_kt + (hn - NUM_HEADS) * stride_kh
        )
        d = tl.arange(0, BLOCK_D)[None, :]
        q_w = tl.load(q_w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        k_w = tl.load(k_w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        norm_heads_(heads, tl.where(is_q, q_w, k_w), eps, hn < NUM_HEADS + NUM_KV_HEADS, HEAD_DIM, BLOCK_D)
        tl.debug_barrier()
    rotate_heads_(q_ptr + t * stride_qt + hq * stride_qh, cos, sin, hq < NUM_HEADS, HALF)
    k1, k2 = rotate_heads_(k_heads, cos, sin, mask, HALF)
    dst = k_cache_ptr + slot * stride_cs + h * stride_ch
    d = tl.arange(0, HALF)[None, :]
    tl.store(dst + d, _cached(k1, k_scale, k_cache_ptr, KV_FP8), mask=mask)
    tl.store(dst + HALF + d, _cached(k2, k_scale, k_cache_ptr, KV_FP8), mask=mask)
    if TAIL > 0:  # partial rotary: the dims past the rotated ones pass through
        e = 2 * HALF + tl.arange(0, TAIL)[None, :]
        tail_mask = mask & (e < HEAD_DIM)
        tail = tl.load(k_heads + e, mask=tail_mask)
        tl.store(dst + e, _cached(tail, k_scale, k_cache_ptr, KV_FP8), mask=tail_mask)
    d = tl.arange(0, HEAD_DIM)[None, :]
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache_ptr + slot * stride_cs + h * stride_ch + d, _cached(v, v_scale, v_cache_ptr, KV_FP8), mask=mask)


def rotary_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    kv_scale=(1.0, 1.0),
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> None:
    """``fused.rotary_`` then ``write_kv`` in one launch: rotate q ``[T, H, D]`` and k ``[T, Hkv, D]``
    in place (strided views of the qkv output; the leading ``cos_sin.shape[1]`` dims of each head)
    and store the rotated K and V at their cache slots. With ``qk_norm`` (q's weight [D], k's
    weight [D], eps), ``fused.rms_norm_heads_`` first (Qwen3's q/k norms): a launch fewer again.
    The same arithmetic, so the same bits (with ``qk_norm``, within the last bit: the norms' sums
    follow the tile's layout)."""
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    num_kv_heads, rotary_dim = k.shape[1], cos_sin.shape[1]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    q_weight, k_weight, eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    _rotary_write_kv_kernel[(num_tokens,)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        positions,
        cos_sin,
        q_weight,
        k_weight,
        eps,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        kv_scale[0],
        kv_scale[1],
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        Q_PAD=triton.next_power_of_2(num_heads),
        KV_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        HALF=rotary_dim // 2,
        TAIL=triton.next_power_of_2(head_dim - rotary_dim) if rotary_dim < head_dim else 0,
        KV_FP8=_fp8(kv_cache),
        QK_NORM=qk_norm is not None,
        QK_PAD=triton.next_power_of_2(num_heads + num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )


@triton.jit
def _scores(q, k, scale_log2, softcap, PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """q.k scaled, in log2 units for exp2; soft-capped first when asked (tanh via exp)."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if HAS_SOFTCAP:
        x = qk * (scale_log2 / 1.4426950408889634) / softcap
        qk = (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * (softcap * 1.4426950408889634)
    else:
        qk = qk * scale_log2
    return qk


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    rows_ptr,
    qsl_ptr,
    seq_lens_ptr,
    tables_ptr,
    scale_log2,
    num_splits,
    window,
    softcap,
    k_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_tb,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i)
    else:
        row = i
    tok = tl.load(qsl_ptr + row)  # the sequence's one new token in the packed batch
    seq_len = tl.load(seq_lens_ptr + row)
    first = tl.maximum(seq_len - window, 0)  # the window's first key; the splits share [first, seq_len)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - first, BLOCK_N), num_splits)
    start = first + split * tiles_per_split * BLOCK_N
    end = tl.minimum(seq_len, start + tiles_per_split * BLOCK_N)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    q = tl.load(
        q_ptr + tok.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = tables_ptr + row.to(tl.int64) * stride_tb
    for s in range(start, end, BLOCK_N):
        n = s + tl.arange(0, BLOCK_N)
        nmask = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        offs = block * stride_kb + (n % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
        if KV_FP8:  # dequantize the tiles as they arrive
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        qk = _scores(q, k, scale_log2, softcap, PRECISION, HAS_SOFTCAP)
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    l_safe = tl.where(denom > 0, denom, 1.0)
    out = acc / l_safe[:, None]
    if SPLIT:
        base = (i * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(part_out_ptr + base[:, None] * HEAD_DIM + d[None, :], out, mask=gmask[:, None])
        lse = tl.where(denom > 0, m + tl.math.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + base, lse, mask=gmask)
    else:
        dst = out_ptr + tok.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    rows_ptr,
    qsl_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i)
    else:
        row = i
    tok = tl.load(qsl_ptr + row)
    s = tl.arange(0, SPLITS_PAD)
    smask = s < num_splits
    base = (i * tl.num_programs(1) + h) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.math.exp2(lse - top), 0.0)
    d = tl.arange(0, HEAD_DIM)
    parts = tl.load(
        part_out_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=(smask & (w > 0))[:, None], other=0.0
    )
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + tok.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,
    out: torch.Tensor,  # [T, H, D], written at each decode row's token
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int,
    rows: torch.Tensor | None = None,  # [Bd] rows that decode; None: every row
    block_n: int = 64,
    window: int = 0,  # keys a query sees, itself included; 0: all
    softcap: float = 0.0,  # 0: off
    kv_scale: tuple[float, float] = (1.0, 1.0),  # an FP8 cache's K and V scales
) -> None:
    num_rows = block_tables.shape[0] if rows is None else rows.shape[0]
    if num_rows == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    split = num_splits > 1
    part_out = part_lse = out  # placeholders when unused
    if split:
        part_out = torch.empty(num_rows, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_rows, num_heads, num_splits, dtype=torch.float32, device=q.device)
    rows_arg = rows if rows is not None else query_start_loc
    _paged_decode_kernel[(num_rows, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_out,
        part_lse,
        rows_arg,
        query_start_loc,
        seq_lens,
        block_tables,
        scale * LOG2E,
        num_splits,
        window or NO_WINDOW,
        softcap or 1.0,
        kv_scale[0],
        kv_scale[1],
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        HAS_ROWS=rows is not None,
        SPLIT=split,
        PRECISION=_precision(q),
        HAS_SOFTCAP=softcap > 0,
        KV_FP8=_fp8(kv_cache),
        num_warps=4,
        num_stages=2,
    )
    if split:
        _merge_splits_kernel[(num_rows, num_heads)](
            out,
            part_out,
            part_lse,
            rows_arg,
            query_start_loc,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HAS_ROWS=rows is not None,
        )


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    rows_ptr,
    qsl_ptr,
    seq_lens_ptr,
    tables_ptr,
    scale_log2,
    window,
    softcap,
    k_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_tb,
    GROUP: tl.constexpr,
    STACK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_POS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    # A program owns TILE_POS query positions of one sequence times STACK query heads (1, or the
    # GQA group of one KV head): its BLOCK_M rows are (position, head) pairs, position-major, so
    # each K/V tile it loads serves every head of the group.
    tile = tl.program_id(0)
    row = tl.load(rows_ptr + tl.program_id(1))
    h0 = tl.program_id(2) * STACK
    kvh = h0 // GROUP
    q_start = tl.load(qsl_ptr + row)
    q_len = tl.load(qsl_ptr + row + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + row)
    context = seq_len - q_len  # tokens before this run (cached prefix or earlier chunks)
    r = tl.arange(0, BLOCK_M)
    mi = tile * TILE_POS + r // STACK
    head = h0 + r % STACK
    mmask = (r < TILE_POS * STACK) & (mi < q_len)
    q_pos = context + mi
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (q_start + mi).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=mmask[:, None],
        other=0.0,
    )
    # Causal: this tile's last query sees keys up to its own position; an idle tile sees none.
    end = tl.minimum(seq_len, context + (tile + 1) * TILE_POS)
    end = tl.where(tile * TILE_POS < q_len, end, 0)
    # Windowed: this tile's first query sees keys from its position - window + 1 on; start at
    # the BLOCK_N tile holding that key (the mask below drops the rest of it).
    first = tl.maximum(context + tile * TILE_POS - window + 1, 0)
    first = (first // BLOCK_N) * BLOCK_N
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = tables_ptr + row.to(tl.int64) * stride_tb
    for s in range(first, end, BLOCK_N):
        n = s + tl.arange(0, BLOCK_N)
        nmask = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        offs = block * stride_kb + (n % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
        if KV_FP8:  # dequantize the tiles as they arrive
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        qk = _scores(q, k, scale_log2, softcap, PRECISION, HAS_SOFTCAP)
        visible = (n[None, :] <= q_pos[:, None]) & (n[None, :] > q_pos[:, None] - window)
        qk = tl.where(nmask[None, :] & visible, qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with nothing visible yet
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m - m_use)
        denom = denom * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    dst = out_ptr + (q_start + mi).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


def paged_prefill(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,
    out: torch.Tensor,  # [T, H, D], written at each prefill row's tokens
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    rows: torch.Tensor,  # [Bp] int32 rows with more than one new token
    max_query_len: int,
    window: int = 0,  # keys a query sees, itself included; 0: all
    softcap: float = 0.0,  # 0: off
    kv_scale: tuple[float, float] = (1.0, 1.0),  # an FP8 cache's K and V scales
    grouped: bool | None = None,  # a program takes the whole GQA group of its KV head (False: one
    # query head); None: grouped for runs of at most GROUPED_MAX_QUERY_LEN tokens (see below)
) -> None:
    if rows.shape[0] == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    if grouped is None:
        grouped = max_query_len <= GROUPED_MAX_QUERY_LEN
    stack = group if grouped and 1 < group <= 32 else 1
    # Rows of a program: 64 positions of one head, or (grouped) 128 (position, head) pairs.
    block_m = 64 if stack == 1 else 128 if head_dim <= 128 else 64
    tile_pos = block_m // stack
    block_n = 64 if head_dim <= 128 else 32
    grid = (triton.cdiv(max_query_len, tile_pos), rows.shape[0], num_heads // stack)
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        rows,
        query_start_loc,
        seq_lens,
        block_tables,
        scale * LOG2E,
        window or NO_WINDOW,
        softcap or 1.0,
        kv_scale[0],
        kv_scale[1],
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        STACK=stack,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        TILE_POS=tile_pos,
        BLOCK_N=block_n,
        PRECISION=_precision(q),
        HAS_SOFTCAP=softcap > 0,
        KV_FP8=_fp8(kv_cache),
        num_warps=4 if block_m == 64 else 8,
        num_stages=2,
    )
