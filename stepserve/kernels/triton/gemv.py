"""Few-row products for small decode batches, where reading the weights once is the whole cost:
``gemv`` (``x @ W.T``, times per-channel scales for e4m3 weights, plus a bias) and ``gemv_silu_mul``
(the gated MLP's gate/up product with ``silu(gate) * up`` in the epilogue, so the activation is no
kernel of its own); ``gemv`` also adds, for LoRA at one row, each row's adapter expand in its
epilogue (``kernels.triton.lora.lora_gemv``). Weights are bf16, fp16 or float32 (tests), or e4m3
with one float32 scale per output channel, widened as they are read; activations stay in their dtype
and each weight byte is read once for all rows (at most ``GEMV_ROWS``).

Why not cuBLAS at these sizes: for e4m3, cuBLASLt's kernels behind ``torch._scaled_mm`` are made
for large tiles and read the weights at 1.1-2.2 TB/s for one row (docs/benchmarks.md); for 16-bit
weights, cuBLAS reads them near the copy bandwidth but splits K into a GEMM and a reduction
kernel for narrow outputs, and the gated MLP needs a third launch for the activation: inside a
batch-1 CUDA graph each launch leaves the GPU idle for a few microseconds. Where these kernels
are taken is for the sweep (``bench/gemv.py``) to say; the tiles below are its best.

Rounding follows the unfused path: each product is rounded to the activations' dtype; in
``gemv_silu_mul`` gate and up are rounded first, ``silu(gate)`` is rounded, then the product
(as ``fused.silu_and_mul`` computes it from the projection's output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
GEMV_ROWS = 8  # the most rows a call takes: the tiles below go to 8

# (BLOCK_N, BLOCK_K, num_warps) by padded row count, for 1-byte (e4m3) and 2-byte weights: the
# best of bench/gemv.py's sweep for the Llama-8B projections. A tile reads about the same bytes
# of weights per step in both (8 x 1024 e4m3, 8 x 512 bf16).
CONFIGS = {
    1: {1: (8, 1024, 4), 2: (8, 1024, 4), 4: (8, 512, 4), 8: (8, 256, 4)},
    2: {1: (8, 512, 4), 2: (8, 512, 4), 4: (8, 256, 4), 8: (8, 128, 4)},
}


def config(rows: int, k: int, weight: torch.Tensor, width: int | None = None) -> tuple[int, int, int]:
    """The tile for ``rows`` (padded to a power of two) and reduction length ``k``. With ``width``
    (``kernels.triton.lora.lora_gemv``'s output columns), one 16-bit row takes the tiles the
    sweep found best for the 8B's q/k/v, o and down: 1024 inputs a step, 4 output columns a
    program up to 4,096 of them, else 8 (gate/up's ungated product, not swept, takes q/k/v's)."""
    padded = 1 << max(0, (rows - 1).bit_length())
    block_n, block_k, warps = CONFIGS[1 if weight.element_size() == 1 else 2][padded]
    if padded == 1 and weight.element_size() == 2 and width is not None:
        block_n, block_k = (4 if width <= 4096 else 8), 1024
    return block_n, max(16, min(block_k, 1 << (k - 1).bit_length())), warps


@triton.jit
def _gemv_kernel(
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
    lora_ptr,
    slots_ptr,
    lora_a_ptr,
    lora_b_ptr,
    counters_ptr,
    rank,
    programs,
    ROWS: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LORA_R: tl.constexpr,
    LORA_SPLIT: tl.constexpr,
    LORA_BLOCK_K: tl.constexpr,
    IN_LAUNCH: tl.constexpr,
):
    # GATED: output column n is silu(row n) * (row N + n) of a [2N, K] weight (gate rows, then up).
    # LORA_R > 0: each row m whose slot s = slots[m] is not -1 adds B[s] @ shrunk[m], as
    # ``lora_reference`` does: the shrink's float32 partials [LORA_SPLIT, M, rank] summed in split
    # order and rounded to the output dtype, the delta added in float32 to the rounded projection
    # (GATED: B [S, 2N, rank], its rows n to gate column n and N + n to up column n, before the
    # activation, as the unfused adapter's output feeds silu_and_mul).
    # With LORA_R and IN_LAUNCH, the launch computes the shrink too (one row): a ticket drawn from
    # counters[0] names each program's part. The first LORA_SPLIT tickets each write one input
    # range's float32 partial (_shrink_split) and count it in counters[1]; the rest are the column
    # blocks, which read the weights first and wait for that count only before their epilogue.
    # Tickets, not program ids, so that a waiting program can only wait on programs already
    # running: no deadlock whatever order the hardware starts them in. The last program to finish
    # resets the counters for the next launch (counters[2] counts them). Without IN_LAUNCH the
    # partials come from _shrink_kernel, launched just before.
    if LORA_R > 0 and IN_LAUNCH:
        tl.static_assert(ROWS == 1)
        ticket = tl.atomic_add(counters_ptr, 1)
        if ticket < LORA_SPLIT:
            _shrink_split(x_ptr, lora_a_ptr, slots_ptr, lora_ptr, ticket, K, rank, LORA_R, LORA_BLOCK_K, LORA_SPLIT)
            tl.atomic_add(counters_ptr + 1, 1, sem="release")
            _finish(counters_ptr, programs)
            return
        block = ticket - LORA_SPLIT
    else:
        block = tl.program_id(0)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, ROWS)
    m_mask = m < M
    k = tl.arange(0, BLOCK_K)
    rows = n[:, None].to(tl.int64) * K
    up_rows = (n[:, None] + N).to(tl.int64) * K
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k_mask = start + k < K
        w_mask = n_mask[:, None] & k_mask[None, :]
        x = tl.load(
            x_ptr + m[:, None] * stride_x + start + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
        ).to(tl.float32)
        w = tl.load(w_ptr + rows + start + k[None, :], mask=w_mask, other=0.0)
        acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if GATED:
            w = tl.load(w_ptr + up_rows + start + k[None, :], mask=w_mask, other=0.0)
            acc_up += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if SCALED:
        acc *= tl.load(scale_ptr + n, mask=n_mask, other=0.0)[None, :]
        if GATED:
            acc_up *= tl.load(scale_ptr + N + n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptr + N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    if LORA_R > 0:
        slot = tl.load(slots_ptr + m, mask=m_mask, other=-1)
        used = m_mask & (slot >= 0)
        r = tl.arange(0, LORA_R)
        r_mask = r < rank
        if IN_LAUNCH:  # the shrink's programs may still be writing
            done = tl.atomic_add(counters_ptr + 1, 0, sem="acquire")
            while done < LORA_SPLIT:
                done = tl.atomic_add(counters_ptr + 1, 0, sem="acquire")
        shrunk = tl.zeros([ROWS, LORA_R], dtype=tl.float32)
        for split in tl.static_range(LORA_SPLIT):
            part_ptrs = lora_ptr + (split * M + m[:, None]) * rank + r[None, :]
            shrunk += tl.load(part_ptrs, mask=used[:, None] & r_mask[None, :], other=0.0, cache_modifier=".cg")
        shrunk = shrunk.to(dtype).to(tl.float32)
        b_rows = 2 * N if GATED else N  # B's rows a slot
        b_ptrs = (
            lora_b_ptr
            + tl.maximum(slot, 0).to(tl.int64)[:, None, None] * b_rows * rank
            + n[None, :, None].to(tl.int64) * rank
            + r[None, None, :]
        )
        b_mask = used[:, None, None] & n_mask[None, :, None] & r_mask[None, None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0).to(tl.float32)
        acc = acc.to(dtype).to(tl.float32) + tl.sum(shrunk[:, None, :] * b, axis=2)
        if GATED:
            b = tl.load(b_ptrs + N * rank, mask=b_mask, other=0.0).to(tl.float32)
            acc_up = acc_up.to(dtype).to(tl.float32) + tl.sum(shrunk[:, None, :] * b, axis=2)
    y = acc.to(dtype)
    if GATED:  # as silu_and_mul computes it from the rounded projection
        g = y.to(tl.float32)
        y = ((g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(out_ptr + m[:, None] * stride_o + n[None, :], y, mask=m_mask[:, None] & n_mask[None, :])
    if LORA_R > 0 and IN_LAUNCH:
        _finish(counters_ptr, programs)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slots_ptr, out_ptr, hidden, rank, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr
):
    # The shrink as a launch of its own (SHRINK_IN_LAUNCH off): one program a split.
    _shrink_split(x_ptr, a_ptr, slots_ptr, out_ptr, tl.program_id(0), hidden, rank, BLOCK_R, BLOCK_K, SPLIT_K)


@triton.jit
def _shrink_split(x_ptr, a_ptr, slots_ptr, out_ptr, split, hidden, rank, BLOCK_R, BLOCK_K, SPLIT_K):
    """Range ``split`` of ``SPLIT_K`` of the one row's shrink: the float32 partial of
    ``A[slot] @ x`` over its input features, to ``out[split]`` (nothing for the base, slot -1,
    whose epilogue reads none)."""
    slot = tl.load(slots_ptr).to(tl.int64)
    if slot >= 0:
        r = tl.arange(0, BLOCK_R)
        r_mask = r < rank
        k = tl.arange(0, BLOCK_K)
        span = tl.cdiv(tl.cdiv(hidden, BLOCK_K), SPLIT_K) * BLOCK_K
        first = split * span
        end = tl.minimum(first + span, hidden)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(first, end, BLOCK_K):
            k_mask = start + k < end
            xv = tl.load(x_ptr + start + k, mask=k_mask, other=0.0).to(tl.float32)
            a_ptrs = a_ptr + slot * rank * hidden + r[:, None] * hidden + start + k[None, :]
            a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * xv[None, :], axis=1)
        tl.store(out_ptr + split * rank + r, acc, mask=r_mask)


@triton.jit
def _finish(counters_ptr, programs):
    """Count this program finished; the last of the launch's ``programs`` zeroes the counters."""
    if tl.atomic_add(counters_ptr + 2, 1, sem="acq_rel") == programs - 1:
        tl.atomic_xchg(counters_ptr, 0)
        tl.atomic_xchg(counters_ptr + 1, 0)
        tl.atomic_xchg(counters_ptr + 2, 0)


# The shrink's input ranges in a LoRA launch (one row): at most 16, of 256 features at least.
SHRINK_SPLIT_K, SHRINK_BLOCK_K = 16, 256
# True: the shrink runs inside the GEMV's launch (tickets, a count the column blocks wait on),
# one launch a projection. It has passed the kernel tests under Triton's interpreter only, not
# on a GPU, where a wait between programs is what could go wrong; until it has (and has been
# timed), the shrink is a launch of its own before the GEMV, the form measured on an H100
# (docs/lora.md).
SHRINK_IN_LAUNCH = False
_counters: dict[torch.device, torch.Tensor] = {}


def _lora_counters(device: torch.device) -> torch.Tensor:
    """The LoRA launches' ticket, shrink and finish counters on ``device``, zero between launches
    (each launch's last program resets them; launches on one stream do not overlap). Made on the
    first call, which comes before any graph is captured (``models.lora``'s warm-up)."""
    if device not in _counters:
        _counters[device] = torch.zeros(4, dtype=torch.int32, device=device)
    return _counters[device]


def _launch(x, weight, scale, bias, width: int, gated: bool, lora: tuple | None = None) -> torch.Tensor:
    """``lora``: (lora_a [S, R, K], slots [1] int32, lora_b [S, width, R], or [S, 2 * width, R]
    gated), for ``kernels.triton.lora.lora_gemv``: one row, the shrink before the GEMV or, with
    ``SHRINK_IN_LAUNCH``, in the same launch. Gated, the tile is the one ``gemv_silu_mul`` was
    swept with, adapters or not."""
    rows, k = x.shape
    if not 0 < rows <= GEMV_ROWS:
        raise ValueError(f"gemv takes 1 to {GEMV_ROWS} rows, got {rows}")
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config(rows, k, weight, width if lora is not None and not gated else None)
    programs = triton.cdiv(width, block_n)
    in_launch = lora is not None and SHRINK_IN_LAUNCH
    lora_a, slots, lora_b, partials, counters, rank, split, shrink_k = x, x, x, x, x, 0, 1, 16  # no LoRA
    if lora is not None:
        lora_a, slots, lora_b = lora
        if rows != 1:
            raise ValueError(f"a LoRA gemv takes one row, got {rows}")
        rank = lora_a.shape[1]
        shrink_k = min(SHRINK_BLOCK_K, max(16, triton.next_power_of_2(k)))
        split = min(SHRINK_SPLIT_K, triton.cdiv(k, shrink_k))
        partials = torch.empty(split, rows, rank, dtype=torch.float32, device=x.device)
        if in_launch:  # the shrink's programs join the launch
            counters, programs = _lora_counters(x.device), programs + split
        else:
            _shrink_kernel[(split,)](
                x, lora_a, slots, partials, k, rank,
                BLOCK_R=triton.next_power_of_2(rank), BLOCK_K=shrink_k, SPLIT_K=split, num_warps=4,
            )  # fmt: skip
    _gemv_kernel[(programs,)](
        x,
        weight,
        scale if scale is not None else x,
        bias if bias is not None else x,
        out,
        rows,
        width,
        k,
        x.stride(0),
        out.stride(0),
        partials,
        slots,
        lora_a,
        lora_b,
        counters,
        rank,
        programs,
        ROWS=1 << max(0, (rows - 1).bit_length()),
        SCALED=scale is not None,
        HAS_BIAS=bias is not None,
        GATED=gated,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        LORA_R=triton.next_power_of_2(rank) if lora is not None else 0,
        LORA_SPLIT=split,
        LORA_BLOCK_K=shrink_k,
        IN_LAUNCH=in_launch,
        num_warps=warps,
    )
    return out


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lora: tuple | None = None,
) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` for 1 to ``GEMV_ROWS`` rows: ``x`` [M, K],
    ``weight`` [N, K] (contiguous), ``scale`` [N] or [1, N] float32 (e4m3 weights) or None; out in
    ``x``'s dtype. ``lora``: (``lora_a`` [S, R, K], slots [1] int32, ``lora_b`` [S, N, R]) adds
    the row's adapter delta, the expand in the epilogue (``kernels.triton.lora.lora_gemv``)."""
    return _launch(x, weight, scale, bias, weight.shape[0], gated=False, lora=lora)


def gemv_silu_mul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lora: tuple | None = None,
) -> torch.Tensor:
    """``silu(g) * u`` with ``[g, u] = x @ (weight * scale[:, None]).T + bias`` split in halves:
    the gated MLP's gate/up projection (``weight`` [2I, K], gate rows then up rows) and its
    activation in one kernel; out [M, I] in ``x``'s dtype. ``lora`` as ``gemv``'s, ``lora_b``
    [S, 2I, R]: each row's delta added to gate and up before the activation."""
    return _launch(x, weight, scale, bias, weight.shape[0] // 2, gated=True, lora=lora)
