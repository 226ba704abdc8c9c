"""One Llama-family model configured from ``config.json``: Llama 2/3, Mistral, Qwen2, SmolLM2.

Tokens of all sequences are packed along one axis; attention goes through a backend over the
paged KV cache. q/k/v and gate/up are fused into one matmul each (the loader fills the slices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.attention.base import AttentionBackend, AttentionMetadata
from stepserve.config import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, object], ...]  # the rope_scaling dict as sorted pairs, () for none
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, or Llama with attention_bias
    o_bias: bool  # Llama with attention_bias
    mlp_bias: bool

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"architecture {arch!r} is not supported; stepserve runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported (only silu)")
        heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        is_qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(hf.get("mlp_bias", False)),
        )


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3 or linear scaling applied as transformers does."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ConfigError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def fused_ops(x: torch.Tensor):
    """The Triton kernels of ``triton_ops`` for CUDA tensors, else None (the PyTorch code runs)."""
    if not x.is_cuda:
        return None
    global _FUSED
    if _FUSED is None:
        from stepserve.models import triton_ops

        _FUSED = triton_ops
    return _FUSED


_FUSED = None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with a residual, ``(norm(x + residual), x + residual)`` (one kernel on CUDA)."""
        ops = fused_ops(x)
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # One kernel; it accumulates in float32 for bf16 inputs, as transformers' upcast does.
        return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Rotary(nn.Module):
    """Non-interleaved rotary embedding (rotate_half), cos/sin tabulated once per position."""

    def __init__(self, cfg: LlamaConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_positions = max_positions
        self.register_buffer("cos_sin", torch.empty(max_positions, cfg.head_dim), persistent=False)

    def fill(self) -> None:
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), rope_inv_freq(self.cfg))
        self.cos_sin.copy_(torch.cat([freqs.cos(), freqs.sin()], dim=-1))

    def step(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeStep:
        """What every layer of one step needs to rotate its queries and keys."""
        if fused_ops(positions) is not None:
            return RopeStep(positions, self.cos_sin, None, None)
        cos, sin = self.cos_sin[positions].to(dtype).chunk(2, dim=-1)  # [T, D/2] each
        # Full-width tables, sin negated on the first half: rotate_half(x) * sin becomes
        # halves_swapped(x) * signed_sin, one flip instead of a chunk, a negation and a cat.
        return RopeStep(positions, self.cos_sin, torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None])


@dataclass
class RopeStep:
    """Rotary inputs of one step, computed once and shared by every layer."""

    positions: torch.Tensor  # [T]
    cos_sin: torch.Tensor  # [max_positions, D] float32 table, read by the fused CUDA kernel
    cos: torch.Tensor | None  # [T, 1, D] in the model dtype (PyTorch path)
    signed_sin: torch.Tensor | None  # [T, 1, D], first half negated (PyTorch path)

    def apply(self, qk: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``qk`` [T, H + Hkv, D] (queries then keys, a view of the qkv output)."""
        ops = fused_ops(qk)
        if ops is not None:  # in place on the qkv output: one launch instead of a dozen
            q, k = qk[:, :num_heads], qk[:, num_heads:]
            ops.rotary_(q, k, self.positions, self.cos_sin)
            return q, k
        t, heads, dim = qk.shape
        swapped = qk.view(t, heads, 2, dim // 2).flip(-2).view(t, heads, dim)
        out = qk * self.cos + swapped * self.signed_sin
        return out[:, :num_heads], out[:, num_heads:]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, rope: RopeStep, kv_cache, meta: AttentionMetadata, backend: AttentionBackend):
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        q, k = rope.apply(qk, self.num_heads)
        out = backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        ops = fused_ops(gate_up)
        if ops is not None:
            return self.down_proj(ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, rope, kv_cache, meta, backend):
        """Returns this layer's MLP output and the residual stream before it; the next norm adds
        them (fused on CUDA). The first layer gets ``residual=None``."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    # HF checkpoint names folded into the fused projections: (source suffix, target, shard index)
    STACKED = (
        ("q_proj", "qkv_proj", 0),
        ("k_proj", "qkv_proj", 1),
        ("v_proj", "qkv_proj", 2),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    )

    def __init__(self, cfg: LlamaConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg, max_positions)
        self.packed_head = None  # set by pack_for_cpu

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, backend: AttentionBackend):
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.step(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv_cache, meta, backend)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_head is not None:
            return self.packed_head(hidden).float()
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def pack_for_cpu(self, dtype: torch.dtype, int4: bool) -> None:
        """Prepack every projection and the head for oneDNN; with ``int4``, the projections get
        int4 twins for small batches (``cpu_linear``). The head stays bf16: a GGUF stores it
        (tied to the embedding) in 8 bits, 4 bits of it visibly change greedy answers, and
        PyTorch's int8 kernel reads it no faster than oneDNN reads bf16 here."""
        from stepserve.models.cpu_linear import CpuLinear, pack_linears

        pack_linears(self.layers, dtype, int4)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.packed_head = CpuLinear(head, None, dtype, int4=False)
        self.lm_head = None

    def load_weights(self, weights) -> set[str]:
        """Copy ``(hf_name, tensor)`` pairs into the parameters; returns the names filled."""
        params = dict(self.named_parameters())
        shard_sizes = {
            "qkv_proj": (self.cfg.num_heads * self.cfg.head_dim, self.cfg.num_kv_heads * self.cfg.head_dim, self.cfg.num_kv_heads * self.cfg.head_dim),
            "gate_up_proj": (self.cfg.intermediate_size, self.cfg.intermediate_size),
        }
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            target, shard = name, None
            for src, dst, idx in self.STACKED:
                if f".{src}." in name:
                    target, shard = name.replace(f".{src}.", f".{dst}."), idx
                    break
            if target == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            if target not in params:
                raise ConfigError(f"unexpected weight {name!r} in the checkpoint")
            param = params[target]
            if shard is None:
                dest = param.data
            else:
                sizes = shard_sizes[target.split(".")[-2]]
                dest = param.data.narrow(0, sum(sizes[:shard]), sizes[shard])
            if dest.shape != tensor.shape:
                raise ConfigError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(f"{target}#{shard}")
        return loaded

    def expected_weights(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            fused = [idx for _, dst, idx in self.STACKED if f".{dst}." in name]
            names |= {f"{name}#{i}" for i in fused} if fused else {f"{name}#None"}
        return names
