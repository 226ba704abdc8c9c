"""The fused Triton layer ops against the PyTorch code they replace, on fresh random inputs."""

import contextlib

import pytest
import torch

from stepserve.models.layers import RMSNorm
from stepserve.models.config import RopeConfig
from stepserve.models.rope import Rotary


def _rotate(x, cos, sin):
    """rotate_half rotary in float32, as transformers writes it."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def dtypes(device):
    return [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float32]  # interpreter: no bf16


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@contextlib.contextmanager
def nan_outputs():
    """Inside, every floating tensor from ``torch.empty`` / ``torch.empty_like`` starts as NaN, so
    an output element that a kernel never writes stays NaN and fails the finiteness checks (a
    fresh buffer from the caching allocator often holds zeros or an earlier, finite result)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def make_nan(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return make_nan

    torch.empty, torch.empty_like = poisoned(empty), poisoned(empty_like)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def test_rms_norm_with_and_without_residual(device):
    from stepserve.kernels.triton import fused as triton_ops

    for dtype in dtypes(device):
        for hidden in (64, 2048, 4096):
            x = torch.randn(37, hidden).to(dtype).to(device)
            res = torch.randn(37, hidden).to(dtype).to(device)
            norm = RMSNorm(hidden, 1e-5).to(device)
            norm.weight.data = (torch.rand(hidden) + 0.5).to(dtype).to(device)
            with nan_outputs():
                assert torch.isnan(torch.empty(3, dtype=dtype, device=device)).all()  # the poison is real
                out = triton_ops.rms_norm(x, norm.weight, 1e-5)
                fused, summed = triton_ops.rms_norm(x, norm.weight, 1e-5, res)
            assert torch.isfinite(out).all() and torch.isfinite(fused).all() and torch.isfinite(summed).all()
            assert rel_err(out, norm._norm(x)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
            assert torch.equal(summed, x + res)  # the residual add rounds exactly as PyTorch's
            assert rel_err(fused, norm._norm(x + res)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_rms_norm_heads_in_place_equals_the_norms_it_replaces(device):
    """Qwen3's q and k norms on a strided view of a qkv output (v after them, untouched): each head
    as PyTorch's RMSNorm of it with its weight, the fused output's other columns unchanged."""
    from stepserve.kernels.triton import fused as triton_ops

    for dtype in dtypes(device):
        for num_q, num_k, head_dim in ((32, 4, 128), (16, 8, 128), (5, 1, 64)):
            gen = torch.Generator().manual_seed(num_q)
            qkv = torch.randn(9, (num_q + 2 * num_k) * head_dim, generator=gen).to(dtype).to(device)
            q_w = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(device)
            k_w = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(device)
            qk = qkv[:, : (num_q + num_k) * head_dim].view(-1, num_q + num_k, head_dim)
            before = qkv.clone()
            want_q = torch.rms_norm(qk[:, :num_q].reshape(-1, head_dim), (head_dim,), q_w, 1e-6)
            want_k = torch.rms_norm(qk[:, num_q:].reshape(-1, head_dim), (head_dim,), k_w, 1e-6)
            triton_ops.rms_norm_heads_(qk, q_w, k_w, num_q, 1e-6)
            bound = 1e-2 if dtype == torch.bfloat16 else 1e-5
            assert rel_err(qk[:, :num_q].reshape(-1, head_dim), want_q) < bound
            assert rel_err(qk[:, num_q:].reshape(-1, head_dim), want_k) < bound
            assert torch.equal(qkv[:, (num_q + num_k) * head_dim :], before[:, (num_q + num_k) * head_dim :])


def test_rotary_in_place(device):
    from stepserve.kernels.triton import fused as triton_ops

    for dtype in dtypes(device):
        # whole heads, partial rotary (the trailing dims pass through), Gemma 3's 256-wide heads
        for head_dim, rotary_dim in ((64, 64), (64, 32), (256, 256)):
            rotary = Rotary(RopeConfig(500000.0, rotary_dim), 4096)
            rotary.fill()
            rotary = rotary.to(device)
            qkv = torch.randn(50, (32 + 16) * head_dim).to(dtype).to(device)
            q, k, v = qkv.split([32 * head_dim, 8 * head_dim, 8 * head_dim], dim=-1)
            v_before = v.clone()
            q, k = q.view(50, 32, head_dim), k.view(50, 8, head_dim)
            positions = torch.randint(0, 4096, (50,), device=device)
            cos, sin = rotary.cos_sin[positions].chunk(2, dim=-1)

            def rot(x):
                return torch.cat([_rotate(x[..., :rotary_dim], cos[:, None], sin[:, None]), x[..., rotary_dim:]], -1)

            want_q, want_k = rot(q), rot(k)
            triton_ops.rotary_(q, k, positions, rotary.cos_sin)
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
            assert rel_err(q, want_q) < tol and rel_err(k, want_k) < tol
            assert torch.equal(v, v_before)  # in place on q and k only: v, beside them in qkv, untouched


def test_silu_and_mul(device):
    from stepserve.kernels.triton import fused as triton_ops

    for dtype in dtypes(device):
        x = torch.randn(33, 2 * 1500).to(dtype).to(device)
        gate, up = x.chunk(2, dim=-1)
        want = torch.nn.functional.silu(gate) * up
        with nan_outputs():
            got = triton_ops.silu_and_mul(x)
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def kv_write_cases(device):
    """(activation dtype, cache dtype) pairs: the interpreter has no bf16, and rounds to FP8 its own
    way (the same in both kernels, which is all the bitwise comparison below needs)."""
    cases = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float8_e4m3fn)]
    if device != "cpu":
        cases += [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float8_e4m3fn)]
    return cases


