"""Embeddings from decoder models (Qwen3-Embedding and the like) through stepserve's own model
and attention backend: one prefill-only pass over a scratch paged KV cache, then the final
hidden states (after the last norm) pooled per sequence as the sentence-transformers config
says. Kept beside the engine, not in it: no scheduler, no sampling, no KV kept after the pass."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from stepserve.attention import get_backend
from stepserve.attention.base import AttentionMetadata
from stepserve.tasks.messages import EncoderRequest
from stepserve.tasks.spec import TaskSpec

_BLOCK = 16  # tokens per scratch block


class DecoderPooler:
    """Pooled final hidden states of a batch of whole sequences, packed along one token axis."""

    def __init__(self, model, mode: str, device: torch.device) -> None:
        self.model = model
        self.mode = mode
        self.device = device
        self.backend = get_backend("triton" if device.type == "cuda" else "sdpa")
        self.cache_dtype = torch.float32 if device.type == "cpu" else model.embed_tokens.weight.dtype

    @torch.inference_mode()
    def __call__(self, batch: Sequence[EncoderRequest]) -> list[np.ndarray]:
        lens = [len(r.token_ids) for r in batch]
        meta, caches = self._layout(lens)
        ids = torch.tensor([t for r in batch for t in r.token_ids], device=self.device)
        self.backend.prepare(meta)
        hidden = self.model(ids, meta.positions, caches, meta, self.backend).float()
        starts = np.cumsum([0] + lens)
        return [self._pool(hidden[starts[i] : starts[i + 1]]).cpu().numpy() for i in range(len(batch))]

    def _pool(self, rows: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            return rows.mean(0)
        if self.mode == "max":
            return rows.max(0).values
        return rows[0] if self.mode == "cls" else rows[-1]

    def _layout(self, lens: list[int]) -> tuple[AttentionMetadata, list[torch.Tensor]]:
        """Each sequence gets its own run of scratch blocks (block 0 is the null block)."""
        blocks = [-(-n // _BLOCK) for n in lens]
        width = max(blocks)
        first = np.cumsum([1] + blocks)[:-1]
        tables = [[int(first[i]) + b for b in range(blocks[i])] + [0] * (width - blocks[i]) for i in range(len(lens))]
        slots = [tables[i][p // _BLOCK] * _BLOCK + p % _BLOCK for i, n in enumerate(lens) for p in range(n)]
        i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=self.device)  # noqa: E731
        is_decode = all(n == 1 for n in lens)
        decode_rows = [i for i, n in enumerate(lens) if n == 1]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            positions=torch.tensor([p for n in lens for p in range(n)], device=self.device),
            query_start_loc=i32(np.cumsum([0] + lens).tolist()),
            seq_lens=i32(lens),
            block_tables=i32(tables),
            max_query_len=max(lens),
            max_seq_len=max(lens),
            block_size=_BLOCK,
            is_decode=is_decode,
            decode_rows=i32(decode_rows) if decode_rows and not is_decode else None,
            prefill_rows=None if is_decode else i32([i for i, n in enumerate(lens) if n > 1]),
        )
        cfg = self.model.cfg
        shape = (2, sum(blocks) + 1, _BLOCK, cfg.num_kv_heads, cfg.head_dim)
        # Zeros, not empty: attention reads whole blocks, and a masked slot holding NaN garbage
        # would still poison the output (0 * NaN).
        caches = [torch.zeros(shape, dtype=self.cache_dtype, device=self.device) for _ in range(cfg.num_layers)]
        return meta, caches


def load_decoder_pooler(spec: TaskSpec, device: torch.device, dtype: torch.dtype) -> DecoderPooler:
    """Our engine's model for the checkpoint (its loader refuses what it cannot compute)."""
    from stepserve.models.loader import load_model, read_hf_config, resolve_source

    source = resolve_source(spec.directory)
    model = load_model(source, read_hf_config(source), dtype, device, max_positions=spec.max_model_len)
    return DecoderPooler(model, spec.pooling.mode, device)
