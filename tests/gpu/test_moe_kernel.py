"""The fused MoE kernel (``kernels/triton/moe.py``) against its PyTorch twin ``experts_reference``
run in float32 on the same weights, on CUDA and (smaller, without bf16) under Triton's interpreter.

Bounds (relative L2 error): bf16 <= 1e-2 (the kernel rounds gate, up, the activation and each
expert's output to bf16, as the reference does in bf16: a few 2^-9 roundings in a row); float32
<= 1e-5 (only the order of the sums differs). Every buffer the kernel allocates starts as NaN, so
a row it fails to write, or a padding row that leaks into a sum, shows up as a non-finite output.
"""

import pytest
import torch

from stepserve.models.moe import experts_reference, route

FP8_MAX = 448.0
BOUND = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def on_cuda(device: str) -> bool:
    return device == "cuda"


def dtypes(device: str) -> list[torch.dtype]:
    return [torch.bfloat16] if on_cuda(device) else [torch.float32, torch.float16]  # interpreter: no bf16


def sizes(device: str) -> tuple[int, int]:
    """(H, I): a small model's on CUDA; under the interpreter, small ones that are no multiple of the tiles."""
    return (1024, 384) if on_cuda(device) else (80, 48)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all()
    return ((x - ref).norm() / ref.norm()).item()


@pytest.fixture
def poisoned(monkeypatch):
    """Every floating tensor from ``torch.empty`` / ``torch.empty_like`` starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(make):
        def make_nan(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return make_nan

    monkeypatch.setattr(torch, "empty", nan(empty))
    monkeypatch.setattr(torch, "empty_like", nan(empty_like))


def make_experts(experts: int, hidden: int, inner: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, 2 * inner, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inner, generator=gen) / inner**0.5
    return w13.to(dtype).to(device), w2.to(dtype).to(device)


def routing(tokens: int, top_k: int, experts: int, kind: str, device: str, seed: int = 0):
    """(weights [T, K] float32, ids [T, K] int32): the router on random logits (``router``);
    ids drawn with probability falling as 1/(e+1)^2 (``skewed``); every copy to expert 3 (``one``)."""
    gen = torch.Generator().manual_seed(seed)
    weights, ids = route(torch.randn(tokens, experts, generator=gen), top_k, renormalize=True)
    if kind == "skewed":
        probs = 1.0 / torch.arange(1, experts + 1, dtype=torch.float32) ** 2
        ids = torch.multinomial(probs.expand(tokens, -1), top_k, generator=gen).to(torch.int32)
    elif kind == "one":
        ids = torch.full_like(ids, 3)
    return weights.to(device), ids.to(device)


def check_against_reference(tokens, top_k, experts, kind, dtype, device):
    from stepserve.kernels.triton.moe import fused_moe

    hidden, inner = sizes(device)
    w13, w2 = make_experts(experts, hidden, inner, dtype, device)
    weights, ids = routing(tokens, top_k, experts, kind, device, seed=tokens)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    got = fused_moe(x, w13, w2, weights, ids)
    ref = experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    err = rel_err(got, ref)
    print(f"T={tokens} K={top_k} E={experts} {kind} {dtype}: relative error {err:.2e}")
    assert err <= BOUND[dtype]


@pytest.mark.parametrize("tokens", [1, 7, 64, 1000, 8192])
@pytest.mark.parametrize("top_k", [2, 8])
@pytest.mark.parametrize("experts", [8, 128])
def test_fused_moe_matches_reference(tokens, top_k, experts, device, poisoned):
    """Routed by the model's router, for decode (16-row tiles) and prefill (up to 128-row tiles)."""
    if not on_cuda(device) and tokens > 64:
        pytest.skip("the interpreter takes the small batches only")
    for dtype in dtypes(device):
        check_against_reference(tokens, top_k, experts, "router", dtype, device)


@pytest.mark.parametrize("kind", ["skewed", "one"])
@pytest.mark.parametrize("experts", [8, 128])
def test_fused_moe_uneven_routing(kind, experts, device, poisoned):
    """Most copies to a few experts, and every copy to one: long groups beside empty ones."""
    tokens = 1000 if on_cuda(device) else 72  # 72 copies an expert on average: 128-row tiles
    for dtype in dtypes(device):
        check_against_reference(tokens, 8, experts, kind, dtype, device)


