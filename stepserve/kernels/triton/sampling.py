"""The sampler's Triton kernel: an exponential race with its noise made in registers.

``filtered_race`` draws from the raw logits with temperature, top-k, top-p and min-p, without
sorting the vocabulary. Top-k's threshold, the k-th largest scaled logit, comes from a radix
select (four histogram passes over the row). With the same noise, the race over the kept tokens
is won by the token that wins the race over any larger set it is in. So the kernel races over
every token top-k and min-p keep, checks the winner against top-p (one pass that sums the mass
ranked before it), and if top-p cuts it, races again over the tokens ranked before it, until one
is kept: a few passes over the row where a sort reads and writes it many times. The ranking is by
scaled logit, ties by lower index (a stable sort's order): top-k keeps every token tied with the
k-th, as ``sampler`` does; top-p keeps a token while the mass ranked before it is below top_p of
the mass top-k keeps, so exact ties are cut by index where ``sampler``'s sort cuts them in its
own order.

The race is ``sampler.py``'s, without the [B, V] noise tensor: the same splitmix64 words, the
same float32 uniforms, -log in Triton's float32 log (which may differ from torch's in the last
bit, so a near tie can go the other way; the draws are equally exact), the first index of the
largest ratio, as ``argmax`` keeps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepserve.kernels import NOISE_BITS

_BLOCK = 2048


@triton.jit
def _mix64(x):
    x = x ^ (x >> 30)
    x = x * 0xBF58476D1CE4E5B9
    x = x ^ (x >> 27)
    x = x * 0x94D049BB133111EB
    return x ^ (x >> 31)


_MAX_ROUNDS = 64  # races a row may run; each cut raises the pivot, and a few suffice (then: the most likely token)


@triton.jit
def _ordered(s):
    """float32 -> uint32 keys in the same order (negatives flipped, positives above them)."""
    bits = s.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _unordered(key):
    bits = tl.where((key >> 31) != 0, key & 0x7FFFFFFF, key ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest(base, temp, n_cols, k, BLOCK: tl.constexpr):
    """The k-th largest scaled logit of a row (ties counted): a radix select, 8 bits of the
    ordered key per pass, each pass a histogram of the tokens that match the bits chosen so far."""
    bins = tl.arange(0, 256)
    prefix = tl.full((), 0, tl.uint32)
    fixed = tl.full((), 0, tl.uint32)
    rank = k  # from 1, among the tokens that match prefix
    for d in tl.static_range(4):
        shift = 24 - 8 * d
        counts = tl.zeros((256,), tl.int32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            key = _ordered(tl.load(base + cols, mask=inside, other=float("-inf")) / temp)
            digit = ((key >> shift) & 255).to(tl.int32)
            counts += tl.histogram(digit, 256, mask=inside & ((key & fixed) == prefix))
        above = tl.sum(counts, 0) - tl.cumsum(counts, 0)  # matching tokens in higher bins
        hit = (above < rank) & (above + counts >= rank)
        chosen = tl.max(tl.where(hit, bins, 0), 0)
        rank -= tl.sum(tl.where(bins == chosen, above, 0), 0)
        prefix = prefix | (chosen.to(tl.uint32) << shift)
        fixed = fixed | tl.full((), 0xFF << shift, tl.uint32)
    return _unordered(prefix)


# Which filters the batch has are runtime flags, a filter that is off gets a stand-in of its own
# dtype (a pointer's dtype is part of the compiled signature), and the per-row pointers are not
# specialized on alignment (an eager pass's output indices sit after its keys in one upload,
# 16-byte aligned only for an even batch): one compiled kernel serves every pass, so the sampling
# graphs' capture at startup compiles all that eager passes use.
_ROW_POINTERS = ["temp_ptr", "greedy_ptr", "top_k_ptr", "top_p_ptr", "min_p_ptr", "keys_ptr", "index_ptr", "out_ptr"]


@triton.jit(do_not_specialize=["has_top_k", "has_top_p", "has_min_p"], do_not_specialize_on_alignment=_ROW_POINTERS)
def _filtered_race_kernel(
    logits_ptr,
    stride,
    temp_ptr,
    greedy_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    keys_ptr,
    index_ptr,
    out_ptr,
    n_cols,
    has_top_k,
    has_top_p,
    has_min_p,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_ROUNDS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(greedy_ptr + row).to(tl.int32) == 0:  # greedy rows take the argmax outside
        base = logits_ptr + row * stride
        temp = tl.load(temp_ptr + row)
        golden = 0x9E3779B97F4A7C15
        key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
        index = tl.load(index_ptr + row).to(tl.uint64, bitcast=True)
        token_key = _mix64(key + _mix64((index + 1) * golden))
        top_k = n_cols
        top_p = tl.full((), 1.0, tl.float32)
        min_p = tl.full((), 0.0, tl.float32)
        if has_top_k != 0:
            top_k = tl.load(top_k_ptr + row).to(tl.int32)
        if has_top_p != 0:
            top_p = tl.load(top_p_ptr + row)
        if has_min_p != 0:
            min_p = tl.load(min_p_ptr + row)
        # Top-k keeps the scaled logits at or above the k-th largest.
        kth = tl.full((), float("-inf"), tl.float32)
        if top_k < n_cols:
            kth = _kth_largest(base, temp, n_cols, top_k, BLOCK)
        # The largest scaled logit and the mass top-k keeps, online (min-p and top-p need them).
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        if (top_p < 1.0) | (min_p > 0.0):
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                s = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")) / temp
                new_top = tl.maximum(top, tl.max(s, 0))
                shift = tl.where(new_top == float("-inf"), 0.0, new_top)
                total = total * tl.exp(top - shift) + tl.sum(tl.where(s >= kth, tl.exp(s - shift), 0.0), 0)
                top = new_top
        pivot_s = tl.full((), float("-inf"), tl.float32)  # race over the tokens ranked before the pivot
        pivot_c = tl.full((), 0, tl.int64) + n_cols
        token = tl.full((), 0, tl.int64)
        rounds = 0
        searching = 1
        while searching != 0:
            best = tl.full((), float("-inf"), tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < n_cols
                s = tl.load(base + cols, mask=inside, other=float("-inf")) / temp
                keep = inside & (s >= kth) & ((s > pivot_s) | ((s == pivot_s) & (cols < pivot_c)))
                if min_p > 0.0:
                    keep = keep & (tl.exp(s - top) >= min_p)
                words = _mix64(token_key + (cols.to(tl.uint64) + 1) * golden)
                u = ((words >> (64 - BITS)).to(tl.float32) + 0.5) * (1.0 / (1 << BITS))
                score = tl.where(keep, s - tl.log(-tl.log(u)), float("-inf"))  # log of p / E, up to a constant
                block_best = tl.max(score, 0)
                col = start + tl.argmax(score, 0).to(tl.int64)
                token = tl.where(block_best > best, col, token)
                best = tl.maximum(best, block_best)
            searching = 0
            if top_p < 1.0:  # the mass ranked before the winner, against top_p of top-k's mass
                chosen = tl.load(base + token) / temp
                mass = 0.0
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    s = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")) / temp
                    before = (s > chosen) | ((s == chosen) & (cols < token))
                    mass += tl.sum(tl.where(before, tl.exp(s - top), 0.0), 0)
                if mass >= top_p * total:
                    pivot_s = chosen
                    pivot_c = token
                    rounds += 1
                    searching = (rounds < MAX_ROUNDS).to(tl.int32)
        if rounds >= MAX_ROUNDS:  # never seen; the most likely token is always kept
            best = tl.full((), float("-inf"), tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                s = tl.load(base + cols, mask=cols < n_cols, other=float("-inf"))
                block_best = tl.max(s, 0)
                token = tl.where(block_best > best, start + tl.argmax(s, 0).to(tl.int64), token)
                best = tl.maximum(best, block_best)
        tl.store(out_ptr + row, token)


def filtered_race(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    greedy: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    keys: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """Token ids [B] drawn from float32 ``logits`` [B, V] at ``temperature`` [B] (float32) with the
    filters given (top-k int64, top-p and min-p float32; None: off for every row); greedy rows get 0."""
    logits = logits.contiguous()
    out = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    _filtered_race_kernel[(logits.shape[0],)](
        logits,
        logits.stride(0),
        temperature,
        greedy,
        top_k if top_k is not None else index,
        top_p if top_p is not None else temperature,
        min_p if min_p is not None else temperature,
        keys,
        index,
        out,
        logits.shape[1],
        int(top_k is not None),
        int(top_p is not None),
        int(min_p is not None),
        BITS=NOISE_BITS,
        BLOCK=_BLOCK,
        MAX_ROUNDS=_MAX_ROUNDS,
    )
    return out
