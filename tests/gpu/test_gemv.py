"""The few-row kernels ``gemv`` and ``gemv_silu_mul`` against the products they replace: float64
references of the same weights, and the unfused projection then ``silu_and_mul`` (same
roundings, so equal up to the order of the float32 sums)."""

import pytest
import torch

pytest.importorskip("triton")  # a CPU machine without it runs none of the kernels

from stepserve.kernels.triton import fp8 as Q  # noqa: E402
from stepserve.kernels.triton import fused  # noqa: E402
from stepserve.kernels.triton import gemv as G  # noqa: E402

ROWS = [1, 2, 3, 5, 8]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(device, dtype, rows, n, k, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x, w, b


def dtypes(device):
    return [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]  # interpreter: no bf16


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_equals_the_product(device, rows, bias):
    """N and K no multiple of the tiles; x a strided view (rows of a wider tensor)."""
    for dtype in dtypes(device):
        x, w, b = inputs(device, dtype, rows, 1000, 1500, bias, rows)
        wide = torch.cat([x, x], dim=1)[:, :1500]  # row stride 3000
        want = wide.double() @ w.double().t() + (b.double() if bias else 0)
        got = G.gemv(wide, w, bias=b)
        assert got.dtype == dtype and got.shape == (rows, 1000) and torch.isfinite(got).all()
        assert rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 5e-3)  # the output's rounding


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_silu_mul_equals_projection_then_activation(device, rows, bias):
    """The gated kernel against ``gemv`` then ``silu_and_mul``: gate rows then up rows of an
    uneven width (1000 = 2 x 500, not a multiple of the tile's 8 columns... nor 16)."""
    for dtype in dtypes(device):
        x, w, b = inputs(device, dtype, rows, 1000, 700, bias, 10 + rows)
        got = G.gemv_silu_mul(x, w, bias=b)
        unfused = fused.silu_and_mul(G.gemv(x, w, bias=b))
        assert got.shape == (rows, 500) and torch.isfinite(got).all()
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # one bf16 step where the sums round apart
        assert rel_err(got, unfused) <= tol
        g, u = (x.double() @ w.double().t() + (b.double() if bias else 0)).chunk(2, dim=-1)
        assert rel_err(got, torch.nn.functional.silu(g) * u) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rows", ROWS)
def test_fp8_weights(device, rows):
    """e4m3 weights with per-channel scales, against the float64 product of the dequantized
    weights; the gated kernel against the projection then the activation."""
    if device == "cpu":
        pytest.skip("e4m3 loads need CUDA")
    x, w, _ = inputs(device, torch.bfloat16, rows, 1000, 1500, False, 20 + rows)
    q, scale = Q.quantize_weight(w)
    scale = scale[None, :].contiguous()
    dequantized = q.double() * scale.double().t()
    assert rel_err(G.gemv(x, q, scale), x.double() @ dequantized.t()) <= 5e-3
    got = G.gemv_silu_mul(x, q, scale)
    assert rel_err(got, fused.silu_and_mul(G.gemv(x, q, scale))) <= 1e-2


def test_more_rows_than_the_tiles_is_an_error(device):
    x, w, _ = inputs(device, torch.float32, G.GEMV_ROWS + 1, 64, 64, False, 0)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        G.gemv(x, w)
