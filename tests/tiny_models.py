"""Tiny random-weight models the tests write themselves (no hub): a byte-level tokenizer plus a
config.json and safetensors saved by transformers."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 256  # <|endoftext|>
VOCAB = 320  # the model's vocab (a little larger than the tokenizer's, as in real models)


def save_byte_tokenizer(directory: Path, added: tuple[str, ...] = (), chat_template: str = CHAT_TEMPLATE):
    """The byte-level test tokenizer: 256 byte tokens, SPECIALS, then ``added`` (ordinary added
    tokens, as a model's ``<think>``), saved with ``chat_template``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i, special in enumerate(SPECIALS):
        vocab[special] = 256 + i
    for i, token in enumerate(added):
        vocab[token] = 256 + len(SPECIALS) + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|im_start|>",
        additional_special_tokens=SPECIALS[1:],
    )
    if added:
        fast.add_tokens(list(added))
    fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return fast


def zeroed_llama():
    """A tiny Llama whose every weight is zero but its norms (ones): the start of a model whose
    weights a test sets by hand (scripted_model.py, thinking_model.py)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        eos_token_id=EOS_ID,
        bos_token_id=257,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
    return model


def write_tiny_model(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random model shaped like a small Llama (GQA), Qwen2 (qkv bias) or with tied embeddings."""
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        eos_token_id=EOS_ID,
        bos_token_id=257,
        initializer_range=0.2,  # peaked logits: greedy ties between implementations are unlikely
        tie_word_embeddings=False,
    )
    common.update(overrides)
    torch.manual_seed(seed)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    save_byte_tokenizer(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID], "bos_token_id": 257}))
    return directory


WINDOW = 8  # sliding window of the windowed tiny models: shorter than most test prompts

# family -> (transformers config class, model class, config overrides beyond the common ones)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen2-window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=3.0,
            num_hidden_layers=3,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            num_hidden_layers=3,
            tie_word_embeddings=True,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
    ),
    # Gemma 3's real head size (256): the Triton kernels' widest tiles
    "gemma3-hd256": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=WINDOW,
            num_hidden_layers=3,
            tie_word_embeddings=True,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    # mixtures of experts: 8 experts, top-2 (renormalised) and top-8 (not), a dense layer among
    # sparse ones (mlp_only_layers), Qwen2-MoE's shared expert, Mixtral
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    ),
    "qwen3-moe-top8": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            head_dim=16,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=8,
            norm_topk_prob=False,
            num_hidden_layers=3,
            mlp_only_layers=[1],
        ),
    ),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            max_position_embeddings=512,
            original_max_position_embeddings=128,
            pad_token_id=0,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5, 2.0, 3.0],
                "long_factor": [2.0, 4.0, 6.0, 9.0],
                "original_max_position_embeddings": 128,
            },
        ),
    ),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(
            embedding_multiplier=4.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=2.0,
        ),
    ),
}


def write_tiny_family(directory: Path, family: str, seed: int = 0) -> Path:
    """A random model of one family from its transformers config class, with random norm weights
    (so that a missing ``1 + w`` or a skipped norm shows)."""
    import torch
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    directory.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        eos_token_id=EOS_ID,
        bos_token_id=257,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    common.update(extra)
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**common)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(directory)
    save_byte_tokenizer(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID], "bos_token_id": 257}))
    return directory


def write_eagle3_head(
    directory: Path,
    target: Path,
    seed: int = 0,
    aux_layers: tuple[int, ...] = (0, 1, 2),
    layout: str = "eagle",
    draft_vocab: int | None = None,
    **flags,
) -> Path:
    """A random EAGLE-3 head for the Llama-shaped ``target``, as the EAGLE authors save one
    (``layout="eagle"``: ``LlamaForCausalLMEagle3``, ``midlayer.``) or as ``speculators`` does
    (``layout="speculators"``: ``transformer_layer_config``, ``layers.0.``, with
    ``norm_before_residual``). ``draft_vocab``: a smaller proposal vocabulary (a random subset
    of the target's, mapped by ``d2t``). ``flags`` go into the config (``norm_before_fc``, ...)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    t = json.loads((target / "config.json").read_text())
    hidden, heads, kv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    head_dim, inner, vocab = hidden // heads, t["intermediate_size"], t["vocab_size"]
    dv = draft_vocab or vocab
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    def norm(size):
        return 1.0 + rnd(size, scale=0.1)

    n = len(aux_layers)
    layer = {
        "input_layernorm.weight": norm(hidden),
        "hidden_norm.weight": norm(hidden),
        "self_attn.q_proj.weight": rnd(heads * head_dim, 2 * hidden),
        "self_attn.k_proj.weight": rnd(kv * head_dim, 2 * hidden),
        "self_attn.v_proj.weight": rnd(kv * head_dim, 2 * hidden),
        "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
        "post_attention_layernorm.weight": norm(hidden),
        "mlp.gate_proj.weight": rnd(inner, hidden),
        "mlp.up_proj.weight": rnd(inner, hidden),
        "mlp.down_proj.weight": rnd(hidden, inner),
    }
    prefix = "midlayer." if layout == "eagle" else "layers.0."
    tensors = {prefix + k: v for k, v in layer.items()}
    tensors |= {"fc.weight": rnd(hidden, n * hidden), "norm.weight": norm(hidden), "lm_head.weight": rnd(dv, hidden)}
    if flags.get("norm_before_fc"):
        tensors["input_norm.weight"] = norm(n * hidden)
    if flags.get("fc_norm"):
        tensors |= {f"fc_norm.{i}.weight": norm(hidden) for i in range(n)}
    if dv != vocab:
        ids = torch.randperm(vocab, generator=gen)[:dv].sort().values
        tensors["d2t"] = ids - torch.arange(dv)
        tensors["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    layer_config = {k: t[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")}
    layer_config |= {
        "vocab_size": vocab,
        "num_hidden_layers": 1,
        "rms_norm_eps": t["rms_norm_eps"],
        "rope_theta": t.get("rope_theta", 10000.0),
        "max_position_embeddings": t["max_position_embeddings"],
        "hidden_act": "silu",
        "model_type": "llama",
    }
    if layout == "eagle":
        config = {
            **layer_config,
            "architectures": ["LlamaForCausalLMEagle3"],
            "draft_vocab_size": dv,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux_layers)},
            **flags,
        }
    else:
        config = {
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": "eagle3",
            "transformer_layer_config": layer_config,
            "draft_vocab_size": dv,
            "target_hidden_size": hidden,
            "eagle_aux_hidden_state_layer_ids": list(aux_layers),
            "norm_before_residual": True,
            "speculators_config": {  # what vLLM recognises a speculator by
                "algorithm": "eagle3",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                "default_proposal_method": "greedy",
                "verifier": {"name_or_path": str(target), "architectures": t.get("architectures")},
            },
            **flags,
        }
    (directory / "config.json").write_text(json.dumps(config))
    return directory
