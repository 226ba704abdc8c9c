"""The attention interface: write this step's K/V into the paged cache, attend over the pages."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    """Per-step batch layout, built once by the model runner and shared by every layer.

    Tokens of all sequences are packed along one axis (T tokens, B sequences, sequence b owning
    ``query_start_loc[b]:query_start_loc[b+1]``); sequence b's new tokens sit at the end of its
    context of ``seq_lens[b]`` tokens.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each token
    positions: torch.Tensor  # [T] int64: position of each token in its sequence
    query_start_loc: torch.Tensor  # [B + 1] int32: where each sequence's tokens start
    seq_lens: torch.Tensor  # [B] int32: context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32: block ids, padded with the null block 0
    max_query_len: int  # longest run of new tokens in one sequence
    max_seq_len: int  # longest context in the batch
    block_size: int  # tokens per block
    is_decode: bool  # every sequence has exactly one new token
    extras: dict | None = None  # backend-private tensors, built once per step by the backend
    decode_rows: torch.Tensor | None = None  # [Bd] int32: rows with one new token, in a mixed step
    prefill_rows: torch.Tensor | None = None  # [Bp] int32: rows with several, when not is_decode


class RotaryInputs(Protocol):
    """A step's rotary embedding as a backend that applies it reads it (``models.rope.RopeStep``
    on its Triton path, so R/2 is a power of two): rotate_half over the leading R dims of each
    head, the rest passed through."""

    positions: torch.Tensor  # [T] int64: the position each token is rotated to
    cos_sin: torch.Tensor  # [max_positions, R] float32: the R/2 frequencies' cos, then their sin


@dataclass(frozen=True)
class HeadNorms:
    """Per-head RMSNorms of q and k before the rotary (Qwen3's ``q_norm``/``k_norm``, times ``w``):
    a backend that ``fuses_rotary`` applies them as it rotates, in the same launch."""

    q_weight: torch.Tensor  # [D]
    k_weight: torch.Tensor  # [D]
    eps: float


class AttentionBackend(Protocol):
    """Writes a step's K/V into the paged cache and attends over it.

    A backend whose class sets ``fuses_rotary = True`` also applies the rotary embedding: the
    model may then hand ``forward`` un-rotated q and k with ``rotary``, and the backend rotates
    both in place (k too, for any later reader) as it writes the cache, in one launch where there
    were two. With ``qk_norm`` too (only beside ``rotary``), it norms each head of q and k first.
    Callers ask ``fuses_rotary(backend)``; a backend without the flag never gets ``rotary``.
    """

    name: str

    def prepare(self, meta: AttentionMetadata) -> None:
        """Build backend-private per-step data once, before the layers run."""

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,  # keys a query sees, itself included (sliding window); 0: all
        softcap: float = 0.0,  # scores -> softcap * tanh(scores / softcap); 0: off
        kv_scale: tuple[float, float] = (1.0, 1.0),  # FP8 cache: stored = value / scale (K, V)
        rotary: RotaryInputs | None = None,  # q and k come un-rotated: rotate them (fuses_rotary only)
        qk_norm: HeadNorms | None = None,  # q and k come un-normed too: norm them first (with rotary only)
    ) -> torch.Tensor:  # [T, H, D]
        ...


def fuses_rotary(backend: AttentionBackend) -> bool:
    """Whether ``backend.forward`` takes ``rotary`` and ``qk_norm`` (the flag is optional: the SDPA
    backend has none)."""
    return getattr(backend, "fuses_rotary", False)


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def is_fp8(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == torch.float8_e4m3fn


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3 of ``x / scale``, saturated (e4m3fn has no infinity: an overflow would be NaN)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


_REGISTRY = {
    "sdpa": "stepserve.attention.sdpa:SdpaBackend",
    "triton": "stepserve.attention.triton_backend:TritonBackend",
}


def get_backend(name: str) -> AttentionBackend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def write_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_scale=(1.0, 1.0)
) -> None:
    """Store this step's keys and values at their slots (quantized for an FP8 cache)."""
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    if is_fp8(kv_cache):  # copied as bytes: index_copy_ has no float8 kernels
        k, v = quantize_kv(k, kv_scale[0]).view(torch.uint8), quantize_kv(v, kv_scale[1]).view(torch.uint8)
        kv_cache = kv_cache.view(torch.uint8)
    kv_cache[0].view(num_slots, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(num_slots, *v.shape[1:]).index_copy_(0, slot_mapping, v)
