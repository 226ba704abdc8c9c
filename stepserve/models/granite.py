"""Granite (``GraniteForCausalLM``): Llama with multipliers on the embeddings, the residual
branches and the attention scores, and logits divided by ``logits_scaling``."""

from __future__ import annotations

from stepserve.models.config import DecoderConfig, base_fields


def granite(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    fields = base_fields(hf, arch, max_model_len)
    fields.update(
        embed_scale=float(hf.get("embedding_multiplier", 1.0)),
        residual_scale=float(hf.get("residual_multiplier", 1.0)),
        attn_scale=float(hf.get("attention_multiplier", 1.0)),
        logits_divisor=float(hf.get("logits_scaling", 1.0)),
    )
    return DecoderConfig(**fields)
