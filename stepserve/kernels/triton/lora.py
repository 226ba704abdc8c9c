"""The batched LoRA kernels: ``lora_delta`` adds, in place, ``y[t] += B[s] @ (A[s] @ x[t])`` for
every token ``t`` whose slot ``s = slots[t]`` is not -1. Its PyTorch twin, the semantics, is
``models/lora.py``'s ``lora_reference``.

Punica's SGMV: the tokens grouped by slot on the device, then two segment GEMMs, every tile of
tokens belonging to one slot so that it is a plain ``tl.dot`` against that slot's weights. All of it
is sized by shapes alone (no host sync, no shape that depends on the slots), so a CUDA graph
captured for a batch stays valid for any slot assignment:

- grouping: ``moe.align`` on the slots with -1 mapped to an extra group ``S``, whose tiles (and
  the tiles past the padded total) return at once; those tokens' rows of ``y`` are never loaded
  nor stored.
- shrink: ``x @ A[s].T`` [rows, R], a long reduction over the input features onto a few rank
  columns, split into ``split_k`` ranges for small batches (one tile of tokens would leave
  most SMs idle); the float32 partials are summed in a fixed order (no atomics) by the expand,
  as it loads them.
- expand: ``shrunk @ B[s].T``, added to each token's row of ``y``.

Compiled variants: Triton compiles one per combination of constexprs and of integer arguments
that are 1 or a multiple of 16. The tiles depend on the batch's size class (``lora_config``),
and the token count, which changes pass by pass, is not specialized on; ``warm_up`` compiles every
class at start-up, so no request waits for a compile (an eager prefill pass of an odd size did:
seconds in the middle of traffic).

A model makes four such calls a layer with the same slots, so the grouping can be shared: pass the
same ``cache`` dict to every call of one forward (a new dict, or a cleared one, for the next), and
only the first call groups the tokens. At batch 1 that leaves two small kernels a call instead of
eight, which is most of what LoRA costs there.

Rounding follows the reference: the shrink accumulates in float32 and is rounded to ``x``'s dtype;
the expand accumulates in float32, is added to ``y`` in float32 and rounded once.

One row (a batch-1 decode step) takes ``lora_gemv`` where the base projection is a plain 16-bit
weight (``models.lora.LoraLinear``): the shrink's split partials by one small kernel, then the
few-row GEMV of ``kernels.triton.gemv`` with the expand in its epilogue (with
``gemv.SHRINK_IN_LAUNCH``, both in one launch). At one token the pair above is two launches near
their floor beside the base's cuBLAS GEMM (``bench/lora_kernel.py``); this is two launches in all
(or one), and ``y`` is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from stepserve.kernels.triton.gemv import gemv, gemv_silu_mul
from stepserve.kernels.triton.moe import align

DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # float32: tests


@dataclass(frozen=True)
class LoraConfig:
    """Tiles of the shrink and the expand, which share the grouping and so its ``block_m``."""

    block_m: int  # tokens per tile; each slot's group is padded to a multiple of it
    block_r: int  # rank columns per tile: the shrink's output step, the expand's reduction step
    split_k: int  # input-feature ranges of the shrink, each its own program
    block_k: int  # the shrink's reduction step over the input features
    block_n: int  # the expand's output columns per tile
    num_warps: int
    num_stages: int
    # With split_k > 1: the expand sums the partials as it loads them (True), or one more kernel
    # sums them first (False); the first launches less, the second reads them once, not once per
    # column tile (``bench/lora_kernel.py`` compares them).
    sum_in_expand: bool = True


def lora_config(tokens: int, rank: int, hidden: int, out_features: int, dtype: torch.dtype) -> LoraConfig:
    """The tiles for a call, chosen by the batch size (fixed choices, no autotuning: autotune
    would benchmark again inside a CUDA graph capture), from ``bench/lora_kernel.py``'s sweep of
    the 8B projections with 8 rank-16 adapters on an H100 (``docs/lora.md``), at 1, 16, 256,
    2,048 and 8,192 tokens; the classes' other edges are not measured.

    Every class takes 128-column expand tiles: fewer programs load (and sum) the shrink's
    partials. One token splits the shrink's reduction 16 ways, so that its few tiles fill the
    SMs; from a few tokens on, 4 ranges do. Up to 64 tokens the expand sums the partials as it
    loads them (one launch fewer); from 65 on, a kernel of its own sums them once. Prefill
    batches reuse each weight tile across 64 tokens. Tiles shrink to the problem for small test
    shapes; float32 (tests) keeps two pipeline stages, as its tiles take twice the shared memory."""
    if tokens <= 4:
        cfg = LoraConfig(16, 64, 16, 128, 128, 4, 3)
    elif tokens <= 64:
        cfg = LoraConfig(16, 64, 4, 128, 128, 4, 3)
    elif tokens <= 512:
        cfg = LoraConfig(32, 64, 16, 64, 128, 4, 3, sum_in_expand=False)
    elif tokens <= 4096:
        cfg = LoraConfig(64, 64, 4, 64, 128, 4, 3, sum_in_expand=False)
    else:
        cfg = LoraConfig(64, 64, 4, 64, 128, 8, 3, sum_in_expand=False)

    def fit(block: int, size: int) -> int:
        return min(block, max(16, triton.next_power_of_2(size)))  # tl.dot takes 16 at least

    block_k = fit(cfg.block_k, hidden)
    return LoraConfig(
        block_m=cfg.block_m,
        block_r=fit(cfg.block_r, rank),
        split_k=min(cfg.split_k, triton.cdiv(hidden, block_k)),  # no range without a K-block
        block_k=block_k,
        block_n=fit(cfg.block_n, out_features),
        num_warps=cfg.num_warps,
        num_stages=2 if dtype == torch.float32 else cfg.num_stages,
        sum_in_expand=cfg.sum_in_expand,
    )


@triton.jit(do_not_specialize=["num_tokens"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    sorted_ptr,
    block_slot_ptr,
    num_tokens,
    num_slots,
    num_rows,
    hidden,
    rank,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # The rank tiles of one token tile are adjacent programs: they read the same rows of x from L2.
    pid_r, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):  # past the padded total, or the tokens without an adapter
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token = tl.load(sorted_ptr + rows)
    valid = token < num_tokens
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < rank
    k = tl.arange(0, BLOCK_K)
    span = tl.cdiv(tl.cdiv(hidden, BLOCK_K), SPLIT_K) * BLOCK_K  # a whole number of K-blocks
    first = split * span
    end = tl.minimum(first + span, hidden)  # the last ranges may be short or empty (they store 0)
    x_ptrs = x_ptr + token.to(tl.int64)[:, None] * hidden + k[None, :]
    a_ptrs = a_ptr + slot * rank * hidden + r[None, :] * hidden + k[:, None]  # [BLOCK_K, BLOCK_R] of A.T
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for start in range(first, end, BLOCK_K):
        k_mask = k < hidden - start
        a = tl.load(x_ptrs + start, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(a_ptrs + start, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    # out: x's dtype when unsplit (the reference's rounding), else this range's float32 partial
    out_ptrs = out_ptr + (split * num_rows + rows).to(tl.int64)[:, None] * rank + r[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=["size"])
def _sum_splits_kernel(partials_ptr, out_ptr, size, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # Flat over every row, the unwritten ones (padding, no adapter) too: the expand never reads them.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < size
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(partials_ptr + split * size + i, mask=mask, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _sum_splits(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The shrink's float32 partials [split_k, rows, R] summed in split order, rounded to ``dtype``."""
    split_k, rows, rank = partials.shape
    out = torch.empty(rows, rank, dtype=dtype, device=partials.device)
    size, block = rows * rank, 1024
    _sum_splits_kernel[(triton.cdiv(size, block),)](partials, out, size, SPLIT_K=split_k, BLOCK=block, num_warps=4)
    return out


