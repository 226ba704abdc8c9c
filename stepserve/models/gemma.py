"""Gemma 2 and Gemma 3 (text): ``(1 + w)`` RMSNorm, a norm after attention and after the MLP
too, GELU-tanh MLP, embeddings times sqrt(hidden), ``query_pre_attn_scalar``, interleaved
sliding-window and global layers. Gemma 2 soft-caps attention scores and logits; Gemma 3 norms
q and k per head and gives its windowed layers their own rotary base."""

from __future__ import annotations

from stepserve.config import ConfigError
from stepserve.models.config import DecoderConfig, base_fields, rope_from_hf, windows_from_layer_types


def _common(hf: dict, arch: str, max_model_len: int, default_types: list[str]) -> dict:
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=true (an embedding Gemma) is not supported for generation")
    fields = base_fields(hf, arch, max_model_len)
    fields.update(
        activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        norm_offset=True,
        sandwich_norms=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        embed_scale=hf["hidden_size"] ** 0.5,
        attn_scale=float(hf.get("query_pre_attn_scalar") or fields["head_dim"]) ** -0.5,
        attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        layer_windows=windows_from_layer_types(hf, default_types),
    )
    return fields


def gemma2(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    n = hf["num_hidden_layers"]
    types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    return DecoderConfig(**_common(hf, arch, max_model_len, types))


def gemma3(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    n, pattern = hf["num_hidden_layers"], hf.get("sliding_window_pattern", 6)
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    fields = _common(hf, arch, max_model_len, types)
    head_dim = fields["head_dim"]
    global_theta = _theta(hf, "full_attention", "rope_theta", 1_000_000.0)
    local_theta = _theta(hf, "sliding_attention", "rope_local_base_freq", 10_000.0)
    fields.update(
        qk_norm=True,
        rope=rope_from_hf(hf, head_dim, max_model_len, "full_attention", global_theta),
        local_rope=rope_from_hf(_local_only(hf), head_dim, max_model_len, "sliding_attention", local_theta),
    )
    return DecoderConfig(**fields)


def _theta(hf: dict, layer_type: str, old_key: str, default: float) -> float:
    per_type = (hf.get("rope_parameters") or {}).get(layer_type) or {}
    return float(per_type.get("rope_theta") or hf.get(old_key) or default)


def _local_only(hf: dict) -> dict:
    """The config as the windowed layers see it: the old-style ``rope_scaling`` is global-only."""
    if "rope_parameters" in hf:
        return hf
    return {k: v for k, v in hf.items() if k != "rope_scaling"}
