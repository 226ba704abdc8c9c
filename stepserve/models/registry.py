"""Architecture -> the family that configures the shared decoder.

``config.json``'s ``architectures[0]`` (a GGUF's ``general.architecture`` is mapped to the same
names by ``gguf.py``) picks the family; anything not listed is refused at startup with the list.
"""

from __future__ import annotations

from collections.abc import Callable

from stepserve.config import ConfigError
from stepserve.models import gemma, granite, llama, moe_families, phi3, qwen
from stepserve.models.config import DecoderConfig

FAMILIES: dict[str, Callable[[dict, str, int], DecoderConfig]] = {
    "LlamaForCausalLM": llama.llama,
    "MistralForCausalLM": llama.mistral,
    "Qwen2ForCausalLM": qwen.qwen2,
    "Qwen3ForCausalLM": qwen.qwen3,
    "Gemma2ForCausalLM": gemma.gemma2,
    "Gemma3ForCausalLM": gemma.gemma3,
    "Phi3ForCausalLM": phi3.phi3,
    "GraniteForCausalLM": granite.granite,
    "Qwen3MoeForCausalLM": moe_families.qwen3_moe,
    "Qwen2MoeForCausalLM": moe_families.qwen2_moe,
    "MixtralForCausalLM": moe_families.mixtral,
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def architecture(hf: dict) -> str:
    archs = hf.get("architectures") or ["LlamaForCausalLM"]  # old Llama configs name none
    arch = archs[0]
    if arch not in FAMILIES:
        raise ConfigError(f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def decoder_config(hf: dict, max_model_len: int) -> DecoderConfig:
    """The model's maths from its config.json; refuses what is not implemented, naming it."""
    arch = architecture(hf)
    return FAMILIES[arch](hf, arch, max_model_len)
