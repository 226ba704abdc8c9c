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


def save_byte_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i, special in enumerate(SPECIALS):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>", additional_special_tokens=SPECIALS[1:]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


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