# about one unit in the last place of values near 1 (e4m3: of values up to 16, scaled)
LAST_BIT = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float8_e4m3fn: 0.13}


def bits(x):
    return x.view(torch.uint8) if x.element_size() == 1 else x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


@pytest.mark.parametrize("num_q, num_kv, head_dim", [(32, 8, 128), (4, 4, 64), (9, 3, 64)])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["", "qk-norm"])
def test_rotary_write_kv_equals_rotary_then_write_kv(device, num_q, num_kv, head_dim, partial, qk_norm):
    """The fused launch against the two it replaces, bit for bit: q and k rotated in place in the
    qkv output (v untouched), the rotated K and V at their slots of a NaN-poisoned cache (every
    written element finite, no other element written), the dims past a partial rotary passed
    through, FP8 caches scaled and saturated alike. With Qwen3's q/k norms first (three launches
    replaced), q, k and K within their dtype's last bit: on an H100 float32 heads of 64 differed in
    the last bit when the kernel's tile was shaped otherwise than ``rms_norm_heads_``'s."""
    from stepserve.kernels.triton import attention as K
    from stepserve.kernels.triton import fused as triton_ops

    rotary_dim = head_dim // 2 if partial else head_dim
    rotary = Rotary(RopeConfig(500000.0, rotary_dim), 4096)
    rotary.fill()
    rotary = rotary.to(device)
    tokens, block_size, num_blocks = 37, 16, 12
    for dtype, cache_dtype in kv_write_cases(device):
        gen = torch.Generator().manual_seed(num_q * head_dim + rotary_dim)
        qkv = torch.randn(tokens, (num_q + 2 * num_kv) * head_dim, generator=gen)
        qkv[:3] *= 300  # past e4m3's 448 once divided by the scale: the FP8 stores saturate
        qkv = qkv.to(dtype).to(device)
        positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)  # over every block
        cache = torch.full((2, num_blocks, block_size, num_kv, head_dim), float("nan")).to(cache_dtype).to(device)
        kv_scale = (0.5, 2.0) if cache_dtype == torch.float8_e4m3fn else (1.0, 1.0)

        def split(x):
            q, k, v = x.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
            return q.view(tokens, num_q, head_dim), k.view(tokens, num_kv, head_dim), v.view(tokens, num_kv, head_dim)

        want_qkv, want_cache = qkv.clone(), cache.clone()
        q, k, v = split(want_qkv)
        norms = None
        if qk_norm:  # weights of both signs and unlike each other; eps as Qwen3's
            norms = tuple((torch.rand(head_dim, generator=gen) * 4 - 2).to(dtype).to(device) for _ in "qk") + (1e-6,)
            qk = want_qkv[:, : (num_q + num_kv) * head_dim].view(tokens, num_q + num_kv, head_dim)
            triton_ops.rms_norm_heads_(qk, norms[0], norms[1], num_q, norms[2])
        triton_ops.rotary_(q, k, positions, rotary.cos_sin)
        K.write_kv(k, v, want_cache, slots, kv_scale)
        K.rotary_write_kv(*split(qkv), cache, slots, positions, rotary.cos_sin, kv_scale, norms)

        if not qk_norm:
            assert torch.equal(bits(qkv), bits(want_qkv)), f"{dtype}: q or k rotated differently (or v touched)"
            assert torch.equal(bits(cache), bits(want_cache)), f"{dtype} into {cache_dtype}: the cache differs"
        else:  # a head's squares may be summed in another order on a GPU: within the last bit
            v_cols = slice((num_q + num_kv) * head_dim, None)
            assert torch.equal(bits(qkv[:, v_cols]), bits(want_qkv[:, v_cols])), "v touched"
            for got, want, kind in ((qkv, want_qkv, dtype), (cache, want_cache, cache_dtype)):
                tol = LAST_BIT[kind]
                torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, equal_nan=True)
            assert torch.equal(bits(cache[1]), bits(want_cache[1])), "V differs"
        written = cache.view(2, num_blocks * block_size, num_kv, head_dim)[:, slots].float()
        assert torch.isfinite(written).all(), "a slot element kept its NaN poison"
        assert torch.isnan(cache.float()).sum() == cache.numel() - written.numel(), "an element off the slots written"
