"""The dense decoder every family configures: its config, the model, and the weight loading.

A family file (``llama.py``, ``qwen.py``, ``gemma.py``, ``phi3.py``, ``granite.py``) turns a
``config.json`` into a ``DecoderConfig``: what differs is data, not code.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from stepserve.attention.base import AttentionBackend, AttentionMetadata
from stepserve.config import ConfigError
from stepserve.models.layers import DecoderLayer, RMSNorm
from stepserve.models.config import DecoderConfig
from stepserve.models.rope import Rotary


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
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
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
        from stepserve.kernels.cpu import native as cpu_native
        from stepserve.models.cpu_linear import CpuLinear, pack_linears

        native = (
            int4
            and dtype == torch.bfloat16
            and cpu_native.unsupported(self.cfg) is None
            and cpu_native.library() is not None
        )
        pack_linears(self.layers, dtype, int4, native)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.packed_head = (
            cpu_native.BlockWeight.q8_0(head, torch.float32) if native else CpuLinear(head, None, dtype, int4=False)
        )
        self.lm_head = None
        if native:
            self.native = cpu_native.NativeDecoder(self)

    # -- weights ---------------------------------------------------------------------------

    def _shard_sizes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        kv = c.num_kv_heads * c.head_dim
        return {
            "qkv_proj": (c.num_heads * c.head_dim, kv, kv),
            "gate_up_proj": (c.intermediate_size, c.intermediate_size),
        }

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
