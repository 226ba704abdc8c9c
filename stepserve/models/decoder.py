"""The dense decoder every family configures: its config, the model, and the weight loading.

A family file (``llama.py``, ``qwen.py``, ``gemma.py``, ``phi3.py``, ``granite.py``) turns a
``config.json`` into a ``DecoderConfig``: what differs is data, not code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.attention.base import AttentionBackend, AttentionMetadata
from stepserve.config import ConfigError
from stepserve.models.fp8_checkpoint import fp8_format
from stepserve.models.layers import ACTIVATIONS, DecoderLayer, RMSNorm
from stepserve.models.rope import RopeConfig, Rotary, rope_config


@dataclass(frozen=True)
class DecoderConfig:
    """Everything that shapes a dense decoder's maths."""

    architecture: str  # config.json's architectures[0]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig  # the rotary of full-attention layers (and of windowed ones without local_rope)
    layer_windows: tuple[int, ...]  # per layer: keys a query sees, itself included; 0 = all
    attn_scale: float  # multiplies q.k
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"  # a key of layers.ACTIVATIONS
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotary (Qwen3, Gemma 3)
    norm_offset: bool = False  # RMSNorm multiplies by (1 + w) (Gemma)
    sandwich_norms: bool = False  # norms after attention and MLP too (Gemma 2/3)
    local_rope: RopeConfig | None = None  # windowed layers' own rotary (Gemma 3)
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap); 0 = off (Gemma 2)
    final_softcap: float = 0.0  # the same on the logits (Gemma 2)
    embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden); Granite)
    residual_scale: float = 1.0  # each branch times this before the residual add (Granite)
    logits_divisor: float = 1.0  # logits divided by this (Granite's logits_scaling)
    fused_checkpoint: bool = False  # the checkpoint stores qkv_proj and gate_up_proj fused (Phi-3)

    @property
    def all_windowed(self) -> bool:
        return all(w > 0 for w in self.layer_windows)


def _rope_dict(hf: dict, layer_type: str | None = None) -> dict:
    """The rope parameters of ``config.json``, new (``rope_parameters``) or old spelling."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if layer_type is not None and layer_type in rope:  # per layer type (Gemma 3 in transformers 5)
        rope = rope[layer_type]
    rope = dict(rope)
    for key in ("partial_rotary_factor", "original_max_position_embeddings"):
        if key in hf and key not in rope:
            rope[key] = hf[key]
    return rope


def rope_from_hf(hf: dict, head_dim: int, max_model_len: int, layer_type: str | None = None, theta: float | None = None) -> RopeConfig:
    rope = _rope_dict(hf, layer_type)
    theta = theta or rope.get("rope_theta") or hf.get("rope_theta", 10000.0)
    where = "rope_parameters" if "rope_parameters" in hf else "rope_scaling"
    cfg = rope_config(rope, theta, head_dim, hf.get("max_position_embeddings", 2048), where)
    if cfg.kind == "longrope":
        long = max_model_len > cfg.param("original_max_position_embeddings")
        cfg = RopeConfig(cfg.theta, cfg.rotary_dim, cfg.kind, cfg.params, cfg.max_position_embeddings, long)
    return cfg


def check_common(hf: dict, arch: str) -> None:
    """Refuse what no family implements: quantized checkpoints other than FP8 ones (which the
    loader dequantizes, ``fp8_checkpoint``) and unknown activations."""
    fp8_format(hf)  # raises for any other quantization_config
    act = hf.get("hidden_act") or hf.get("hidden_activation") or "silu"
    if act not in ACTIVATIONS:
        raise ConfigError(f"hidden_act={act!r} is not supported for {arch}; supported: {', '.join(ACTIVATIONS)}")


def base_fields(hf: dict, arch: str, max_model_len: int) -> dict:
    """The fields every family reads the same way; a family overrides what differs."""
    check_common(hf, arch)
    unknown = sorted(set(hf.get("layer_types") or ()) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ConfigError(f"layer_types {unknown} are not supported; supported: full_attention, sliding_attention")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    layers = hf["num_hidden_layers"]
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope=rope_from_hf(hf, head_dim, max_model_len),
        layer_windows=(0,) * layers,
        attn_scale=head_dim**-0.5,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        activation=hf.get("hidden_act") or hf.get("hidden_activation") or "silu",
    )


def windows_from_layer_types(hf: dict, default_types: list[str]) -> tuple[int, ...]:
    """Per-layer windows from ``layer_types`` (saved by transformers 5) or the family's default."""
    types = hf.get("layer_types") or default_types
    window = hf.get("sliding_window") or 0
    if len(types) != hf["num_hidden_layers"]:
        raise ConfigError(f"layer_types has {len(types)} entries for {hf['num_hidden_layers']} layers")
    if "sliding_attention" in types and window <= 0:
        raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
    return tuple(window if t == "sliding_attention" else 0 for t in types)


