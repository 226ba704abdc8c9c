"""Llama 2/3 (and SmolLM2) and Mistral: the plain pre-norm decoder; Mistral's ``sliding_window``
windows every layer."""

from __future__ import annotations

from stepserve.models.config import DecoderConfig, base_fields


def llama(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    return DecoderConfig(**base_fields(hf, arch, max_model_len))


def mistral(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    fields = base_fields(hf, arch, max_model_len)
    fields["qkv_bias"] = fields["o_bias"] = False
    fields["layer_windows"] = (hf.get("sliding_window") or 0,) * fields["num_layers"]
    return DecoderConfig(**fields)
