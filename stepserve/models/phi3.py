"""Phi-3 / Phi-4 (``Phi3ForCausalLM``): q/k/v and gate/up stored fused in the checkpoint,
``longrope`` scaling with short and long factors, partial rotary, optional sliding window."""

from __future__ import annotations

from stepserve.models.config import DecoderConfig, base_fields


def phi3(hf: dict, arch: str, max_model_len: int) -> DecoderConfig:
    fields = base_fields(hf, arch, max_model_len)
    fields.update(
        qkv_bias=False,
        o_bias=False,
        fused_checkpoint=True,
        layer_windows=(hf.get("sliding_window") or 0,) * fields["num_layers"],
    )
    return DecoderConfig(**fields)