@triton.jit(do_not_specialize=["num_tokens"])
def _expand_kernel(
    s_ptr,
    b_ptr,
    y_ptr,
    sorted_ptr,
    block_slot_ptr,
    num_tokens,
    num_slots,
    num_rows,
    out_features,
    rank,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # The token tiles of one column tile are adjacent programs: a slot's B tile is read from L2.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token = tl.load(sorted_ptr + rows)
    valid = token < num_tokens
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < out_features
    r = tl.arange(0, BLOCK_R)
    s_ptrs = s_ptr + rows.to(tl.int64)[:, None] * rank + r[None, :]
    b_ptrs = b_ptr + slot * out_features * rank + n[None, :] * rank + r[:, None]  # [BLOCK_R, BLOCK_N] of B.T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, rank, BLOCK_R):
        r_mask = r < rank - start
        s_mask = valid[:, None] & r_mask[None, :]
        if SPLIT_K == 1:
            s = tl.load(s_ptrs + start, mask=s_mask, other=0.0)
        else:  # the shrink's float32 partials, summed in split order, rounded as the unsplit shrink
            part = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                part += tl.load(s_ptrs + split * num_rows * rank + start, mask=s_mask, other=0.0)
            s = part.to(b_ptr.dtype.element_ty)
        w = tl.load(b_ptrs + start, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(s, w, acc, input_precision=PRECISION)
    y_ptrs = y_ptr + token.to(tl.int64)[:, None] * out_features + n[None, :]
    mask = valid[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _precision(x: torch.Tensor) -> str:
    """float32 stays float32 (tf32 would break parity with the reference); 16-bit is native."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _check(y, x, lora_a, lora_b, slots) -> None:
    assert x.dim() == 2 and x.dtype in DTYPES, f"x must be [T, K] bf16/fp16/fp32, not {x.dtype} {list(x.shape)}"
    tokens, hidden = x.shape
    assert lora_a.dim() == 3 and lora_a.shape[2] == hidden, (
        f"lora_a must be [S, R, K={hidden}], not {list(lora_a.shape)}"
    )
    num_slots, rank = lora_a.shape[:2]
    assert lora_b.dim() == 3 and lora_b.shape[0] == num_slots and lora_b.shape[2] == rank, (
        f"lora_b must be [S={num_slots}, N, R={rank}], not {list(lora_b.shape)}"
    )
    assert y.shape == (tokens, lora_b.shape[1]), f"y must be [T, N] = {[tokens, lora_b.shape[1]]}, not {list(y.shape)}"
    assert y.dtype == lora_a.dtype == lora_b.dtype == x.dtype, (
        f"y, lora_a and lora_b must be {x.dtype} like x, not {y.dtype}/{lora_a.dtype}/{lora_b.dtype}"
    )
    assert slots.shape == (tokens,) and slots.dtype == torch.int32, (
        f"slots must be [T={tokens}] int32, not {slots.dtype} {list(slots.shape)}"
    )
    assert all(t.is_contiguous() for t in (y, x, lora_a, lora_b, slots)), "lora_delta takes contiguous tensors only"


def lora_delta(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    cache: dict | None = None,
) -> torch.Tensor:
    """``y`` [T, N] plus each token's adapter delta, in place (returned): ``x`` [T, K], ``lora_a``
    [S, R, K], ``lora_b`` [S, N, R], all of one dtype (bf16, fp16; float32 for tests), ``slots``
    [T] int32 in ``-1..S-1`` (-1: no adapter, the row is left untouched). ``cache``: a dict shared
    by the calls of one forward with these ``slots``, which keeps their grouping (module
    docstring). Capturable in a CUDA graph: nothing waits on the device."""
    _check(y, x, lora_a, lora_b, slots)
    tokens, hidden = x.shape
    (num_slots, rank), out_features = lora_a.shape[:2], y.shape[1]
    if tokens == 0 or num_slots == 0 or rank == 0:
        return y
    cfg = lora_config(tokens, rank, hidden, out_features, x.dtype)
    groups = _grouping(slots, num_slots, cfg.block_m, cache)
    shrunk = _shrink(x, lora_a, groups, cfg)
    split_k = cfg.split_k if cfg.sum_in_expand else 1
    if split_k != cfg.split_k:
        shrunk = _sum_splits(shrunk, x.dtype)
    _expand_kernel[(groups.block_expert.shape[0], triton.cdiv(out_features, cfg.block_n))](
        shrunk,
        lora_b,
        y,
        groups.sorted_ids,
        groups.block_expert,
        tokens,
        num_slots,
        groups.sorted_ids.shape[0],
        out_features,
        rank,
        PRECISION=_precision(x),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_r,
        SPLIT_K=split_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y


def _grouping(slots: torch.Tensor, num_slots: int, block_m: int, cache: dict | None):
    """The tokens grouped by slot in ``block_m`` tiles; from ``cache`` when an earlier call of the
    forward made it. The key names the slots tensor, but an id can be reused once a tensor is
    freed: the caller empties ``cache`` whenever the slots change (``LoraState``)."""
    key = (id(slots), slots.data_ptr(), slots.shape[0], num_slots, block_m)
    if cache is not None and key in cache:
        return cache[key]
    # -1 -> S (Python's modulo): the tokens without an adapter form the last group, skipped by both GEMMs
    groups = align(slots.remainder(num_slots + 1), num_slots + 1, block_m)
    if cache is not None:
        cache[key] = groups
    return groups


def _shrink(x, lora_a, groups, cfg: LoraConfig) -> torch.Tensor:
    """``x @ A[s].T`` over the rows of the grouping: [rows, R] in ``x``'s dtype, or with
    ``split_k`` > 1 the float32 partials [split_k, rows, R] that the expand sums. Rows of padding
    and of tokens without an adapter are left unwritten."""
    (tokens, hidden), (num_slots, rank) = x.shape, lora_a.shape[:2]
    num_m, num_rows = groups.block_expert.shape[0], groups.sorted_ids.shape[0]
    if cfg.split_k > 1:
        out = torch.empty(cfg.split_k, num_rows, rank, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(num_rows, rank, dtype=x.dtype, device=x.device)
    _shrink_kernel[(triton.cdiv(rank, cfg.block_r), cfg.split_k, num_m)](
        x,
        lora_a,
        out,
        groups.sorted_ids,
        groups.block_expert,
        tokens,
        num_slots,
        num_rows,
        hidden,
        rank,
        PRECISION=_precision(x),
        BLOCK_M=cfg.block_m,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def lora_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    silu_mul: bool = False,
) -> torch.Tensor:
    """``x @ weight.T + bias`` plus the row's adapter delta, for a decode step of one row: the
    shrink's split partials, then ``kernels.triton.gemv``'s kernel with the expand in its
    epilogue; with ``gemv.SHRINK_IN_LAUNCH``, one launch in which a few programs compute the
    partials while the others read the weights. Two launches a projection (or one) instead of
    the base GEMM and ``lora_delta``'s two, and ``y`` is written once.
    Rounding as ``lora_reference`` applied to the base projection's output.
    ``x`` [1, K]; ``weight`` [N, K] of ``x``'s dtype (16-bit in a model, float32 in tests);
    ``lora_a`` [S, R, K], ``lora_b`` [S, N, R]; ``slots`` [1] int32 (-1: the base alone).
    ``silu_mul``: the gated MLP's gate/up (N = 2I), out ``silu(gate) * up`` [1, I] as
    ``fused.silu_and_mul`` computes it from the adapted projection (``gemv_silu_mul``): the
    activation is no launch of its own either. Capturable in a CUDA graph."""
    rows, hidden = x.shape
    assert rows == 1 and weight.shape[1] == hidden and weight.dtype == x.dtype == lora_a.dtype == lora_b.dtype, (
        f"lora_gemv takes one row and one dtype: x {list(x.shape)} {x.dtype}, weight {weight.dtype}, "
        f"adapters {lora_a.dtype}"
    )
    if silu_mul:
        return gemv_silu_mul(x, weight, None, bias, lora=(lora_a, slots, lora_b))
    return gemv(x, weight, None, bias, lora=(lora_a, slots, lora_b))


# One token count of each size class that picks other tiles: ``lora_config``'s (up to 4, 64, 512,
# 4096, more) and ``align``'s (one program up to 16, 64, 256 copies; three launches beyond). No
# integer argument that varies with the count is specialized on, so one count a class is enough.
WARM_UP_TOKENS = (1, 5, 17, 65, 257, 513, 4097)


def warm_up(lora_a: torch.Tensor, lora_b: torch.Tensor, max_tokens: int) -> int:
    """Compile the kernels of one projection's shapes for every batch size class up to
    ``max_tokens``, on scratch outputs (slot 0 for every token, so each kernel runs); the number
    of calls made."""
    hidden, out_features = lora_a.shape[2], lora_b.shape[1]
    calls = 0
    for tokens in sorted({min(t, max_tokens) for t in WARM_UP_TOKENS}):
        x = torch.zeros(tokens, hidden, dtype=lora_a.dtype, device=lora_a.device)
        y = torch.zeros(tokens, out_features, dtype=lora_a.dtype, device=lora_a.device)
        lora_delta(y, x, lora_a, lora_b, torch.zeros(tokens, dtype=torch.int32, device=lora_a.device))
        calls += 1
    return calls
