"""The fused mixture-of-experts kernel: ``fused_moe`` computes, for every token ``t``,
``sum_k weights[t, k] * w2[e] @ (silu(g) * u)`` with ``[g; u] = w13[e] @ x[t]``, ``e = ids[t, k]``.
Its PyTorch twin, the semantics, is ``models/moe.py``'s ``experts_reference``.

Four steps, every one on the device and sized by shapes alone (no host sync, no shape that
depends on the routing), so a CUDA graph captured for a decode batch stays valid for any routing:

- ``align``: the ``T * K`` token copies grouped by expert, each group padded to a multiple of
  ``block_m`` (``Alignment``). Buffers and grids are sized by the bound
  ``T*K + min(E, T*K) * (block_m - 1)``; M-blocks past the padded total are marked -1 and their
  programs return at once. A decode batch (at most ``ALIGN_ONE_PROGRAM`` copies) is grouped by
  one program; a larger one by three launches and a memset.
- GEMM 1: each M-block's rows (token copies of one expert) times that expert's ``w13``, the gate
  and up tiles of the same columns in two accumulators, ``silu(gate) * up`` in the epilogue.
- GEMM 2: the result times the expert's ``w2``, each row stored at its copy's place ``t*K + k``.
- a reduction: ``out[t] = sum_k weights[t, k] * copy[t, k]`` in float32, in a fixed order (no
  atomics), so the output does not depend on the order of the copies within a group.

Up to ``GEMV_MAX_TOKENS`` tokens (batch-1 decode), two GEMV launches do the same: gate/up with the
activation per copy, then down with the weighted sum per token (no grouping, no padding rows).

The router before it, ``fused_route`` (the softmax over the experts and the top ``K``), is one
kernel too; its twin is ``models/moe.py``'s ``route_reference``.

Rounding follows the reference: gate, up, ``silu(gate)``, the product and each expert's output
are rounded to the activations' dtype; the weighted sum is float32, rounded once. FP8 weights
(e4m3, one float32 scale per expert and output channel) are widened to the activations' dtype
as they are loaded, and the accumulator is multiplied by the channel's scale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

FP8 = torch.float8_e4m3fn
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # float32: tests
ALIGN_BLOCK = 1024  # token copies per program of the counting and scattering kernels
# Up to this many copies (decode: 32 tokens at top-8, 128 at top-2; LoRA: 256 tokens), ``align``
# is one program instead of a memset and three launches, whose fixed cost is most of the
# grouping's time at these sizes. Its work grows as copies x experts (256 x 128: eight tiles of
# ALIGN_TILE) while the launches it saves cost the same at any size, so it stops at decode batches.
ALIGN_ONE_PROGRAM = 256  # the largest of _copies_tile's tiles
ALIGN_TILE = 4096  # copies x experts compared at once by the one-program path: 32 a thread at 4 warps
ROUTE_TILE = 2048  # router logits a program of ``fused_route``: 16 tokens of 128 experts
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: no libdevice (see _exp)


@dataclass(frozen=True)
class MoeConfig:
    """Tiles of both grouped GEMMs: one config for the pair, GEMM 2's K being GEMM 1's N."""

    block_m: int  # token copies per tile; each expert's group is padded to a multiple of it
    block_n: int  # output columns per tile (GEMM 1: of gate and of up each)
    block_k: int  # reduction step
    group_m: int  # M-blocks whose programs walk the N-blocks together, sharing weight tiles in L2
    num_warps: int
    num_stages: int


def moe_config(tokens: int, top_k: int, experts: int, hidden: int, inner: int, dtype: torch.dtype) -> MoeConfig:
    """The tiles for a call, chosen by the token copies per expert ``T*K/E`` (fixed choices, no
    autotuning: autotune would benchmark again inside a CUDA graph capture).

    Few copies per expert (decode) make the GEMMs weight-bound: 16-row tiles, which waste least
    on padding, and long K steps that stream the weights. Many (prefill) make them compute-bound:
    64- or 128-row tiles that reuse each weight tile across more tokens. The tiers follow
    vLLM's tuned H100/H200 tables for 128 experts (whose N counts gate and up together, so
    their 128 is our 64). Tiles shrink to the problem for small test shapes; float32 (tests)
    keeps two pipeline stages, as its tiles take twice the shared memory."""
    per_expert = tokens * top_k / experts
    if per_expert <= 8:
        cfg = MoeConfig(16, 64, 128, 1, 4, 3)
    elif per_expert <= 32:
        cfg = MoeConfig(32, 64, 128, 8, 4, 3)
    elif per_expert <= 64:
        cfg = MoeConfig(64, 64, 64, 8, 4, 3)
    else:
        cfg = MoeConfig(128, 128, 64, 16, 8, 4)
    fit = max(16, triton.next_power_of_2(min(hidden, inner)))  # tl.dot takes 16 at least
    return MoeConfig(
        block_m=cfg.block_m,
        block_n=min(cfg.block_n, fit),
        block_k=min(cfg.block_k, fit),
        group_m=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=2 if dtype == torch.float32 else cfg.num_stages,
    )


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    """``e^x`` as torch's softmax computes it on the GPU: libdevice's expf. ``tl.exp`` is
    ex2.approx of ``x*log2(e)``, whose error grows with ``|x|``: 2e-6 relative on logits spread
    over +-30, past the float32 rounding that ``fused_route`` matches the reference within."""
    if LIBDEVICE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _top_k(
    logits_ptr,
    t,
    num_tokens,
    num_experts,
    stride,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    EXPERTS: tl.constexpr,
    K_PAD: tl.constexpr,
):
    """Tokens ``t``' (a block) softmax over their router logits and top ``TOP_K``: (weights
    float32, ids int32), ``[block, K_PAD]``, in descending weight. The experts are picked by their
    logits, as the softmax keeps the order: the choice does not depend on how ``exp`` rounds, and
    equals torch.topk's on the probabilities wherever those have no ties; of equal logits, the
    lowest expert first. Shared by ``fused_route`` and the GEMVs that route for themselves."""
    e = tl.arange(0, EXPERTS)
    t_mask, e_mask = t < num_tokens, e < num_experts
    # the padding experts are never read (past the last row they would be past the tensor)
    mask = t_mask[:, None] & e_mask[None, :]
    logits = tl.load(logits_ptr + t.to(tl.int64)[:, None] * stride + e[None, :], mask=mask, other=float("-inf"))
    logits = logits.to(tl.float32)
    top = tl.max(logits, 1)
    total = tl.sum(_exp(logits - top[:, None], LIBDEVICE), 1)
    k = tl.arange(0, K_PAD)
    weights = tl.zeros([t.shape[0], K_PAD], dtype=tl.float32)
    ids = tl.zeros([t.shape[0], K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best, idx = tl.max(logits, 1, return_indices=True, return_indices_tie_break_left=True)
        # A row of NaN logits (a faulty pass, failed later by the finite check) must still name a
        # real expert: an id past the last would send the grouping's writes out of bounds.
        idx = tl.minimum(idx, num_experts - 1)
        prob = _exp(best - top, LIBDEVICE) / total  # the softmax's value at idx, computed as for all
        weights = tl.where(k[None, :] == j, prob[:, None], weights)
        ids = tl.where(k[None, :] == j, idx[:, None], ids)
        logits = tl.where(e[None, :] == idx[:, None], float("-inf"), logits)  # taken (logits are finite)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, 1)[:, None]
    return weights, ids


@triton.jit(do_not_specialize=["num_tokens"])
def _route_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    num_tokens,
    num_experts,
    stride,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    EXPERTS: tl.constexpr,
    K_PAD: tl.constexpr,
):
    """``BLOCK_T`` tokens' softmax and top ``TOP_K`` (``_top_k``), stored."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    weights, ids = _top_k(logits_ptr, t, num_tokens, num_experts, stride, TOP_K, RENORMALIZE, LIBDEVICE, EXPERTS, K_PAD)
    k = tl.arange(0, K_PAD)
    t_mask = t < num_tokens
    out = t.to(tl.int64)[:, None] * TOP_K + k[None, :]
    out_mask = t_mask[:, None] & (k < TOP_K)[None, :]
    tl.store(weights_ptr + out, weights, mask=out_mask)
    tl.store(ids_ptr + out, ids, mask=out_mask)


