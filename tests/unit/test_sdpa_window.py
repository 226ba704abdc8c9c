"""The SDPA backend with a sliding window and soft-capped scores (Mistral, Gemma 2/3) against
attention written out per sequence in float64; windows shorter and longer than the contexts,
windows that start inside a block."""

import pytest
import torch

from attention_batches import make_batch
from stepserve.attention.sdpa import SdpaBackend

CASES = {
    "decode": ([1, 1, 1, 1], [5, 0, 33, 16]),
    "prefill": ([7, 1 + 16, 3], [0, 16, 40]),
    "mixed": ([1, 9, 1, 4, 1], [20, 0, 47, 12, 3]),
}


def naive(q, k, v, cache, meta, scale, window, softcap):
    cache = cache.clone()
    slots = cache.shape[1] * cache.shape[2]
    cache[0].view(slots, *k.shape[1:])[meta.slot_mapping] = k
    cache[1].view(slots, *v.shape[1:])[meta.slot_mapping] = v
    group = q.shape[1] // k.shape[1]
    out = torch.full_like(q, float("nan"))
    qsl, bs = meta.query_start_loc.tolist(), meta.block_size
    for row, seq_len in enumerate(meta.seq_lens.tolist()):
        blocks = meta.block_tables[row, : -(-seq_len // bs)].long()
        keys = cache[0][blocks].reshape(-1, *k.shape[1:])[:seq_len].repeat_interleave(group, dim=1)
        values = cache[1][blocks].reshape(-1, *v.shape[1:])[:seq_len].repeat_interleave(group, dim=1)
        for token in range(qsl[row], qsl[row + 1]):
            pos = seq_len - (qsl[row + 1] - token)
            first = max(0, pos - window + 1) if window else 0  # the window holds `window` keys, itself included
            scores = torch.einsum("hd,khd->hk", q[token], keys[first : pos + 1]) * scale
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            out[token] = torch.einsum("hk,khd->hd", scores.softmax(-1), values[first : pos + 1])
    return out


@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("window", [1, 6, 1000])
@pytest.mark.parametrize("case", CASES)
def test_windowed_and_soft_capped_attention(case, window, softcap):
    q_lens, ctx_lens = CASES[case]
    q, k, v, cache, meta = make_batch(q_lens, ctx_lens, 6, 2, 16, 8, torch.float64, "cpu", window)
    want = naive(q, k, v, cache, meta, 0.5, window, softcap)
    backend = SdpaBackend()
    backend.prepare(meta)
    got = backend.forward(q, k, v, cache, meta, 0.5, window=window, softcap=softcap)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if window < 1000:  # the window changes the answer (else the test could not fail)
        full = naive(q, k, v, cache, meta, 0.5, 0, softcap)
        assert not torch.allclose(got, full)
