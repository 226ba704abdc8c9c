"""Mixture-of-experts families: Qwen3-MoE and Qwen2-MoE (sparse layers by ``decoder_sparse_step``
and ``mlp_only_layers``; Qwen2-MoE's shared expert with its sigmoid gate) and Mixtral (every
layer sparse, the top-k weights always renormalised). Attention is their dense relatives'."""

from __future__ import annotations

from dataclasses import replace

from stepserve.config import ConfigError
from stepserve.models.config import DecoderConfig, MoEConfig, base_fields
from stepserve.models.qwen import qwen2, qwen3


def _moe(hf: dict, renormalize: bool, shared: int = 0) -> MoEConfig:
    """Qwen's configs say ``num_experts``, Mixtral's (and transformers 5's for all three)
    ``num_local_experts``."""
    layers = hf["num_hidden_layers"]
    num_experts, top_k = hf.get("num_experts") or hf.get("num_local_experts"), hf.get("num_experts_per_tok")
    if not num_experts or not top_k or not 0 < top_k <= num_experts:
        raise ConfigError(f"num_experts={num_experts} and num_experts_per_tok={top_k} do not make a mixture")
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or ())
    sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
    inner = hf.get("moe_intermediate_size") or hf["intermediate_size"]
    return MoEConfig(num_experts, top_k, inner, renormalize, sparse, shared)


def qwen3_moe(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    cfg = qwen3(hf, arch, max_model_len)
    return replace(cfg, moe=_moe(hf, bool(hf.get("norm_topk_prob", False))))


def qwen2_moe(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    cfg = qwen2(hf, arch, max_model_len)
    shared = hf.get("shared_expert_intermediate_size") or 0
    return replace(cfg, moe=_moe(hf, bool(hf.get("norm_topk_prob", False)), shared))


def mixtral(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    fields = base_fields(hf, arch, max_model_len)
    fields["qkv_bias"] = fields["o_bias"] = False
    fields["layer_windows"] = (hf.get("sliding_window") or 0,) * fields["num_layers"]
    fields["moe"] = _moe(hf, renormalize=True)
    return DecoderConfig(**fields)