def test_fused_moe_no_tokens(device):
    from stepserve.kernels.triton.moe import fused_moe

    hidden, inner = sizes(device)
    dtype = dtypes(device)[0]
    w13, w2 = make_experts(8, hidden, inner, dtype, device)
    weights, ids = routing(0, 2, 8, "router", device)
    out = fused_moe(torch.empty(0, hidden, dtype=dtype, device=device), w13, w2, weights, ids)
    assert out.shape == (0, hidden) and out.dtype == dtype


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel (the last dim is the input): e4m3 codes and float32 scales amax/448."""
    scale = w.float().abs().amax(dim=-1) / FP8_MAX
    return (w.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("tokens", [1, 64, 1000])
def test_fused_moe_fp8_weights(tokens, device, poisoned):
    """Weight-only FP8: against the reference on the same codes and scales (dequantized in
    float32), so the bound is the activations' own rounding, not FP8's."""
    from stepserve.kernels.triton.moe import fused_moe

    if not on_cuda(device) and tokens > 64:
        pytest.skip("the interpreter takes the small batches only")
    hidden, inner = sizes(device)
    w13, w2 = make_experts(16, hidden, inner, torch.float32, device, seed=5)
    (q13, s13), (q2, s2) = quantize(w13), quantize(w2)
    weights, ids = routing(tokens, 4, 16, "router", device, seed=tokens)
    for dtype in dtypes(device):
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
        got = fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
        ref = experts_reference(x.float(), q13, q2, weights, ids, s13, s2)
        err = rel_err(got, ref)
        print(f"fp8 T={tokens} {dtype}: relative error {err:.2e}")
        assert err <= BOUND[dtype]


@pytest.mark.parametrize("kind", ["router", "skewed", "one"])
def test_align_groups_copies_by_expert(kind, device):
    """Every copy once, in a block of its expert; each group padded to the fewest whole blocks;
    blocks past them marked -1; padding rows point past the last copy."""
    from stepserve.kernels.triton.moe import align

    tokens, top_k, experts, block_m = 300, 8, 16, 16
    _, ids = routing(tokens, top_k, experts, kind, device)
    groups = align(ids, experts, block_m)
    sorted_ids, block_expert = groups.sorted_ids.cpu().long(), groups.block_expert.cpu().long()
    flat = ids.cpu().reshape(-1).long()
    counts = torch.bincount(flat, minlength=experts)
    used = int(((counts + block_m - 1) // block_m).sum())
    assert (block_expert[:used] >= 0).all() and (block_expert[used:] == -1).all()
    rows = sorted_ids[: used * block_m]
    real = rows < flat.numel()
    assert (rows[~real] == flat.numel()).all() and int((~real).sum()) == used * block_m - flat.numel()
    assert torch.equal(rows[real].sort().values, torch.arange(flat.numel()))
    row_expert = block_expert[:used].repeat_interleave(block_m)
    assert torch.equal(flat[rows[real]], row_expert[real])
    assert torch.equal(block_expert[:used], block_expert[:used].sort().values)  # groups in expert order


def test_config_by_tokens_per_expert(device):
    from stepserve.kernels.triton.moe import moe_config

    decode = moe_config(16, 8, 128, 2048, 768, torch.bfloat16)
    prefill = moe_config(8192, 8, 128, 2048, 768, torch.bfloat16)
    assert decode.block_m == 16 and prefill.block_m == 128
    tiny = moe_config(8192, 8, 128, 80, 48, torch.float32)
    assert tiny.block_n == tiny.block_k == 64 and tiny.num_stages == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("tokens", [8, 256])
def test_fused_moe_issues_no_host_sync(tokens):
    """No sync in eager mode (sync debug mode raises on one), and a CUDA graph captured on one
    routing replays another (every copy to one expert) exactly as an eager call computes it."""
    from stepserve.kernels.triton.moe import fused_moe

    device, top_k, experts = "cuda", 8, 128
    hidden, inner = sizes(device)
    w13, w2 = make_experts(experts, hidden, inner, torch.bfloat16, device)
    weights, ids = routing(tokens, top_k, experts, "router", device)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe(x, w13, w2, weights, ids)  # also compiles every kernel before the capture
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    new_weights, new_ids = routing(tokens, top_k, experts, "one", device, seed=9)
    x.copy_(torch.randn_like(x))
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    assert torch.equal(out, fused_moe(x, w13, w2, weights, ids))
    assert rel_err(out, experts_reference(x.float(), w13.float(), w2.float(), weights, ids)) <= 1e-2
