"""The SDPA backend (the CPU path and the reference of the fast kernels) against attention written
out per sequence in float64: decode-only, prefill-only and mixed steps, GQA and plain heads."""

import pytest
import torch

from attention_batches import make_batch, naive_attention, to_fp8_cache
from stepserve.attention.sdpa import SdpaBackend


CASES = {
    "decode": ([1, 1, 1, 1], [5, 0, 33, 16]),
    "prefill": ([7, 1 + 16, 3], [0, 16, 40]),
    "mixed": ([1, 9, 1, 4, 1], [20, 0, 47, 12, 3]),
    "one chunk after long context": ([5], [70]),
}


@pytest.mark.parametrize("heads", [(6, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_sdpa_backend_matches_per_sequence_attention(case, heads, seed):
    q_lens, ctx_lens = CASES[case]
    num_heads, num_kv_heads = heads
    q, k, v, cache, meta = make_batch(q_lens, ctx_lens, num_heads, num_kv_heads, 16, 8, torch.float64, "cpu", seed)
    scale = 16**-0.5
    want = naive_attention(q, k, v, cache, meta, scale)
    backend = SdpaBackend()
    backend.prepare(meta)
    got = backend.forward(q, k, v, cache, meta, scale)
    assert got.shape == q.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # The backend wrote this step's keys and values where the slots say.
    slots = cache.shape[1] * cache.shape[2]
    assert torch.equal(cache[0].view(slots, num_kv_heads, 16)[meta.slot_mapping], k)
    assert torch.equal(cache[1].view(slots, num_kv_heads, 16)[meta.slot_mapping], v)


def test_float32_cache_with_bfloat16_activations_returns_bfloat16():
    q, k, v, cache, meta = make_batch([1, 6], [9, 2], 6, 2, 16, 8, torch.float32, "cpu", 3)
    want = naive_attention(q.double(), k.double(), v.double(), cache.double(), meta, 0.25)
    backend = SdpaBackend()
    backend.prepare(meta)
    got = backend.forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), cache, meta, 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", CASES)
def test_fp8_cache_reads_and_writes_with_scales(case):
    """An FP8 cache with per-tensor scales (K 0.5, V 2.0: powers of two, so the grid values are
    exact): the float64 reference over the dequantized pages, and the written slots hold this
    step's keys and values quantized."""
    q_lens, ctx_lens = CASES[case]
    q, k, v, cache, meta = make_batch(q_lens, ctx_lens, 6, 2, 16, 8, torch.float32, "cpu", 5)
    k, v, fp8, exact = to_fp8_cache(k * 4, v, cache * 4, (0.5, 2.0))
    want = naive_attention(q.double(), k.double(), v.double(), exact, meta, 0.25)
    backend = SdpaBackend()
    backend.prepare(meta)
    got = backend.forward(q, k, v, fp8, meta, 0.25, kv_scale=(0.5, 2.0))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    slots = fp8.shape[1] * fp8.shape[2]
    written = fp8.view(torch.uint8).view(2, slots, 2, 16)[:, meta.slot_mapping].view(torch.float8_e4m3fn).double()
    assert torch.equal(written[0] * 0.5, k.double()) and torch.equal(written[1] * 2.0, v.double())
