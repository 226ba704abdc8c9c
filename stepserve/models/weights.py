"""Weight readers. Both yield ``(hf_name, tensor)`` pairs with Hugging Face names, for one loader."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from stepserve.config import ConfigError
from stepserve.models.load_progress import LoadProgress

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def safetensors_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors checkpoint, single file or sharded with an index."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no .safetensors files in {model_dir}")
    progress = LoadProgress(len(files), None if weight_map is None else len(weight_map))
    for i, name in enumerate(files):
        with safe_open(model_dir / name, framework="pt") as f:
            keys = list(f.keys())
            yield from progress.shard(i, name, len(keys), ((key, f.get_tensor(key)) for key in keys))


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(path: Path) -> dict:
    """A config.json-shaped dict read from GGUF metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported; use one of {', '.join(_GGUF_ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    config = {
        "architectures": [_GGUF_ARCHITECTURES[arch]],
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _field(reader, f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    linear_types = collections.Counter(t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    if linear_types:
        config["gguf_linear_type"] = linear_types.most_common(1)[0][0]  # what quantization=auto reads
    if "rope_freqs.weight" in tensors:
        raise ConfigError("GGUF files with rope_freqs (Llama 3.1 rope scaling) are not supported; use the safetensors checkpoint")
    return config


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer_part = _GGUF_LAYER_NAMES.get(parts[2])
        return layer_part and f"model.layers.{parts[1]}.{layer_part}.{parts[-1]}"
    top = _GGUF_TOP_NAMES.get(parts[0])
    return top and f"{top}.{parts[-1]}"


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its rotary pairs adjacent dims, HF's halves)."""
    rows = weight.shape[0]
    w = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def gguf_weights(path: Path, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a GGUF file, dequantized to float32 with the ``gguf`` package."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    progress = LoadProgress(1, len(reader.tensors))
    yield from progress.shard(0, path.name, len(reader.tensors), _gguf_tensors(reader, path, config))


def _gguf_tensors(reader, path: Path, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    is_llama = config["architectures"][0] != "Qwen2ForCausalLM"
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise ConfigError(f"unexpected tensor {tensor.name!r} in {path.name}")
        data = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed([int(d) for d in tensor.shape])))
        if is_llama and name.endswith("q_proj.weight"):
            data = _unpermute(data, config["num_attention_heads"])
        elif is_llama and name.endswith("k_proj.weight"):
            data = _unpermute(data, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy of the mmap