class DecoderForCausalLM(nn.Module):
    # HF checkpoint names folded into the fused projections: (source suffix, target, shard index)
    STACKED = (
        ("q_proj", "qkv_proj", 0),
        ("k_proj", "qkv_proj", 1),
        ("v_proj", "qkv_proj", 2),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    )

    def __init__(self, cfg: DecoderConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        # No random init: the loader fills every weight, and Embedding's normal_ on the meta device
        # imports torch._dynamo (1-4 s of a fresh process, most of a restart's model build).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, w) for w in cfg.layer_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, max_positions)
        self.local_rotary = Rotary(cfg.local_rope, max_positions) if cfg.local_rope is not None else None
        self.packed_head = None  # set by pack_for_cpu
        self.native = None  # set by pack_for_cpu: a decode step in stepserve's CPU kernels (cpu_native)

    def fill_rotary(self) -> None:
        for rotary in (self.rotary, self.local_rotary):
            if rotary is not None:
                rotary.cos_sin = rotary.cos_sin.float()
                rotary.fill()

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, backend: AttentionBackend):
        if self.native is not None and self.native.handles(input_ids, kv_caches, meta):
            return self.native.forward(input_ids, positions, kv_caches, meta)
        x, residual = self.embed_tokens(input_ids), None
        if self.cfg.embed_scale != 1.0:  # rounded to the activation dtype first, as transformers does
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        rope = self.rotary.step(positions, x.dtype)
        local = self.local_rotary.step(positions, x.dtype) if self.local_rotary is not None else rope
        for layer, kv_cache, window in zip(self.layers, kv_caches, self.cfg.layer_windows):
            x, residual = layer(x, residual, local if window else rope, kv_cache, meta, backend)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_head is not None:
            logits = self.packed_head(hidden).float()
        else:
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            logits = F.linear(hidden, weight).float()
        if self.cfg.logits_divisor != 1.0:
            logits = logits / self.cfg.logits_divisor
        if self.cfg.final_softcap:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def pack_for_cpu(self, dtype: torch.dtype, int4: bool) -> None:
        """Prepack every projection and the head for oneDNN; with ``int4``, the projections get
        int4 twins for small batches (``cpu_linear``). With ``int4``, stepserve's CPU kernels
        built (``cpu_native``) and a family they cover, a decode step runs in one native call and
        the head is 8-bit (the GGUF stores it, tied to the embedding, as Q8_0: kept exactly).
        Otherwise the head stays bf16: 4 bits of it visibly change greedy answers, and
        PyTorch's int8 kernel reads it no faster than oneDNN reads bf16 here."""
        from stepserve.models import cpu_native
        from stepserve.models.cpu_linear import CpuLinear, pack_linears

        native = int4 and dtype == torch.bfloat16 and cpu_native.unsupported(self.cfg) is None and cpu_native.library() is not None
        pack_linears(self.layers, dtype, int4, native)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.packed_head = cpu_native.BlockWeight.q8_0(head, torch.float32) if native else CpuLinear(head, None, dtype, int4=False)
        self.lm_head = None
        if native:
            self.native = cpu_native.NativeDecoder(self)

    # -- weights ---------------------------------------------------------------------------

    def _shard_sizes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        kv = c.num_kv_heads * c.head_dim
        return {"qkv_proj": (c.num_heads * c.head_dim, kv, kv), "gate_up_proj": (c.intermediate_size, c.intermediate_size)}

    def load_weights(self, weights) -> set[str]:
        """Copy ``(hf_name, tensor)`` pairs into the parameters; returns the ``name#shard``
        keys filled (shard None: the whole parameter, as a fused checkpoint stores it)."""
        params = dict(self.named_parameters())
        sizes = self._shard_sizes()
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
            dest = params[target].data
            if shard is not None:
                split = sizes[target.split(".")[-2]]
                dest = dest.narrow(0, sum(split[:shard]), split[shard])
            if dest.shape != tensor.shape:
                raise ConfigError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(f"{target}#{shard}")
        return loaded

    def missing_weights(self, loaded: set[str]) -> list[str]:
        """Parameters the checkpoint did not fill (a fused one counts when whole or all shards came)."""
        missing = []
        for name, _ in self.named_parameters():
            shards = [idx for _, dst, idx in self.STACKED if f".{dst}." in name]
            whole = f"{name}#None" in loaded
            if not whole and not (shards and all(f"{name}#{i}" in loaded for i in shards)):
                missing.append(name)
        return missing
