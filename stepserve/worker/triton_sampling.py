"""The sampler's Triton kernel: the exponential race with its noise made in registers.

``exponential_race`` gives what ``(probs / exponential_noise(keys, index, V)).argmax(-1)``
gives in ``sampler.py``, without the [B, V] noise tensor: the same splitmix64 words, the same
float32 uniforms, -log in Triton's float32 log (which may differ from torch's in the last bit,
so a near tie can go the other way; the draws are equally exact). One program per row scans the
vocabulary in blocks and keeps the first index of the largest ratio, as ``argmax`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepserve.worker.sampler import NOISE_BITS

_BLOCK = 2048


@triton.jit
def _mix64(x):
    x = x ^ (x >> 30)
    x = x * 0xBF58476D1CE4E5B9
    x = x ^ (x >> 27)
    x = x * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _race_kernel(probs_ptr, stride, keys_ptr, index_ptr, out_ptr, n_cols, BITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    golden = 0x9E3779B97F4A7C15
    key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
    index = tl.load(index_ptr + row).to(tl.uint64, bitcast=True)
    token_key = _mix64(key + _mix64((index + 1) * golden))
    best = tl.full((), -1.0, tl.float32)
    best_col = tl.full((), 0, tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        p = tl.load(probs_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        words = _mix64(token_key + (cols.to(tl.uint64) + 1) * golden)
        u = ((words >> (64 - BITS)).to(tl.float32) + 0.5) * (1.0 / (1 << BITS))
        ratio = tl.where(mask, p / -tl.log(u), -1.0)
        top = tl.max(ratio, 0)
        col = start + tl.argmax(ratio, 0).to(tl.int64)
        better = top > best  # strictly: an earlier block keeps a tie, as argmax keeps the first index
        best_col = tl.where(better, col, best_col)
        best = tl.where(better, top, best)
    tl.store(out_ptr + row, best_col)


def exponential_race(probs: torch.Tensor, keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Token ids [B] drawn from ``probs`` [B, V] (float32, rows need not be normalized)."""
    probs = probs.contiguous()
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    _race_kernel[(probs.shape[0],)](probs, probs.stride(0), keys, index, out, probs.shape[1], BITS=NOISE_BITS, BLOCK=_BLOCK)
    return out
