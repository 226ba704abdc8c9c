"""The reference backend: PyTorch SDPA over K/V pages gathered from the cache.

Obviously correct rather than fast: every sequence's pages are gathered into a padded batch and
one masked SDPA call covers prefill chunks and decode alike. Fast backends are tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stepserve.attention.base import AttentionMetadata, write_kv


class SdpaBackend:
    name = "sdpa"

    def prepare(self, meta: AttentionMetadata) -> None:
        qsl = meta.query_start_loc.long()
        q_lens = qsl[1:] - qsl[:-1]
        offsets = torch.arange(meta.max_query_len, device=qsl.device)
        valid = offsets[None, :] < q_lens[:, None]  # [B, max_q]
        index = torch.where(valid, qsl[:-1, None] + offsets[None, :], 0)  # padded rows read token 0
        q_pos = torch.where(valid, meta.seq_lens.long()[:, None] - q_lens[:, None] + offsets[None, :], 0)
        kv_len = meta.block_tables.shape[1] * meta.block_size
        keys = torch.arange(kv_len, device=qsl.device)
        # Causal within the context; a padded query row sees key 0 only, so it never turns NaN.
        mask = keys[None, None, :] <= q_pos[:, :, None]  # [B, max_q, kv_len]
        # The block ids row after row: index_select copies whole blocks, about 3x faster on a CPU
        # than advanced indexing of the same pages.
        tables = meta.block_tables.reshape(-1).long()
        meta.extras = {"index": index, "valid": valid, "mask": mask[:, None], "tables": tables}

    def forward(self, q, k, v, kv_cache, meta, scale):
        dtype = q.dtype  # the cache may be wider than the activations (float32 on CPU)
        q, k, v = q.to(kv_cache.dtype), k.to(kv_cache.dtype), v.to(kv_cache.dtype)
        write_kv(k, v, kv_cache, meta.slot_mapping)
        ex = meta.extras
        num_heads, (num_blocks, block_size, num_kv_heads, head_dim) = q.shape[1], kv_cache.shape[1:]
        batch = meta.block_tables.shape[0]
        # One gather for keys and values: [2, B, Hkv, max_blocks * block_size, D].
        kv = kv_cache.index_select(1, ex["tables"]).view(2, batch, -1, num_kv_heads, head_dim).transpose(2, 3)
        if meta.is_decode:
            # One query per sequence: the query heads sharing a KV head become that head's query
            # rows ([B, Hkv, H / Hkv, D]), one plain attention per KV head, no GQA expansion
            # (about 20% faster on a CPU); the mask's single query row broadcasts over them.
            queries = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
            out = F.scaled_dot_product_attention(queries, kv[0], kv[1], attn_mask=ex["mask"], scale=scale)
            return out.reshape(batch, num_heads, head_dim).to(dtype)
        queries = q[ex["index"]].transpose(1, 2)  # [B, H, max_q, D]
        out = F.scaled_dot_product_attention(
            queries, kv[0], kv[1], attn_mask=ex["mask"], scale=scale, enable_gqa=num_kv_heads != num_heads
        )
        return out.transpose(1, 2)[ex["valid"]].to(dtype)  # back to [T, H, D]
