"""Rotary position embeddings: the frequencies of each scaling type, and the per-step tables.

Every family rotates with rotate_half (the two halves of the rotated dims pair up, as
transformers does); ``rotary_dim`` below ``head_dim`` rotates only the leading dims
(``partial_rotary_factor``) and passes the rest through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stepserve.models.config import RopeConfig


def inv_freq_and_scale(rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the factor applied to cos and sin, as transformers computes them."""
    dim = rope.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "default":
        return inv_freq, 1.0
    if rope.kind == "linear":
        return inv_freq / rope.param("factor"), 1.0
    if rope.kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    return _longrope(exponents, rope)


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    factor = rope.param("factor")
    low, high = rope.param("low_freq_factor"), rope.param("high_freq_factor")
    old_len = rope.param("original_max_position_embeddings")
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _longrope(exponents: torch.Tensor, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE. transformers picks the long factors when the sequence outgrows the
    original context, per forward pass; stepserve picks once per engine (long when the served
    context exceeds the original), so every token of every sequence shares one table."""
    original = rope.param("original_max_position_embeddings")
    factor = rope.param("factor") or rope.max_position_embeddings / original
    scale = rope.param("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(rope.param("long_factor" if rope.long_context else "short_factor"), dtype=torch.float32)
    return 1.0 / (ext * rope.theta**exponents), float(scale)


def fused_ops(x: torch.Tensor):
    """The Triton kernels of ``triton_ops`` for CUDA tensors, else None (the PyTorch code runs)."""
    if not x.is_cuda:
        return None
    global _FUSED
    if _FUSED is None:
        from stepserve.kernels.triton import fused as triton_ops

        _FUSED = triton_ops
    return _FUSED


_FUSED = None


class Rotary(nn.Module):
    """cos/sin tabulated once per position; ``step`` hands every layer of a step its tables."""

    def __init__(self, rope: RopeConfig, max_positions: int) -> None:
        super().__init__()
        self.rope = rope
        self.max_positions = max_positions
        self.register_buffer("cos_sin", torch.empty(max_positions, rope.rotary_dim), persistent=False)

    def fill(self) -> None:
        inv_freq, scale = inv_freq_and_scale(self.rope)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        self.cos_sin.copy_(torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1))

    def step(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeStep:
        """What every layer of one step needs to rotate its queries and keys."""
        half = self.rope.rotary_dim // 2
        if fused_ops(positions) is not None and half & (half - 1) == 0:  # the kernel tiles a power of two
            return RopeStep(positions, self.cos_sin, None, None)
        cos, sin = self.cos_sin[positions].to(dtype).chunk(2, dim=-1)  # [T, R/2] each
        # Full-width tables, sin negated on the first half: rotate_half(x) * sin becomes
        # halves_swapped(x) * signed_sin, one flip instead of a chunk, a negation and a cat.
        return RopeStep(
            positions, self.cos_sin, torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]
        )


@dataclass
class RopeStep:
    """Rotary inputs of one step, computed once and shared by every layer."""

    positions: torch.Tensor  # [T]
    cos_sin: torch.Tensor  # [max_positions, R] float32 table, read by the fused CUDA kernel
    cos: torch.Tensor | None  # [T, 1, R] in the model dtype (PyTorch path); None: fused kernel
    signed_sin: torch.Tensor | None  # [T, 1, R], first half negated (PyTorch path)

    @property
    def fused(self) -> bool:
        """Whether a Triton kernel rotates, from ``cos_sin``: ``rotary_`` here, or an attention
        backend that ``fuses_rotary`` as it writes the KV cache (``Attention.forward``)."""
        return self.cos is None

    def apply(self, qk: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``qk`` [T, H + Hkv, D] (queries then keys, a view of the qkv output)."""
        if self.fused:  # in place on the qkv output: one launch instead of a dozen
            q, k = qk[:, :num_heads], qk[:, num_heads:]
            fused_ops(qk).rotary_(q, k, self.positions, self.cos_sin)
            return q, k
        t, heads, dim = qk.shape
        rot = self.cos.shape[-1]
        part = qk if rot == dim else qk[..., :rot]
        swapped = part.reshape(t, heads, 2, rot // 2).flip(-2).view(t, heads, rot)
        out = part * self.cos + swapped * self.signed_sin
        if rot != dim:  # partial rotary: the trailing dims pass through
            out = torch.cat([out, qk[..., rot:]], dim=-1)
        return out[:, :num_heads], out[:, num_heads:]
