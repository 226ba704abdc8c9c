"""Layers shared by every decoder family: RMSNorm (plain or ``(1 + w)``), attention (optional
q/k norm, soft-capping, sliding window), the gated MLP with its activation, the decoder layer
(pre-norm, or Gemma's sandwich of norms around attention and MLP).

Tokens of all sequences are packed along one axis; attention goes through a backend over the
paged KV cache. q/k/v and gate/up are fused into one matmul each (the loader fills the slices).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.attention.base import AttentionBackend, AttentionMetadata, HeadNorms, fuses_rotary
from stepserve.models.rope import RopeStep, fused_ops

if TYPE_CHECKING:
    from stepserve.models.config import DecoderConfig

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class RMSNorm(nn.Module):
    """RMSNorm; ``offset`` multiplies by ``1 + w`` in float32 (Gemma) instead of ``w``."""

    def __init__(self, size: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with a residual, ``(norm(x + residual), x + residual)`` (one kernel on CUDA)."""
        ops = None if self.offset else fused_ops(x)
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:  # as transformers' Gemma: all in float32, rounded once at the end
            normed = torch.rms_norm(x.float(), self.weight.shape, None, self.eps)
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        # One kernel; it accumulates in float32 for bf16 inputs, as transformers' upcast does.
        return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, window: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.scale = cfg.attn_scale
        self.window = window  # keys a query sees, itself included; 0: all
        self.softcap = cfg.attn_softcap
        self.kv_scale = (1.0, 1.0)  # per-tensor scales of K and V in an FP8 cache

    def forward(self, x, rope: RopeStep, kv_cache, meta: AttentionMetadata, backend: AttentionBackend):
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        opts = {"kv_scale": self.kv_scale} if kv_cache.dtype == torch.float8_e4m3fn else {}  # FP8 caches only
        if rope.fused and fuses_rotary(backend):  # the backend rotates as it writes K: one launch, not two
            if self.q_norm is not None and not self.q_norm.offset:  # and norms q and k first (Qwen3)
                opts["qk_norm"] = HeadNorms(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
            elif self.q_norm is not None:
                qk = self._norm_qk(qk)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            opts["rotary"] = rope
        else:
            if self.q_norm is not None:
                qk = self._norm_qk(qk)
            q, k = rope.apply(qk, self.num_heads)
        out = backend.forward(q, k, v, kv_cache, meta, self.scale, window=self.window, softcap=self.softcap, **opts)
        return self.o_proj(out.reshape(-1, self.q_size))

    def _norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm of queries and keys (Qwen3, Gemma 3), before the rotary; on CUDA one
        kernel in place for ``w`` norms (Qwen3), as ``RMSNorm`` would compute each head."""
        ops = None if self.q_norm.offset else fused_ops(qk)
        if ops is not None:
            ops.rms_norm_heads_(qk, self.q_norm.weight, self.k_norm.weight, self.num_heads, self.q_norm.eps)
            return qk
        t, d = qk.shape[0], self.head_dim
        q = self.q_norm(qk[:, : self.num_heads].reshape(-1, d)).view(t, self.num_heads, d)
        k = self.k_norm(qk[:, self.num_heads :].reshape(-1, d)).view(t, self.num_kv_heads, d)
        return torch.cat([q, k], dim=1)


def one_row_silu_mul(gate_up: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` of one row (batch-1 decode) in one kernel, ``kernels.triton.gemv``'s
    ``gemv_silu_mul``, where ``bench/gemv.py`` found it faster than cuBLAS then ``silu_and_mul``
    (79.6 against 82.6 us on the 8B's gate/up, H100): on CUDA, for a plain 16-bit ``nn.Linear`` or
    ``models.lora.LoraLinear`` around one (its adapters' delta in the same kernel). None
    elsewhere (FP8 keeps its GEMV and the separate activation, which measured faster)."""
    if x.shape[0] != 1 or not x.is_cuda:
        return None
    adapted = getattr(gate_up, "one_row_silu_mul", None)  # LoraLinear
    if adapted is not None:
        return adapted(x)
    weight = gate_up.weight
    if type(gate_up) is not nn.Linear or weight.dtype not in (torch.bfloat16, torch.float16):
        return None
    if weight.dtype != x.dtype or not weight.is_contiguous():
        return None
    from stepserve.kernels.triton.gemv import gemv_silu_mul

    return gemv_silu_mul(x, weight, None, gate_up.bias)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up in one matmul."""

    def __init__(self, cfg: DecoderConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        inner = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inner, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(inner, cfg.hidden_size, bias=cfg.mlp_bias)
        self.activation = cfg.activation
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = one_row_silu_mul(self.gate_up_proj, x) if self.activation == "silu" else None
        if act is not None:
            return self.down_proj(act)
        gate_up = self.gate_up_proj(x)
        ops = fused_ops(gate_up) if self.activation == "silu" else None
        if ops is not None:
            return self.down_proj(ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP; with ``sandwich_norms`` each output is normed again before
    the residual add (Gemma 2/3: ``post_attention``, ``pre_feedforward``, ``post_feedforward``)."""

    def __init__(self, cfg: DecoderConfig, window: int, mlp: nn.Module | None = None) -> None:
        super().__init__()
        eps, offset = cfg.rms_norm_eps, cfg.norm_offset
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.self_attn = Attention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset) if cfg.sandwich_norms else None
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset) if cfg.sandwich_norms else None
        self.mlp = mlp if mlp is not None else GatedMLP(cfg)  # a mixture of experts (moe.SparseMoE) where given
        self.residual_scale = cfg.residual_scale

    def forward(self, x, residual, rope, kv_cache, meta, backend):
        """Returns this layer's MLP output and the residual stream before it; the next norm adds
        them (fused on CUDA). The first layer gets ``residual=None``."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self._scaled(self.self_attn(h, rope, kv_cache, meta, backend))
        if self.pre_feedforward_layernorm is None:
            h, residual = self.post_attention_layernorm(h, residual)
            return self._scaled(self.mlp(h)), residual
        h, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(h), residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        """Granite's residual_multiplier scales each branch before the residual add."""
        return h if self.residual_scale == 1.0 else h * self.residual_scale
