"""The CUDA backend: Triton paged decode (GQA, split-K) and varlen paged prefill.

A pure-decode step runs one decode launch over every row, so it can be captured in a CUDA graph.
Handed the step's rotary, the backend rotates q and k in the launch that writes the cache (and
norms each head first, handed the model's q/k norms).
A mixed step (prompt chunks beside decoding sequences) runs the decode kernel over the rows
with one new token and the prefill kernel over the rest; the runner names both row sets.
"""

from __future__ import annotations

import torch

from stepserve.kernels.triton import attention as K
from stepserve.attention.base import AttentionMetadata, HeadNorms, RotaryInputs

MAX_SPLITS = 32


def num_splits(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per sequence so that (sequence, KV head, split) programs fill the GPU up to twice;
    1 when the batch alone fills it. It depends on the batch shape only, never on the lengths, so
    an eager step and a graph captured for the same batch size split (and round) alike; short
    sequences just leave trailing splits empty."""
    splits = max(1, min(-(-2 * num_sms // (batch * num_kv_heads)), MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)  # a power of two: few kernel variants to compile at startup


class TritonBackend:
    name = "triton"
    fuses_rotary = True  # ``rotary`` given: q and k rotated as K is written (one launch, not two or three)

    def __init__(self) -> None:
        self._num_sms: int | None = None

    def num_sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            on_gpu = device.type == "cuda"  # the CPU case is Triton's interpreter, in tests
            self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 132
        return self._num_sms

    def prepare(self, meta: AttentionMetadata) -> None:
        meta.extras = {}

    def forward(
        self,
        q,
        k,
        v,
        kv_cache,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
        kv_scale=(1.0, 1.0),
        rotary: RotaryInputs | None = None,
        qk_norm: HeadNorms | None = None,
    ) -> torch.Tensor:
        if rotary is None:
            assert qk_norm is None, "qk_norm comes with rotary only"
            K.write_kv(k, v, kv_cache, meta.slot_mapping, kv_scale)
        else:
            norms = (qk_norm.q_weight, qk_norm.k_weight, qk_norm.eps) if qk_norm is not None else None
            K.rotary_write_kv(q, k, v, kv_cache, meta.slot_mapping, rotary.positions, rotary.cos_sin, kv_scale, norms)
        out = torch.empty_like(q)
        args = (kv_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale)
        opts = {"window": window, "softcap": softcap, "kv_scale": kv_scale}
        if meta.is_decode:
            K.paged_decode(q, *args, num_splits=self._splits(meta, meta.block_tables.shape[0], kv_cache), **opts)
            return out
        if meta.decode_rows is not None:
            splits = self._splits(meta, meta.decode_rows.shape[0], kv_cache)
            K.paged_decode(q, *args, num_splits=splits, rows=meta.decode_rows, **opts)
        K.paged_prefill(q, *args, rows=meta.prefill_rows, max_query_len=meta.max_query_len, **opts)
        return out

    def _splits(self, meta: AttentionMetadata, batch: int, kv_cache: torch.Tensor) -> int:
        """Chosen by the first layer, reused by the rest (host-side only: safe inside a graph)."""
        if meta.extras is None:
            meta.extras = {}
        if "num_splits" not in meta.extras:
            sms = self.num_sms(kv_cache.device)
            meta.extras["num_splits"] = num_splits(batch, kv_cache.shape[3], sms)
        return meta.extras["num_splits"]
