"""The SDPA backend with a sliding window and soft-capped scores (Mistral, Gemma 2/3) against
attention written out per sequence in float64; windows shorter and longer than the contexts,
windows that start inside a block."""

import pytest
import torch

from attention_batches import make_batch, naive_attention
from stepserve.attention.sdpa import SdpaBackend

CASES = {
    "decode": ([1, 1, 1, 1], [5, 0, 33, 16]),
    "prefill": ([7, 1 + 16, 3], [0, 16, 40]),
    "mixed": ([1, 9, 1, 4, 1], [20, 0, 47, 12, 3]),
}


@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("window", [1, 6, 1000])
@pytest.mark.parametrize("case", CASES)
def test_windowed_and_soft_capped_attention(case, window, softcap):
    q_lens, ctx_lens = CASES[case]
    q, k, v, cache, meta = make_batch(q_lens, ctx_lens, 6, 2, 16, 8, torch.float64, "cpu", window)
    want = naive_attention(q, k, v, cache, meta, 0.5, window, softcap)
    backend = SdpaBackend()
    backend.prepare(meta)
    got = backend.forward(q, k, v, cache, meta, 0.5, window=window, softcap=softcap)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if window < 1000:  # the window changes the answer (else the test could not fail)
        full = naive_attention(q, k, v, cache, meta, 0.5, 0, softcap)
        assert not torch.allclose(got, full)


POISON_CASES = {**CASES, "one chunk after long context": ([5], [70]), "long decode": ([1, 1], [70, 3])}


@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("window", [1, 6, 17])
@pytest.mark.parametrize("case", POISON_CASES)
def test_blocks_wholly_outside_the_window_are_not_read(case, window, softcap):
    """NaN in every block that holds no key of any of its row's windows changes nothing: a block
    that was gathered and masked would turn the output NaN (0 * NaN in the weighted sum)."""
    q_lens, ctx_lens = POISON_CASES[case]
    q, k, v, cache, meta = make_batch(q_lens, ctx_lens, 6, 2, 16, 8, torch.float64, "cpu", window + 7)
    bs, poisoned = meta.block_size, 0
    for row, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens)):
        first_key = max(0, ctx - window + 1)  # the window of the row's first query starts here
        for b in range(first_key // bs):  # blocks that end before it
            cache[:, meta.block_tables[row, b]] = float("nan")
            poisoned += 1
    assert poisoned  # else the test could not fail
    want = naive_attention(q, k, v, cache, meta, 0.5, window, softcap)
    backend = SdpaBackend()
    backend.prepare(meta)
    got = backend.forward(q, k, v, cache, meta, 0.5, window=window, softcap=softcap)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
