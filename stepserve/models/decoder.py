"""The dense decoder every family configures: its config, the model, and the weight loading.

A family file (``llama.py``, ``qwen.py``, ``gemma.py``, ``phi3.py``, ``granite.py``) turns a
``config.json`` into a ``DecoderConfig``: what differs is data, not code.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.attention.base import AttentionBackend, AttentionMetadata
from stepserve.config import ConfigError
from stepserve.models.layers import DecoderLayer, RMSNorm
from stepserve.models.moe import SparseMoE
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
        sparse = cfg.moe.sparse_layers if cfg.moe is not None else (False,) * cfg.num_layers
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, w, SparseMoE(cfg) if s else None) for w, s in zip(cfg.layer_windows, sparse)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, max_positions)
        self.local_rotary = Rotary(cfg.local_rope, max_positions) if cfg.local_rope is not None else None
        self.packed_head = None  # set by pack_for_cpu
        self.native = None  # set by pack_for_cpu: a decode step in stepserve's CPU kernels (cpu_native)
        self.aux_layers: dict[int, int] = {}  # set by keep_aux_states: layer id -> its column block
        self.aux_states: torch.Tensor | None = None  # [rows, n * hidden]: the kept streams of the last pass

    def keep_aux_states(self, layer_ids: tuple[int, ...], rows: int) -> None:
        """Keep, at every forward, the residual stream entering each of ``layer_ids`` (0: the
        embeddings) in ``aux_states``, side by side, for an EAGLE-3 head. The buffer is fixed
        (a CUDA graph's replays write where its capture did); a pass may have ``rows`` tokens.
        Stepserve's native CPU decode step keeps nothing: it is turned off."""
        self.aux_layers = {layer: i for i, layer in enumerate(layer_ids)}
        weight = self.embed_tokens.weight
        self.aux_states = torch.zeros(
            rows, len(layer_ids) * self.cfg.hidden_size, dtype=weight.dtype, device=weight.device
        )
        self.native = None

    def _keep(self, layer: int, stream: torch.Tensor) -> None:
        column = self.aux_layers.get(layer)
        if column is not None:
            h = self.cfg.hidden_size
            if stream.shape[0] > self.aux_states.shape[0]:
                raise RuntimeError(
                    f"a pass of {stream.shape[0]} tokens; the kept states hold {self.aux_states.shape[0]}"
                )
            self.aux_states[: stream.shape[0], column * h : (column + 1) * h].copy_(stream)

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
        if not self.aux_layers:
            for layer, kv_cache, window in zip(self.layers, kv_caches, self.cfg.layer_windows):
                x, residual = layer(x, residual, local if window else rope, kv_cache, meta, backend)
            return self.norm(x, residual)[0]
        self._keep(0, x)
        for i, (layer, kv_cache, window) in enumerate(zip(self.layers, kv_caches, self.cfg.layer_windows)):
            x, residual = layer(x, residual, local if window else rope, kv_cache, meta, backend)
            self._keep(i + 1, x + residual)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [rows, vocab]; into ``out`` when given (the CUDA graphs' one buffer)."""
        if self.packed_head is not None:
            logits = self.packed_head(hidden)
        else:
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            logits = F.linear(hidden, weight)
        logits = logits.float() if out is None else out.copy_(logits)
        if self.cfg.logits_divisor != 1.0:
            logits = logits.div_(self.cfg.logits_divisor)
        if self.cfg.final_softcap:
            logits = logits.div_(self.cfg.final_softcap).tanh_().mul_(self.cfg.final_softcap)
        return logits

    def pack_for_cpu(self, dtype: torch.dtype, int4: bool) -> None:
        """Prepack every projection and the head for oneDNN; with ``int4``, the projections get
        int4 twins for small batches (``cpu_linear``). With ``int4``, stepserve's CPU kernels
        built (``cpu_native``) and a family they cover, a decode step runs in one native call, in
        bfloat16 and in float32 alike (the native step computes in float32 on 8-bit activations
        either way; float32 is what ``auto`` runs on a CPU without native bfloat16).

        The head: with the native kernels it is 8-bit (the GGUF stores it, tied to the embedding,
        as Q8_0: kept exactly). In bfloat16 its activations are quantized to 8 bits too; in
        float32 they are not (``float_inputs``): on the embedded model 8-bit activations in the
        head turned the first token of "What is the capital of France?" from "The" (float32's
        choice by 0.08 nats) to "L", and float32 is the precise path. Without the native kernels
        the head stays in ``dtype``: 4 bits of it visibly change greedy answers, and PyTorch's
        int8 kernel reads it no faster than oneDNN reads bf16 here."""
        from stepserve.kernels.cpu import native as cpu_native
        from stepserve.models.cpu_linear import CpuLinear, pack_linears

        native = (
            int4
            and dtype in (torch.bfloat16, torch.float32)
            and cpu_native.unsupported(self.cfg) is None
            and cpu_native.library() is not None
        )
        pack_linears(self.layers, dtype, int4, native)
        for layer in self.layers:  # a mixture's stacked experts run in PyTorch, in the packed dtype
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.w13.data, layer.mlp.w2.data = layer.mlp.w13.data.to(dtype), layer.mlp.w2.data.to(dtype)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        exact = dtype == torch.float32
        self.packed_head = (
            cpu_native.BlockWeight.q8_0(head, torch.float32, float_inputs=exact)
            if native
            else CpuLinear(head, None, dtype, int4=False)
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
        keys filled (shard None: the whole parameter, as a fused checkpoint stores it; an
        expert's slice of the stacked MoE weights is ``w13#expert.part`` or ``w2#expert``)."""
        params = dict(self.named_parameters())
        sizes = self._shard_sizes()
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            target, shard = _expert_target(name)
            if target is None:
                target, shard = name, None
                for src, dst, idx in self.STACKED:
                    if f".{src}." in name:
                        target, shard = name.replace(f".{src}.", f".{dst}."), idx
                        break
            if target == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            if target not in params:
                raise ConfigError(f"unexpected weight {name!r} in the checkpoint")
            dest = _shard_of(params[target].data, target, shard, sizes)
            if dest.shape != tensor.shape:
                raise ConfigError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(f"{target}#{shard}")
        return loaded

    def missing_weights(self, loaded: set[str]) -> list[str]:
        """Parameters the checkpoint did not fill (a fused one counts when whole or all shards came)."""
        missing = []
        for name, param in self.named_parameters():
            if name.endswith((".mlp.w13", ".mlp.w2")):
                parts = (0, 1) if name.endswith("w13") else (None,)
                shards = [f"{e}.{p}" if p is not None else str(e) for e in range(param.shape[0]) for p in parts]
            else:
                shards = [idx for _, dst, idx in self.STACKED if f".{dst}." in name]
            whole = f"{name}#None" in loaded
            if not whole and not (shards and all(f"{name}#{i}" in loaded for i in shards)):
                missing.append(name)
        return missing


# A checkpoint's per-expert matrices -> the stacked MoE parameters: (source, part of w13 or None for w2).
_EXPERT_PARTS = {"gate_proj": 0, "up_proj": 1, "down_proj": None, "w1": 0, "w3": 1, "w2": None}
_EXPERT_NAME = re.compile(r"^(layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")  # transformers 5's layout


def _expert_target(name: str) -> tuple[str | None, str | None]:
    """(parameter, shard) of an expert weight or a router (Mixtral's renamed); (None, None) otherwise."""
    name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
    match = _EXPERT_NAME.match(name)
    if match and match[3] in _EXPERT_PARTS:
        part = _EXPERT_PARTS[match[3]]
        if part is None:
            return f"{match[1]}.mlp.w2", match[2]
        return f"{match[1]}.mlp.w13", f"{match[2]}.{part}"
    match = _FUSED_EXPERTS.match(name)
    if match:
        return f"{match[1]}.mlp.{'w13' if match[2] == 'gate_up_proj' else 'w2'}", None
    return (name, None) if name.endswith(".mlp.gate.weight") else (None, None)  # a router


def _shard_of(dest: torch.Tensor, target: str, shard, sizes: dict) -> torch.Tensor:
    """The slice of ``dest`` a checkpoint tensor fills."""
    if shard is None:
        return dest
    if target.endswith(".mlp.w13"):
        expert, part = (int(x) for x in shard.split("."))
        inner = dest.shape[1] // 2
        return dest[expert].narrow(0, part * inner, inner)
    if target.endswith(".mlp.w2"):
        return dest[int(shard)]
    if target.endswith("gate_up_proj.weight") or target.endswith("gate_up_proj.bias"):
        inner = dest.shape[0] // 2  # the dense MLP's or a shared expert's own width
        return dest.narrow(0, shard * inner, inner)
    split = sizes[target.split(".")[-2]]
    return dest.narrow(0, sum(split[:shard]), split[shard])
