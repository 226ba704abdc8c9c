"""Write a tiny safetensors model (tiny_models.py) as a float32 GGUF file with the ``gguf``
package's writer, laid out as llama.cpp's converter lays it out: its tensor names, q/k rows
permuted for Llama-style families, Gemma's norms stored as 1 + w, Phi-3's fused projections and
longrope factors, and the byte-level tokenizer as a ``gpt2`` vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
EXPERT_PARTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
EXPERT_PARTS |= {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
GEMMA_LAYER = LAYER | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
ARCH = {  # config.json architecture -> (GGUF architecture, permuted q/k)
    "LlamaForCausalLM": ("llama", True),
    "Qwen3ForCausalLM": ("qwen3", False),
    "Gemma2ForCausalLM": ("gemma2", False),
    "Gemma3ForCausalLM": ("gemma3", False),
    "Phi3ForCausalLM": ("phi3", False),
    "Qwen3MoeForCausalLM": ("qwen3moe", False),
    "Qwen2MoeForCausalLM": ("qwen2moe", False),
    "MixtralForCausalLM": ("llama", True),
    "GraniteForCausalLM": ("granite", True),
}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(name: str, gemma: bool) -> str:
    name = name.removeprefix("model.")
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{(GEMMA_LAYER if gemma else LAYER)[module]}.{kind}"
    module, kind = name.rsplit(".", 1)
    return f"{ {'embed_tokens': 'token_embd', 'norm': 'output_norm', 'lm_head': 'output'}[module] }.{kind}"


def write_gguf(model_dir: Path, path: Path, extra_metadata=None, tokenizer_model: str = "gpt2") -> Path:
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    arch, permuted = ARCH[config["architectures"][0]]
    gemma = arch.startswith("gemma")
    heads, kv_heads, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    rope = config.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config.get("intermediate_size") or 0)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    theta = rope.get("full_attention", rope).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if gemma:
        writer.add_sliding_window(config["sliding_window"])
        if config.get("attn_logit_softcapping"):
            writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if arch == "gemma3":
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])
        writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        if rope["full_attention"].get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["full_attention"]["factor"])
    if arch == "granite":
        writer.add_embedding_scale(config["embedding_multiplier"])
        writer.add_residual_scale(config["residual_multiplier"])
        writer.add_attention_scale(config["attention_multiplier"])
        writer.add_logit_scale(config["logits_scaling"])
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    experts = config.get("num_experts") or config.get("num_local_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if config.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if config.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
        if "norm_topk_prob" in config:
            writer.add_expert_weights_norm(config["norm_topk_prob"])
    for key, value in (extra_metadata or {}).items():
        getattr(writer, f"add_{key}")(value)
    _add_tokenizer(writer, AutoTokenizer.from_pretrained(model_dir), config, tokenizer_model)
    tensors = load_file(model_dir / "model.safetensors")
    if arch == "phi3":
        tensors = _fuse_phi3(tensors)
    tensors = _stack_experts(tensors)
    for name, data in tensors.items():
        if ".ffn_" in name and name.endswith("_exps.weight"):  # already a GGUF name
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
            continue
        if name.endswith("shared_expert_gate.weight"):
            data = data.reshape(-1)
        if permuted and name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif permuted and name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        elif gemma and name.endswith("norm.weight"):
            data = data + 1.0
        writer.add_tensor(_gguf_name(name, gemma), np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _stack_experts(tensors: dict) -> dict:
    """Per-expert matrices stacked into one [experts, rows, cols] tensor each, as llama.cpp's
    converter writes them (ffn_gate_exps, ffn_up_exps, ffn_down_exps)."""
    import re

    pattern = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
    stacks: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for name, data in tensors.items():
        match = pattern.match(name)
        if match:
            stacks.setdefault(f"blk.{match[1]}.{EXPERT_PARTS[match[3]]}.weight", {})[int(match[2])] = data
        else:
            out[name] = data
    for name, per_expert in stacks.items():
        out[name] = np.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def _fuse_phi3(tensors: dict) -> dict:
    """Phi-3 checkpoints already store qkv_proj and gate_up_proj fused; nothing to do."""
    return tensors


def _add_tokenizer(writer, tokenizer, config: dict, model: str) -> None:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
