"""A tiny Llama whose weights are set by hand, so that a real server really writes a chosen reply.

The byte-level test tokenizer gets one more token, ``SCRIPT`` (the text
``<script>alert(1)</script>``). Every weight is zero except:

- embeddings: every token is ``e0``, the marker byte ``!`` is ``e0 + e2``, ``SCRIPT`` is ``1000 e1``;
- layer 0 attention: q and k are zero, so each position attends uniformly to the ones before it;
  v reads dimension 2 and o writes it, times 1000, into dimension 3: after any prompt holding a
  ``!``, dimension 3 of the last position outweighs dimension 0;
- the head: letters and space score on ``e0``; ``SCRIPT`` on ``e3 - e0``; end-of-text on ``e1``.

So a prompt with ``!`` is answered ``<script>alert(1)</script>`` and then ends; any other
prompt gets letters and spaces until max_tokens (the model never scores end-of-text there).
"""

from __future__ import annotations

from pathlib import Path

from tiny_models import EOS_ID, save_byte_tokenizer, zeroed_llama

SCRIPT = "<script>alert(1)</script>"


def write_scripted_model(directory: Path, max_shard_size: str = "5GB") -> Path:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = save_byte_tokenizer(directory, (SCRIPT,))
    model = zeroed_llama()
    ids = tokenizer.convert_tokens_to_ids
    script, marker = ids(SCRIPT), ids("!")
    letters = [ids(c) for c in "abcdefghijklmnopqrstuvwxyz"] + [ids("Ġ")]  # Ġ: the byte-level space
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 1.0
        embed[marker, 2] = 1.0
        embed[script] = 0.0
        embed[script, 1] = 1000.0
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight[0, 2] = 1.0  # kv head 0, dim 0 <- residual dim 2 (query heads 0 and 1 read it)
        attn.o_proj.weight[3, 0] = 1000.0  # residual dim 3 <- query head 0, dim 0
        head = model.lm_head.weight
        head[letters, 0] = 1.0
        head[script, 3], head[script, 0] = 10.0, -10.0
        head[EOS_ID, 1], head[EOS_ID, 0] = 10.0, -10.0
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory
