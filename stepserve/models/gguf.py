"""The GGUF reader: metadata as a config.json-shaped dict, tensors as ``(hf_name, tensor)`` pairs
(dequantized to float32 with the ``gguf`` package), the stream ``weights.py`` yields too.

Per architecture it knows llama.cpp's tensor names, which families' q/k rows llama.cpp permuted
(Llama-style converters pair rotary dims, transformers halves them), and which stored their norm
weights plus one (Gemma). Metadata that changes the maths and is not mapped is refused.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stepserve.config import ConfigError

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's sandwich: llama.cpp's ffn_norm is the norm before the MLP.
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# A mixture of experts: the router, the experts stacked in one tensor each (split per expert as a
# transformers checkpoint names them), Qwen2-MoE's shared expert and its gate.
_MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_STACKED_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


@dataclass(frozen=True)
class _Arch:
    hf_name: str  # config.json architecture
    model_type: str  # config.json model_type (what AutoTokenizer reads in the converted folder)
    permuted_qk: bool  # llama.cpp permuted q/k rows (Llama-style converters)
    norm_plus_one: bool = False  # norm weights stored as 1 + w (Gemma)
    layer_names: dict | None = None  # tensor names, when not the Llama ones


ARCHITECTURES = {
    "llama": _Arch("LlamaForCausalLM", "llama", True),
    "mistral": _Arch("MistralForCausalLM", "mistral", True),
    "qwen2": _Arch("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": _Arch("Qwen3ForCausalLM", "qwen3", False),
    "gemma2": _Arch("Gemma2ForCausalLM", "gemma2", False, True, _GEMMA_LAYER_NAMES),
    "gemma3": _Arch("Gemma3ForCausalLM", "gemma3_text", False, True, _GEMMA_LAYER_NAMES),
    "qwen2moe": _Arch("Qwen2MoeForCausalLM", "qwen2_moe", False),
    "qwen3moe": _Arch("Qwen3MoeForCausalLM", "qwen3_moe", False),
    "phi3": _Arch("Phi3ForCausalLM", "phi3", False),
    "granite": _Arch("GraniteForCausalLM", "granite", True),
}


class GgufFile:
    """One GGUF file, parsed once: ``config()`` then ``weights()``."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        self.reader = GGUFReader(path)
        name = self._field("general.architecture")
        if name not in ARCHITECTURES:
            raise ConfigError(f"GGUF architecture {name!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        self.arch_name, self.arch = name, ARCHITECTURES[name]
        self.tensors = {t.name: t for t in self.reader.tensors}
        if name == "llama" and self._meta("expert_count"):  # llama.cpp writes Mixtral as llama with experts
            self.arch = _Arch("MixtralForCausalLM", "mixtral", True)

    def _field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _meta(self, key: str, default=None):
        return self._field(f"{self.arch_name}.{key}", default)

    def config(self) -> dict:
        """A config.json-shaped dict read from the metadata."""
        heads = self._meta("attention.head_count")
        hidden = self._meta("embedding_length")
        head_dim = self._meta("attention.key_length", hidden // heads)
        config = {
            "architectures": [self.arch.hf_name],
            "model_type": self.arch.model_type,
            "vocab_size": int(self.tensors["token_embd.weight"].shape[-1]),
            "hidden_size": hidden,
            "intermediate_size": self._meta("feed_forward_length"),
            "num_hidden_layers": self._meta("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._meta("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": float(self._meta("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._meta("rope.freq_base", 10000.0)),
            "max_position_embeddings": self._meta("context_length", 2048),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
        }
        config.update(self._experts())
        config.update(self._rope(head_dim))
        config.update(self._family_config(config))
        linear_types = collections.Counter(
            t.tensor_type.name for t in self.reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2
        )
        if linear_types:
            config["gguf_linear_type"] = linear_types.most_common(1)[0][0]  # what quantization=auto reads
        return config

    def _experts(self) -> dict:
        """A mixture's shape, as the family's config.json spells it (llama.cpp weighs Qwen3-MoE's
        and Mixtral's top-k renormalised, Qwen2-MoE's not)."""
        experts = self._meta("expert_count")
        if not experts:
            return {}
        if self.arch.hf_name not in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM"):
            raise ConfigError(
                f"GGUF {self.arch_name}.expert_count={experts}: a mixture of experts is not supported here"
            )
        out = {
            "num_experts": experts,
            "num_local_experts": experts,
            "num_experts_per_tok": self._meta("expert_used_count"),
            "norm_topk_prob": bool(self._meta("expert_weights_norm", self.arch.hf_name != "Qwen2MoeForCausalLM")),
        }
        inner = self._meta("expert_feed_forward_length")
        if inner:
            out["moe_intermediate_size"] = inner
        shared = self._meta("expert_shared_feed_forward_length")
        if shared:
            out["shared_expert_intermediate_size"] = shared
        return out

    def _rope(self, head_dim: int) -> dict:
        """rope.dimension_count (partial rotary) and rope.scaling.* as config.json spells them."""
        out = {}
        dims = self._meta("rope.dimension_count", head_dim)
        if dims != head_dim:
            out["partial_rotary_factor"] = dims / head_dim
        kind = self._meta("rope.scaling.type", "none")
        if kind == "linear":
            out["rope_scaling"] = {"rope_type": "linear", "factor": float(self._meta("rope.scaling.factor"))}
        elif kind != "none":  # Phi-3's longrope comes as rope_factors_* tensors, not a type
            raise ConfigError(
                f"GGUF {self.arch_name}.rope.scaling.type={kind!r} is not supported; supported: none, linear"
            )
        if "rope_freqs.weight" in self.tensors:
            raise ConfigError(
                "GGUF tensor rope_freqs (Llama 3.1 rope scaling) is not supported; use the safetensors checkpoint"
            )
        return out

    def _family_config(self, config: dict) -> dict:
        """Metadata beyond the Llama set, per family."""
        if self.arch_name in ("gemma2", "gemma3"):
            return self._gemma_config()
        if self.arch_name == "phi3":
            return self._phi3_config(config)
        if self.arch_name == "granite":
            return {
                "embedding_multiplier": float(self._meta("embedding_scale", 1.0)),
                "residual_multiplier": float(self._meta("residual_scale", 1.0)),
                "attention_multiplier": float(self._meta("attention.scale", 1.0)),
                "logits_scaling": float(self._meta("logit_scale", 1.0)),
            }
        window = self._meta("attention.sliding_window")
        if window:
            raise ConfigError(f"GGUF {self.arch_name}.attention.sliding_window is not supported for {self.arch_name}")
        return {}

    def _gemma_config(self) -> dict:
        out = {
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": self._meta("attention.sliding_window", 4096),
            "attn_logit_softcapping": self._meta("attn_logit_softcapping"),
            "final_logit_softcapping": self._meta("final_logit_softcapping"),
            "query_pre_attn_scalar": self._query_pre_attn_scalar(),
        }
        if self.arch_name == "gemma3":
            out["rope_local_base_freq"] = float(self._meta("rope.freq_base_swa", 10000.0))
            pattern = self._meta("attention.sliding_window_pattern", 6)  # older files: llama.cpp's fixed 6
            if isinstance(pattern, list):  # one flag per layer, true for a windowed one
                out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
            else:
                out["sliding_window_pattern"] = int(pattern)
        return out

    def _query_pre_attn_scalar(self) -> int:
        """Not in the metadata: llama.cpp scales by hidden / heads for the 27B models (46 layers in
        Gemma 2, 62 in Gemma 3; as their config.json says) and by head_dim otherwise."""
        heads, hidden = self._meta("attention.head_count"), self._meta("embedding_length")
        big = self._meta("block_count") == {"gemma2": 46, "gemma3": 62}[self.arch_name]
        return hidden // heads if big else self._meta("attention.key_length", hidden // heads)

    def _phi3_config(self, config: dict) -> dict:
        out = {"sliding_window": self._meta("attention.sliding_window")}
        if "rope_factors_long.weight" in self.tensors:
            original = self._meta("rope.scaling.original_context_length")
            out["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": self._tensor("rope_factors_long.weight").tolist(),
                "short_factor": self._tensor("rope_factors_short.weight").tolist(),
                "original_max_position_embeddings": original,
            }
            attn_factor = self._meta("rope.scaling.attn_factor")
            if attn_factor is not None:
                out["rope_scaling"]["attention_factor"] = float(attn_factor)
        return out

    def _tensor(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors[name]
        return dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))

    def _hf_name(self, gguf_name: str) -> str | None:
        parts = gguf_name.split(".")
        if parts[0] == "blk":
            layer_part = ((self.arch.layer_names or _LAYER_NAMES) | _MOE_NAMES).get(parts[2])
            if self.arch_name == "phi3" and parts[2] == "ffn_up":
                layer_part = "mlp.gate_up_proj"  # llama.cpp keeps Phi-3's fused gate_up as ffn_up
            return layer_part and f"model.layers.{parts[1]}.{layer_part}.{parts[-1]}"
        top = _TOP_NAMES.get(parts[0])
        return top and f"{top}.{parts[-1]}"

    def weights(self, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
        from stepserve.models.load_progress import LoadProgress

        count = len(self.reader.tensors)
        yield from LoadProgress(1, count).shard(0, self.path.name, count, self._weights(config))

    def _weights(self, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
        for tensor in self.reader.tensors:
            if tensor.name.startswith("rope_factors_"):
                continue  # read into the config
            parts = tensor.name.split(".")
            if parts[0] == "blk" and parts[2] in _STACKED_EXPERTS:
                data = self._tensor(tensor.name)  # [experts, rows, cols]
                prefix = f"model.layers.{parts[1]}.mlp.experts"
                for expert in range(data.shape[0]):
                    yield (
                        f"{prefix}.{expert}.{_STACKED_EXPERTS[parts[2]]}.weight",
                        torch.from_numpy(np.array(data[expert], dtype=np.float32)),
                    )
                continue
            name = self._hf_name(tensor.name)
            if name is None:
                raise ConfigError(f"unexpected tensor {tensor.name!r} in {self.path.name}")
            data = self._tensor(tensor.name)
            if self.arch.permuted_qk and name.endswith("q_proj.weight"):
                data = _unpermute(data, config["num_attention_heads"])
            elif self.arch.permuted_qk and name.endswith("k_proj.weight"):
                data = _unpermute(data, config["num_key_value_heads"])
            elif self.arch.norm_plus_one and name.endswith("norm.weight"):
                data = data - 1.0
            elif name.endswith("shared_expert_gate.weight"):
                data = data.reshape(1, -1)  # llama.cpp stores the [1, hidden] gate as a vector
            yield name, torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy of the mmap


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its rotary pairs adjacent dims, HF's halves)."""
    rows = weight.shape[0]
    w = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)
