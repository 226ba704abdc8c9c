"""The SDPA backend (the CPU path and the reference of the fast kernels) against attention written
out per sequence in float64: decode-only, prefill-only and mixed steps, GQA and plain heads."""

import pytest
import torch

from attention_batches import make_batch, naive_attention
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
