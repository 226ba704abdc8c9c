"""A tiny Llama whose weights are set by hand so that it thinks before it answers, as Qwen3 does:
``<think>ok</think>Hi`` and end-of-text.

The byte-level test tokenizer gets ``<think>`` and ``</think>`` as tokens (not special, as in
Qwen3's and DeepSeek-R1's tokenizers). Every weight is zero except the embeddings, the norms and
the head, so the model is a bigram table: the last token alone picks the next. Each token of the
script ``\\n <think> o k </think> H i`` has its own embedding axis, and the head row of its
successor reads that axis; every other token embeds to zero (all logits equal). The chat
template ends the prompt with ``assistant\\n``, so the model opens its thinking itself; with
``enable_thinking: false`` it writes an empty thinking block (``<think></think>``) after it, and
the model answers ``Hi`` at once. ``opens_in_prompt`` makes the template open the thinking
(``assistant\\n<think>``) as DeepSeek-R1's does.
"""

from __future__ import annotations

from pathlib import Path

from tiny_models import EOS_ID, save_byte_tokenizer, zeroed_llama

START, END = "<think>", "</think>"
MESSAGES = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _template(opens_in_prompt: bool) -> str:
    opening = START if opens_in_prompt else ""
    return (
        MESSAGES + "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}"
        + START
        + END
        + "{% else %}"
        + opening
        + "{% endif %}"
        "{% endif %}"
    )


def write_thinking_model(directory: Path, opens_in_prompt: bool = False) -> Path:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = save_byte_tokenizer(directory, (START, END), _template(opens_in_prompt))
    model = zeroed_llama()
    ids = tokenizer.convert_tokens_to_ids
    script = [ids(t) for t in ["Ċ", START, "o", "k", END, "H", "i"]] + [EOS_ID]  # Ċ: the byte-level newline
    assert len(set(script)) == len(script)
    with torch.no_grad():
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        for axis, (token, successor) in enumerate(zip(script, script[1:])):
            embed[token, axis] = 1.0
            head[successor, axis] = 10.0
    model.save_pretrained(directory)
    return directory
