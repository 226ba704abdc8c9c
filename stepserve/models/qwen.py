"""Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm, no bias); both window the layers from
``max_window_layers`` on when ``use_sliding_window`` is set."""

from __future__ import annotations

from stepserve.models.config import DecoderConfig, base_fields, windows_from_layer_types


def _windows(hf: dict) -> tuple[int, ...]:
    layers = hf["num_hidden_layers"]
    if not hf.get("use_sliding_window", False):  # transformers drops the window then
        return (0,) * layers
    first = hf.get("max_window_layers", layers)
    return windows_from_layer_types(
        hf, ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    )


def qwen2(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    fields = base_fields(hf, arch, max_model_len)
    fields.update(qkv_bias=True, o_bias=False, layer_windows=_windows(hf))
    return DecoderConfig(**fields)


def qwen3(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    fields = base_fields(hf, arch, max_model_len)
    fields.update(qk_norm=True, layer_windows=_windows(hf))
    return DecoderConfig(**fields)
