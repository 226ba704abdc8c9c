"""The reference backend: PyTorch SDPA over K/V pages gathered from the cache.

Obviously correct rather than fast: each sequence's pages are gathered into a padded batch and
masked SDPA attends over them. Sequences with one new token (decode) and sequences with several
(prefill chunks) go in separate calls, so a mixed step does not pad every decode row to the
longest chunk. Fast backends are tested against it; it is also the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stepserve.attention.base import AttentionMetadata, is_fp8, write_kv

NULL_BLOCK = 0  # the block tables' padding (core.block_manager.NULL_BLOCK; attention imports no engine code)


@dataclass
class _Group:
    """Sequences attended in one SDPA call."""

    decode: bool  # one query per sequence
    index: torch.Tensor | None  # [B', max_q] packed index of each padded query (prefill)
    valid: torch.Tensor | None  # [B', max_q] which padded queries are real (prefill)
    tables: torch.Tensor  # [B', max_blocks] int64 block ids of each sequence
    block_size: int  # tokens per block
    q_pos: torch.Tensor  # [B', max_q or 1] position of each (padded) query in its sequence
    out_rows: torch.Tensor | None  # packed index of each query token, in output order; None: all, in order
    views: dict = field(default_factory=dict)  # window -> (blocks to gather, mask); 0: causal

    def view(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks to gather, flat and row after row ([B' * width]), and which of their keys
        each query sees ([B', 1, max_q or 1, width * block_size] bool): causal, and within the
        last ``window`` positions (itself included) when windowed. Built once per step and
        window, shared by the layers."""
        if window not in self.views:
            self.views[window] = self._windowed(window) if window else self._causal()
        return self.views[window]

    def _causal(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.arange(self.tables.shape[1] * self.block_size, device=self.q_pos.device)
        visible = keys[None, None, :] <= self.q_pos[:, :, None]  # a padded query sees key 0
        # index_select of whole blocks copies about 3x faster on a CPU than advanced indexing.
        return self.tables.reshape(-1), visible[:, None]

    def _windowed(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the blocks that hold a key of the window of some query of the row: from the block
        of the first query's first key (``pos - window + 1``) on, ``width`` blocks, where
        ``width`` bounds the blocks any row's keys span (``max_q + window - 1`` positions
        starting anywhere in a block), so no host sync is needed. Columns past the table read
        the null block; their keys lie after every query and are masked."""
        bs, max_blocks = self.block_size, self.tables.shape[1]
        span = self.q_pos.shape[1] + window - 1  # positions from the first query's first key to the last query
        width = min(max_blocks, (span + bs - 2) // bs + 1)
        first = (self.q_pos[:, 0] - window + 1).clamp(min=0) // bs  # a row's first query is real
        cols = first[:, None] + torch.arange(width, device=first.device)
        blocks = torch.where(cols < max_blocks, self.tables.gather(1, cols.clamp(max=max_blocks - 1)), NULL_BLOCK)
        keys = (cols[:, :, None] * bs + torch.arange(bs, device=cols.device)).reshape(len(cols), 1, -1)
        q_pos = self.q_pos[:, :, None]
        visible = (keys <= q_pos) & (keys > q_pos - window)
        if self.valid is not None:  # a padded query (position 0) sees the first gathered key, never none
            visible[:, :, 0] |= ~self.valid
        return blocks.reshape(-1), visible[:, None]


class SdpaBackend:
    name = "sdpa"
    fuses_rotary = False  # q and k come rotated (models/rope.py); see AttentionBackend

    def prepare(self, meta: AttentionMetadata) -> None:
        qsl = meta.query_start_loc.long()
        if meta.is_decode:
            groups = [self._decode_group(meta, qsl, None)]
        elif meta.decode_rows is None:
            groups = [self._prefill_group(meta, qsl, None)]
        else:
            groups = [
                self._decode_group(meta, qsl, meta.decode_rows.long()),
                self._prefill_group(meta, qsl, meta.prefill_rows.long()),
            ]
        meta.extras = {"groups": groups}

    @staticmethod
    def _decode_group(meta: AttentionMetadata, qsl: torch.Tensor, rows: torch.Tensor | None) -> _Group:
        tables = meta.block_tables if rows is None else meta.block_tables[rows]
        seq_lens = meta.seq_lens if rows is None else meta.seq_lens[rows]
        q_pos = seq_lens.long()[:, None] - 1  # the new token is the context's last
        out_rows = None if rows is None else qsl[rows]  # a decode row's one token
        return _Group(True, None, None, tables.long(), meta.block_size, q_pos, out_rows)

    @staticmethod
    def _prefill_group(meta: AttentionMetadata, qsl: torch.Tensor, rows: torch.Tensor | None) -> _Group:
        starts, ends = (qsl[:-1], qsl[1:]) if rows is None else (qsl[rows], qsl[rows + 1])
        tables = meta.block_tables if rows is None else meta.block_tables[rows]
        seq_lens = meta.seq_lens if rows is None else meta.seq_lens[rows]
        q_lens = ends - starts
        offsets = torch.arange(meta.max_query_len, device=qsl.device)  # the longest run is a prefill row's
        valid = offsets[None, :] < q_lens[:, None]  # [B', max_q]
        index = torch.where(valid, starts[:, None] + offsets[None, :], 0)  # padded rows read token 0
        q_pos = torch.where(valid, seq_lens.long()[:, None] - q_lens[:, None] + offsets[None, :], 0)
        # A padded query row sits at position 0 and sees key 0 only, so it never turns NaN.
        out_rows = None if rows is None else index[valid]
        return _Group(False, index, valid, tables.long(), meta.block_size, q_pos, out_rows)

    def forward(self, q, k, v, kv_cache, meta, scale, window: int = 0, softcap: float = 0.0, kv_scale=(1.0, 1.0)):
        dtype = q.dtype  # the cache may be wider than the activations (float32 on CPU)
        # An FP8 cache is read back in the activations' dtype (float32 on a CPU, as the cache would be).
        work = (torch.float32 if q.device.type == "cpu" else dtype) if is_fp8(kv_cache) else kv_cache.dtype
        q, k, v = q.to(work), k.to(work), v.to(work)
        write_kv(k, v, kv_cache, meta.slot_mapping, kv_scale)
        groups = meta.extras["groups"]
        if len(groups) == 1:
            return self._attend(groups[0], q, kv_cache, scale, window, softcap, kv_scale).to(dtype)
        out = torch.empty_like(q)
        for group in groups:
            out[group.out_rows] = self._attend(group, q, kv_cache, scale, window, softcap, kv_scale)
        return out.to(dtype)

    @staticmethod
    def _attend(
        group: _Group, q: torch.Tensor, kv_cache: torch.Tensor, scale: float, window: int, softcap: float, kv_scale
    ) -> torch.Tensor:
        """Attention of the group's queries, packed: [tokens of the group, H, D]."""
        num_heads, (_, _, num_kv_heads, head_dim) = q.shape[1], kv_cache.shape[1:]
        batch = group.q_pos.shape[0]
        blocks, mask = group.view(window)
        # One gather for keys and values: [2, B', Hkv, width * block_size, D].
        kv = _gather(kv_cache, blocks, q.dtype, kv_scale).view(2, batch, -1, num_kv_heads, head_dim).transpose(2, 3)
        if group.decode:
            # The query heads sharing a KV head become that head's query rows ([B', Hkv, H / Hkv,
            # D]): one plain attention per KV head, no GQA expansion (about 20% faster on a CPU);
            # the mask's single query row broadcasts over them.
            rows = q if group.out_rows is None else q[group.out_rows]
            queries = rows.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
            out = _sdpa(queries, kv[0], kv[1], mask, scale, softcap)
            return out.reshape(batch, num_heads, head_dim)
        queries = q[group.index].transpose(1, 2)  # [B', H, max_q, D]
        out = _sdpa(queries, kv[0], kv[1], mask, scale, softcap)
        return out.transpose(1, 2)[group.valid]  # [tokens of the group, H, D]


def _gather(kv_cache: torch.Tensor, tables: torch.Tensor, dtype: torch.dtype, kv_scale) -> torch.Tensor:
    """The pages of ``tables``, K and V, dequantized from FP8 when the cache holds it."""
    if not is_fp8(kv_cache):
        return kv_cache.index_select(1, tables)
    pages = kv_cache.view(torch.uint8).index_select(1, tables).view(torch.float8_e4m3fn).to(dtype)
    return torch.stack([pages[0] * kv_scale[0], pages[1] * kv_scale[1]])


def _sdpa(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """SDPA over [B, H, Q, D] queries and [B, Hkv, K, D] keys/values; with ``softcap`` the
    scores become ``cap * tanh(scores / cap)`` before the mask (Gemma 2), in float32 at least."""
    gqa = q.shape[1] != k.shape[1]
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(wide) @ k.to(wide).transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs @ v.to(wide)).to(q.dtype)