def fused_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``route_reference`` in one launch: (weights [T, k] float32, expert ids [T, k] int32) of
    ``router_logits`` [T, E], in descending weight; of equal logits, the lowest expert first.
    Capturable in a CUDA graph: nothing waits on the device."""
    assert router_logits.dim() == 2 and 0 < top_k <= router_logits.shape[1], (
        f"router_logits must be [T, E >= top_k={top_k}], not {list(router_logits.shape)}"
    )
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    (tokens, experts), device = logits.shape, logits.device
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=device)
    if tokens == 0:
        return weights, ids
    experts_pad = triton.next_power_of_2(experts)
    block_t = max(1, ROUTE_TILE // experts_pad)
    _route_kernel[(triton.cdiv(tokens, block_t),)](
        logits,
        weights,
        ids,
        tokens,
        experts,
        logits.stride(0),
        TOP_K=top_k,
        RENORMALIZE=renormalize,
        LIBDEVICE=not INTERPRETED,
        BLOCK_T=block_t,
        EXPERTS=experts_pad,
        K_PAD=triton.next_power_of_2(top_k),
        num_warps=4,
    )
    return weights, ids


@dataclass(frozen=True)
class Alignment:
    """The token copies grouped by expert, on the device, sized by the bound (not the routing)."""

    sorted_ids: torch.Tensor  # [num_blocks * block_m] int32: copy ``t*K + k`` per row; padding: T*K
    block_expert: torch.Tensor  # [num_blocks] int32: the expert of each M-block; -1 past the padded total


@triton.jit(do_not_specialize=["num_copies"])  # counts vary pass by pass: one variant
def _count_kernel(ids_ptr, counts_ptr, num_copies, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < num_copies
    expert = tl.load(ids_ptr + i, mask=mask, other=0)
    tl.atomic_add(counts_ptr + expert, 1, mask=mask)


@triton.jit(do_not_specialize=["num_copies", "num_blocks"])
def _offsets_kernel(
    counts_ptr,
    cursor_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_experts,
    num_copies,
    num_blocks,
    BLOCK_M: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    e = tl.arange(0, EXPERTS_PAD)
    e_mask = e < num_experts
    count = tl.load(counts_ptr + e, mask=e_mask, other=0)
    padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    tl.store(cursor_ptr + e, start, mask=e_mask)  # where the scatter places each group's first copy
    for j in range(BLOCK_M):  # the padding rows of each group point past the last copy
        tl.store(sorted_ptr + start + count + j, num_copies, mask=e_mask & (count + j < padded))
    total = tl.sum(padded, 0)
    for first in range(0, num_blocks, BLOCKS):
        b = first + tl.arange(0, BLOCKS)
        row = b * BLOCK_M
        # the block's expert: the number of groups that end at or before its first row
        expert = tl.sum((end[None, :] <= row[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + b, tl.where(row < total, expert, -1), mask=b < num_blocks)


@triton.jit(do_not_specialize=["num_copies"])
def _scatter_kernel(ids_ptr, cursor_ptr, sorted_ptr, num_copies, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < num_copies
    expert = tl.load(ids_ptr + i, mask=mask, other=0)
    # The order within a group follows the atomics; harmless, as each row's result depends on
    # that row alone and every copy is stored at its own place t*K + k.
    slot = tl.atomic_add(cursor_ptr + expert, 1, mask=mask)
    tl.store(sorted_ptr + slot, i, mask=mask)


@triton.jit(do_not_specialize=["num_copies", "num_blocks"])  # one variant per tile class, not per count
def _align_one_program_kernel(
    ids_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_experts,
    num_copies,
    num_blocks,
    BLOCK_M: tl.constexpr,
    COPIES: tl.constexpr,
    EXPERTS: tl.constexpr,
    GROUP_BLOCKS: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """The whole alignment in one program, without atomics: the experts in chunks of ``EXPERTS``,
    each an [COPIES, EXPERTS] one-hot of the copies' experts whose column sums are the counts and
    whose exclusive column prefix sums are each copy's rank in its group (so a group keeps the
    copies' order). ``base`` carries the padded total of the chunks before."""
    i = tl.arange(0, COPIES)
    expert = tl.load(ids_ptr + i, mask=i < num_copies, other=-1)  # -1: a padding lane, in no group
    place = tl.zeros([COPIES], dtype=tl.int32)  # each copy's row
    j = tl.arange(0, BLOCK_M)
    g = tl.arange(0, GROUP_BLOCKS)  # a group's M-blocks: at most all the copies, padded
    base = 0
    for first in range(0, num_experts, EXPERTS):
        e = first + tl.arange(0, EXPERTS)
        hit = (expert[:, None] == e[None, :]).to(tl.int32)
        count = tl.sum(hit, 0)
        padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        end = base + tl.cumsum(padded, 0)
        start = end - padded
        rank = tl.cumsum(hit, 0) - hit  # the copies before this one with the same expert
        place += tl.sum(hit * (start[None, :] + rank), 1)  # one hit a row, in one chunk only
        in_group = e < num_experts
        pad_row = start[:, None] + count[:, None] + j[None, :]  # the padding after each group's copies
        tl.store(sorted_ptr + pad_row, num_copies, mask=in_group[:, None] & (pad_row < end[:, None]))
        block = start[:, None] // BLOCK_M + g[None, :]
        tl.store(block_expert_ptr + block, e[:, None], mask=in_group[:, None] & (block * BLOCK_M < end[:, None]))
        base += tl.sum(padded, 0)
    tl.store(sorted_ptr + place, i, mask=i < num_copies)
    b = tl.arange(0, BLOCKS)
    tl.store(block_expert_ptr + b, -1, mask=(b * BLOCK_M >= base) & (b < num_blocks))  # past the padded total


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Group the copies of ``topk_ids`` [T, K] by expert, no host sync: one launch for at most
    ``ALIGN_ONE_PROGRAM`` copies (each group in the copies' order), else three launches and a
    memset (the order within a group unspecified). The path depends on the shape alone."""
    num_copies = topk_ids.numel()
    num_blocks = triton.cdiv(num_copies + min(num_experts, num_copies) * (block_m - 1), block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    if num_copies <= ALIGN_ONE_PROGRAM:
        _align_one_program(topk_ids, num_experts, block_m, sorted_ids, block_expert)
    else:
        _align_many_programs(topk_ids, num_experts, block_m, sorted_ids, block_expert)
    return Alignment(sorted_ids, block_expert)


def _align_one_program(topk_ids, num_experts, block_m, sorted_ids, block_expert) -> None:
    copies = _copies_tile(topk_ids.numel())
    blocks = triton.cdiv(copies + min(num_experts, copies) * (block_m - 1), block_m)  # align's bound at ``copies``
    _align_one_program_kernel[(1,)](
        topk_ids,
        sorted_ids,
        block_expert,
        num_experts,
        topk_ids.numel(),
        block_expert.shape[0],
        BLOCK_M=block_m,
        COPIES=copies,
        EXPERTS=min(triton.next_power_of_2(num_experts), ALIGN_TILE // copies),
        GROUP_BLOCKS=triton.cdiv(copies, block_m),
        BLOCKS=triton.next_power_of_2(blocks),
        num_warps=4,
    )


def _copies_tile(num_copies: int) -> int:
    """16, 64 or 256: the one-program path's tile of copies. Powers of four, not of two: three
    compiled variants instead of five, each reached by ``lora.WARM_UP_TOKENS`` (1, 17, 65) and by
    the engine's warm-up, so no pass compiles one mid-traffic. A tile up to four times the copies
    costs a few more chunks of experts, in the one program."""
    tile = 16
    while tile < num_copies:
        tile *= 4
    return tile


def _align_many_programs(topk_ids, num_experts, block_m, sorted_ids, block_expert) -> None:
    num_copies, num_blocks = topk_ids.numel(), block_expert.shape[0]
    device = topk_ids.device
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
    grid = (triton.cdiv(num_copies, ALIGN_BLOCK),)
    _count_kernel[grid](topk_ids, counts, num_copies, BLOCK=ALIGN_BLOCK, num_warps=4)
    _offsets_kernel[(1,)](
        counts,
        cursor,
        sorted_ids,
        block_expert,
        num_experts,
        num_copies,
        num_blocks,
        BLOCK_M=block_m,
        EXPERTS_PAD=triton.next_power_of_2(num_experts),
        BLOCKS=64,
        num_warps=4,
    )
    _scatter_kernel[grid](topk_ids, cursor, sorted_ids, num_copies, BLOCK=ALIGN_BLOCK, num_warps=4)


@triton.jit
def _tile(num_m, num_n, GROUP_M: tl.constexpr):
    """This program's (M-block, N-block): GROUP_M M-blocks take each N-block in turn, so the
    programs running together read the same weight tiles (an expert's blocks are adjacent)."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    delta_ptr,
    out_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_copies,
    num_m,
    hidden,
    inner,
    TOP_K: tl.constexpr,
    FP8_W: tl.constexpr,
    DELTA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(num_m, tl.cdiv(inner, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    copy = tl.load(sorted_ptr + rows)
    valid = copy < num_copies
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < inner
    k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + (copy // TOP_K).to(tl.int64)[:, None] * hidden + k[None, :]
    g_ptrs = w_ptr + expert * 2 * inner * hidden + n[None, :] * hidden + k[:, None]  # [BLOCK_K, BLOCK_N] of gate rows
    u_ptrs = g_ptrs + inner * hidden  # the up rows of the same columns
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        k_mask = k < hidden - start
        a = tl.load(a_ptrs + start, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        wg = tl.load(g_ptrs + start, mask=w_mask, other=0.0).to(a.dtype)
        wu = tl.load(u_ptrs + start, mask=w_mask, other=0.0).to(a.dtype)
        gate = tl.dot(a, wg, gate, input_precision=PRECISION)
        up = tl.dot(a, wu, up, input_precision=PRECISION)
    if FP8_W:
        gate *= tl.load(scale_ptr + expert * 2 * inner + n, mask=n_mask, other=0.0)[None, :]
        up *= tl.load(scale_ptr + expert * 2 * inner + inner + n, mask=n_mask, other=0.0)[None, :]
    if DELTA:  # adapters' gate/up delta of each row ([rows, 2I], in the alignment's order)
        d_ptrs = delta_ptr + rows.to(tl.int64)[:, None] * 2 * inner + n[None, :]
        d_mask = valid[:, None] & n_mask[None, :]
        gate += tl.load(d_ptrs, mask=d_mask, other=0.0).to(tl.float32)
        up += tl.load(d_ptrs + inner, mask=d_mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    g = gate.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    out = (act * up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * inner + n[None, :], out, mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    a_ptr,
    w_ptr,
    scale_ptr,
    delta_ptr,
    out_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_copies,
    num_m,
    hidden,
    inner,
    FP8_W: tl.constexpr,
    DELTA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(num_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    copy = tl.load(sorted_ptr + rows)
    valid = copy < num_copies
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < hidden
    k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * inner + k[None, :]
    w_ptrs = w_ptr + expert * hidden * inner + n[None, :] * inner + k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, inner, BLOCK_K):
        k_mask = k < inner - start
        a = tl.load(a_ptrs + start, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + start, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if FP8_W:
        acc *= tl.load(scale_ptr + expert * hidden + n, mask=n_mask, other=0.0)[None, :]
    if DELTA:  # adapters' delta of each row's output ([rows, H], in the alignment's order)
        d_ptrs = delta_ptr + rows.to(tl.int64)[:, None] * hidden + n[None, :]
        acc += tl.load(d_ptrs, mask=valid[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    out_ptrs = out_ptr + copy.to(tl.int64)[:, None] * hidden + n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _sum_copies_kernel(copies_ptr, weights_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        weight = tl.load(weights_ptr + t * TOP_K + k)
        acc += weight * tl.load(copies_ptr + (t * TOP_K + k) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Up to this many tokens a pass (batch-1 and batch-2 decode), the experts run as GEMVs instead:
# ``_gate_up_gemv_kernel`` over (copy, column block), ``_down_sum_gemv_kernel`` over (token, column
# block) with the top-k weighted sum in its epilogue. Neither needs the grouping (each program
# reads its copy's expert id), no row is padding, and the sum is no launch of its own: two
# launches where the grouped path takes four, for the same bytes of weights. A copy's expert is
# read once per copy, so from a few tokens on, where copies share experts, the grouped GEMMs win.
GEMV_MAX_TOKENS = 2
# (BLOCK_N, BLOCK_K) of the GEMVs by weight element size, from bench/gemv.py's one-row sweep of
# the dense projections (gate/up with its activation: 8 x 512 in bf16, 8 x 1024 in e4m3; down:
# 4 x 1024 in bf16); bench/moe_kernel.py times this path against the grouped one.
GEMV_TILES = {2: {"gate_up": (8, 512), "down": (4, 1024)}, 1: {"gate_up": (8, 1024), "down": (8, 1024)}}


@triton.jit
def _routed(logits_ptr, t, num_experts, stride, TOP_K, RENORMALIZE, LIBDEVICE, EXPERTS, K_PAD):
    """Token ``t``'s top-k (weights, ids) ``[1, K_PAD]`` by ``_top_k`` on its router logits: each
    GEMV program routes for itself (the logits are a few hundred bytes), so routing is no launch."""
    return _top_k(
        logits_ptr, t + tl.arange(0, 1), t + 1, num_experts, stride, TOP_K, RENORMALIZE, LIBDEVICE, EXPERTS, K_PAD
    )


@triton.jit
def _pick(weights, ids, j, K_PAD: tl.constexpr):
    """The ``j``-th (expert, weight) of ``_routed``'s row."""
    pick = tl.arange(0, K_PAD)[None, :] == j
    return tl.sum(tl.where(pick, ids, 0)).to(tl.int64), tl.sum(tl.where(pick, weights, 0.0))


@triton.jit
def _gate_up_gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    ids_ptr,
    out_ptr,
    logits_ptr,
    num_experts,
    stride,
    hidden,
    inner,
    TOP_K: tl.constexpr,
    FP8_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROUTED: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    EXPERTS: tl.constexpr,
    K_PAD: tl.constexpr,
):
    # Copy c = t*K + k of token t: its expert's gate and up rows n times x[t], silu(gate) * up
    # rounded as _gate_up_kernel rounds, to row c of the output. ROUTED: the expert from the
    # router logits (_routed), not from ids.
    c = tl.program_id(0).to(tl.int64)
    if ROUTED:
        weights, ids = _routed(
            logits_ptr, c // TOP_K, num_experts, stride, TOP_K, RENORMALIZE, LIBDEVICE, EXPERTS, K_PAD
        )
        expert, _ = _pick(weights, ids, c % TOP_K, K_PAD)
    else:
        expert = tl.load(ids_ptr + c).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < inner
    k = tl.arange(0, BLOCK_K)
    g_ptrs = w_ptr + expert * 2 * inner * hidden + n[:, None].to(tl.int64) * hidden + k[None, :]
    u_ptrs = g_ptrs + inner * hidden
    x_row = x_ptr + (c // TOP_K) * hidden
    gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        k_mask = start + k < hidden
        x = tl.load(x_row + start + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        w_mask = n_mask[:, None] & k_mask[None, :]
        gate += tl.sum(tl.load(g_ptrs + start, mask=w_mask, other=0.0).to(tl.float32) * x, axis=1)
        up += tl.sum(tl.load(u_ptrs + start, mask=w_mask, other=0.0).to(tl.float32) * x, axis=1)
    if FP8_W:
        gate *= tl.load(scale_ptr + expert * 2 * inner + n, mask=n_mask, other=0.0)
        up *= tl.load(scale_ptr + expert * 2 * inner + inner + n, mask=n_mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    g = gate.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + c * inner + n, (act * up.to(dtype).to(tl.float32)).to(dtype), mask=n_mask)


@triton.jit
def _down_sum_gemv_kernel(
    act_ptr,
    w_ptr,
    scale_ptr,
    ids_ptr,
    weights_ptr,
    out_ptr,
    logits_ptr,
    num_experts,
    stride,
    hidden,
    inner,
    TOP_K: tl.constexpr,
    FP8_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROUTED: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    EXPERTS: tl.constexpr,
    K_PAD: tl.constexpr,
):
    # Token t's output columns n: each of its copies' expert output (rounded, as _down_kernel
    # stores it), weighted and summed in float32 in copy order as _sum_copies_kernel sums them.
    # ROUTED: experts and weights from the router logits (_routed), not from ids and weights.
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < hidden
    k = tl.arange(0, BLOCK_K)
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    if ROUTED:  # once for the token's copies
        routed_weights, routed_ids = _routed(
            logits_ptr, t, num_experts, stride, TOP_K, RENORMALIZE, LIBDEVICE, EXPERTS, K_PAD
        )
    for j in tl.static_range(TOP_K):
        c = t * TOP_K + j
        if ROUTED:
            expert, weight = _pick(routed_weights, routed_ids, j, K_PAD)
        else:
            expert = tl.load(ids_ptr + c).to(tl.int64)
            weight = tl.load(weights_ptr + c)
        w_ptrs = w_ptr + expert * hidden * inner + n[:, None].to(tl.int64) * inner + k[None, :]
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, inner, BLOCK_K):
            k_mask = start + k < inner
            a = tl.load(act_ptr + c * inner + start + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            w = tl.load(w_ptrs + start, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * a, axis=1)
        if FP8_W:
            acc *= tl.load(scale_ptr + expert * hidden + n, mask=n_mask, other=0.0)
        total += weight * acc.to(dtype).to(tl.float32)
    tl.store(out_ptr + t * hidden + n, total.to(dtype), mask=n_mask)


def _experts_gemv(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, routing=None) -> torch.Tensor:
    """``fused_moe`` for at most ``GEMV_MAX_TOKENS`` tokens, as two GEMV launches. ``routing``:
    (router logits [T, E], top_k, renormalize) instead of ``topk_weights``/``topk_ids``: each
    program routes for itself (``routed_moe``)."""
    tokens, hidden = x.shape
    inner = w2.shape[2]
    if routing is None:
        logits, top_k, renormalize = x, topk_ids.shape[1], False
    else:
        logits, top_k, renormalize = routing
    routed = {
        "ROUTED": routing is not None,
        "RENORMALIZE": renormalize,
        "LIBDEVICE": not INTERPRETED,
        "EXPERTS": triton.next_power_of_2(w13.shape[0]),
        "K_PAD": triton.next_power_of_2(top_k),
    }
    tiles = GEMV_TILES[1 if w13.element_size() == 1 else 2]  # float32 (tests) takes bf16's
    fp8 = w13_scale is not None
    act = torch.empty(tokens * top_k, inner, dtype=x.dtype, device=x.device)
    block_n, block_k = tiles["gate_up"]
    block_k = min(block_k, triton.next_power_of_2(hidden))
    _gate_up_gemv_kernel[(tokens * top_k, triton.cdiv(inner, block_n))](
        x, w13, w13_scale, topk_ids, act, logits, w13.shape[0], logits.stride(0), hidden, inner,
        TOP_K=top_k, FP8_W=fp8, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, **routed,
    )  # fmt: skip
    out = torch.empty_like(x)
    block_n, block_k = tiles["down"]
    block_k = min(block_k, triton.next_power_of_2(inner))
    _down_sum_gemv_kernel[(tokens, triton.cdiv(hidden, block_n))](
        act, w2, w2_scale, topk_ids, topk_weights, out, logits, w13.shape[0], logits.stride(0), hidden, inner,
        TOP_K=top_k, FP8_W=fp8, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, **routed,
    )  # fmt: skip
    return out


def routed_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    lora=None,
) -> torch.Tensor:
    """The router's softmax and top-k, then the experts: ``fused_moe(x, ..., *fused_route(router_logits,
    top_k, renormalize))``. Up to ``GEMV_MAX_TOKENS`` tokens without adapters the two GEMVs route
    for themselves from the logits, so the routing is no launch of its own either: the layer is
    two launches after the router's matmul. Capturable in a CUDA graph."""
    tokens = x.shape[0]
    if 0 < tokens <= GEMV_MAX_TOKENS and lora is None:
        assert router_logits.shape == (tokens, w13.shape[0]) and 0 < top_k <= w13.shape[0], (
            f"router_logits must be [T={tokens}, E={w13.shape[0]}] with top_k <= E, not "
            f"{list(router_logits.shape)}, top_k={top_k}"
        )
        _check_weights(x, w13, w2, w13_scale, w2_scale)
        logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
        return _experts_gemv(x, w13, w2, None, None, w13_scale, w2_scale, routing=(logits, top_k, renormalize))
    weights, ids = fused_route(router_logits, top_k, renormalize)
    return fused_moe(x, w13, w2, weights, ids, w13_scale=w13_scale, w2_scale=w2_scale, lora=lora)


def _precision(x: torch.Tensor) -> str:
    """float32 stays float32 (tf32 would break parity with the reference); 16-bit is native."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _check(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale) -> None:
    tokens = x.shape[0]
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == tokens and topk_ids.dtype == torch.int32, (
        f"topk_ids must be [T={tokens}, K] int32, not {topk_ids.dtype} {list(topk_ids.shape)}"
    )
    assert topk_weights.shape == topk_ids.shape and topk_weights.dtype == torch.float32, (
        f"topk_weights must be {list(topk_ids.shape)} float32, not {topk_weights.dtype} {list(topk_weights.shape)}"
    )
    _check_weights(x, w13, w2, w13_scale, w2_scale)
    assert topk_weights.is_contiguous() and topk_ids.is_contiguous(), "fused_moe takes contiguous tensors only"


def _check_weights(x, w13, w2, w13_scale, w2_scale) -> None:
    assert x.dim() == 2 and x.dtype in ACTIVATION_DTYPES, (
        f"x must be [T, H] bf16/fp16/fp32, not {x.dtype} {list(x.shape)}"
    )
    hidden = x.shape[1]
    assert w13.dim() == 3 and w13.shape[2] == hidden and w13.shape[1] % 2 == 0, (
        f"w13 must be [E, 2I, H={hidden}], not {list(w13.shape)}"
    )
    experts, inner = w13.shape[0], w13.shape[1] // 2
    assert w2.shape == (experts, hidden, inner), (
        f"w2 must be [E, H, I] = {[experts, hidden, inner]}, not {list(w2.shape)}"
    )
    assert (w13_scale is None) == (w2_scale is None), "give both FP8 scales or neither"
    if w13_scale is None:
        assert w13.dtype == w2.dtype == x.dtype, (
            f"weights must be {x.dtype} like x (or FP8), not {w13.dtype}/{w2.dtype}"
        )
    else:
        assert w13.dtype == w2.dtype == FP8, f"scaled weights must be float8_e4m3fn, not {w13.dtype}/{w2.dtype}"
        assert w13_scale.shape == (experts, 2 * inner) and w2_scale.shape == (experts, hidden), (
            f"scales must be [E, 2I] and [E, H], not {list(w13_scale.shape)} and {list(w2_scale.shape)}"
        )
        assert w13_scale.dtype == w2_scale.dtype == torch.float32, "FP8 scales must be float32"
    tensors = [x, w13, w2] + ([w13_scale, w2_scale] if w13_scale is not None else [])
    assert all(t.is_contiguous() for t in tensors), "fused_moe takes contiguous tensors only"


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    lora=None,
) -> torch.Tensor:
    """The experts' weighted sum for ``x`` [T, H] (bf16, fp16; float32 for tests): ``w13`` [E, 2I, H]
    (gate rows, then up rows), ``w2`` [E, H, I], ``topk_weights`` [T, K] float32, ``topk_ids``
    [T, K] int32; FP8 weights take ``w13_scale`` [E, 2I] and ``w2_scale`` [E, H] float32;
    adapters of the experts take ``lora`` (``models.lora.ExpertLoraInputs``: each row's deltas by
    the LoRA kernels, added in the GEMMs' epilogues). Returns [T, H] in ``x``'s dtype.
    Capturable in a CUDA graph: nothing waits on the device."""
    _check(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    tokens, hidden = x.shape
    experts, inner, top_k = w13.shape[0], w2.shape[2], topk_ids.shape[1]
    if 0 < tokens <= GEMV_MAX_TOKENS and lora is None:
        return _experts_gemv(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    out = torch.empty_like(x)
    if tokens == 0:
        return out
    cfg = moe_config(tokens, top_k, experts, hidden, inner, x.dtype)
    groups = align(topk_ids, experts, cfg.block_m)
    rows = _LoraRows(x, groups, cfg, top_k, experts, lora) if lora is not None else None
    act = _gate_up(x, w13, w13_scale, groups, cfg, top_k, rows.gate_up() if rows else None)
    copies = _down(act, w2, w2_scale, groups, cfg, tokens * top_k, rows.down(act) if rows else None)
    block = min(1024, triton.next_power_of_2(hidden))
    _sum_copies_kernel[(tokens, triton.cdiv(hidden, block))](
        copies, topk_weights, out, hidden, TOP_K=top_k, BLOCK=block, num_warps=4
    )
    return out


class _LoraRows:
    """Adapters' deltas for the alignment's rows: row j holds copy ``c = sorted_ids[j]`` of token
    ``c // K`` routed to its M-block's expert ``e``; its (slot, expert) pair ``slot * E + e`` picks
    the LoRA (-1: the base, or a padding row), and the LoRA kernels compute each row's delta on
    its own input (gate/up: the token's hidden state; down: the row's activation)."""

    def __init__(self, x, groups: Alignment, cfg: MoeConfig, top_k: int, experts: int, lora) -> None:
        num_copies = x.shape[0] * top_k
        expert = groups.block_expert.long().repeat_interleave(cfg.block_m)
        copy = groups.sorted_ids.long()
        valid = (expert >= 0) & (copy >= 0) & (copy < num_copies)  # rows past the total hold garbage
        token = torch.where(valid, copy, 0) // top_k
        slot = lora.slots.long()[token]
        self.pairs = torch.where(valid & (slot >= 0), slot * experts + expert, -1).to(torch.int32)
        self.x, self.token, self.lora = x, token, lora
        self.groups: dict = {}  # both calls group the same rows by the same pairs: once

    def gate_up(self) -> torch.Tensor:
        """Each row's gate/up delta [rows, 2I], from its token's hidden state."""
        return self._delta(self.x[self.token], self.lora.a13, self.lora.b13)

    def down(self, act: torch.Tensor) -> torch.Tensor:
        """Each row's output delta [rows, H], from its activation."""
        return self._delta(act, self.lora.a2, self.lora.b2)

    def _delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from stepserve.kernels.triton.lora import lora_delta

        delta = torch.zeros(self.pairs.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
        return lora_delta(delta, x.to(a.dtype), a, b, self.pairs, self.groups)


def _gate_up(x, w13, scale, groups: Alignment, cfg: MoeConfig, top_k: int, delta=None) -> torch.Tensor:
    """``silu(gate) * up`` [rows of the alignment, I]; padding rows are left unwritten. ``delta``
    [rows, 2I]: added to gate and up before the activation."""
    hidden, inner = x.shape[1], w13.shape[1] // 2
    num_m = groups.block_expert.shape[0]
    act = torch.empty(groups.sorted_ids.shape[0], inner, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_m * triton.cdiv(inner, cfg.block_n),)](
        x,
        w13,
        scale,
        delta,
        act,
        groups.sorted_ids,
        groups.block_expert,
        x.shape[0] * top_k,
        num_m,
        hidden,
        inner,
        TOP_K=top_k,
        FP8_W=scale is not None,
        DELTA=delta is not None,
        PRECISION=_precision(x),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return act


def _down(act, w2, scale, groups: Alignment, cfg: MoeConfig, num_copies: int, delta=None) -> torch.Tensor:
    """Each copy's expert output [T*K, H], in ``act``'s dtype, at row ``t*K + k``; ``delta``
    [rows, H] (in the alignment's order) added to it."""
    hidden, inner = w2.shape[1], w2.shape[2]
    num_m = groups.block_expert.shape[0]
    copies = torch.empty(num_copies, hidden, dtype=act.dtype, device=act.device)
    _down_kernel[(num_m * triton.cdiv(hidden, cfg.block_n),)](
        act,
        w2,
        scale,
        delta,
        copies,
        groups.sorted_ids,
        groups.block_expert,
        num_copies,
        num_m,
        hidden,
        inner,
        FP8_W=scale is not None,
        DELTA=delta is not None,
        PRECISION=_precision(act),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return copies
