"""The Triton kernels with a sliding window and soft-capped scores against the SDPA reference in
float64 (itself checked against per-sequence attention in tests/unit/test_sdpa_window.py)."""

import pytest
import torch

from attention_batches import make_batch
from stepserve.attention.base import AttentionMetadata
from stepserve.attention.sdpa import SdpaBackend


def reference(q, k, v, cache, meta, scale, window, softcap):
    fields = {f: getattr(meta, f) for f in meta.__dataclass_fields__ if f != "extras"}
    moved = AttentionMetadata(**{f: (x.cpu() if torch.is_tensor(x) else x) for f, x in fields.items()})
    backend = SdpaBackend()
    backend.prepare(moved)
    return backend.forward(
        q.double().cpu(),
        k.double().cpu(),
        v.double().cpu(),
        cache.double().cpu(),
        moved,
        scale,
        window=window,
        softcap=softcap,
    )


def check(q, k, v, cache, meta, dtype, window, softcap):
    from stepserve.attention.triton_backend import TritonBackend

    if q.device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter mishandles bf16 stores; bf16 is checked on the GPU")
    scale = q.shape[-1] ** -0.5
    want = reference(q, k, v, cache.clone(), meta, scale, window, softcap)
    backend = TritonBackend()
    backend.prepare(meta)
    got = backend.forward(q, k, v, cache.clone(), meta, scale, window=window, softcap=softcap)
    assert torch.isfinite(got).all()
    err = (got.double().cpu() - want).norm() / want.norm()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert err <= tol, f"relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("window", [1, 7, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_window(device, dtype, window, softcap):
    """Short and long contexts (the long one takes the split-K path), windows inside one tile,
    across tiles and blocks, and longer than some contexts."""
    q, k, v, cache, meta = make_batch([1, 1, 1, 1], [3000, 700, 5, 63], 8, 2, 64, 16, dtype, device, window)
    check(q, k, v, cache, meta, dtype, window, softcap)


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("window", [1, 7, 64, 100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_and_mixed_window(device, dtype, window, softcap):
    """Prompt chunks longer than the window and BLOCK_M, after cached prefixes, beside decode rows."""
    q_lens, ctx = [1, 150, 37, 1, 200], [40, 0, 90, 260, 17]
    q, k, v, cache, meta = make_batch(q_lens, ctx, 8, 2, 64, 16, dtype, device, 100 + window)
    check(q, k, v, cache, meta, dtype, window, softcap)


@pytest.mark.parametrize("window", [64, 1024])
def test_gemma3_12b_heads_window(device, window):
    """Gemma-3-12B's attention shape (16 query heads, 8 KV heads of 256) with its window (1024)
    and a shorter one, decode beside prompt chunks."""
    q, k, v, cache, meta = make_batch(
        [1, 300, 1, 77], [500, 0, 1500, 40], 16, 8, 256, 16, torch.bfloat16, device, window
    )
    check(q, k, v, cache, meta, torch.bfloat16, window, 0.0)
