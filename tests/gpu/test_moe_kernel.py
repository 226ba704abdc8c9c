"""The fused MoE kernel (``kernels/triton/moe.py``) against its PyTorch twin ``experts_reference``
run in float32 on the same weights, on CUDA and (smaller, without bf16) under Triton's interpreter;
the fused router against ``route_reference``; both paths of ``align`` against the layout the
GEMMs read.

Bounds (relative L2 error): bf16 <= 1e-2 (the kernel rounds gate, up, the activation and each
expert's output to bf16, as the reference does in bf16: a few 2^-9 roundings in a row); float32
<= 1e-5 (only the order of the sums differs). Every buffer the kernels allocate starts as NaN
(integers: -7, no copy, count or expert), so a row they fail to write, or a padding row that leaks
into a sum, shows up as a non-finite output or a wrong layout. The router's expert ids must be
equal, its weights equal within float32 rounding (relative 1e-6: the sums' order differs).
"""

import pytest
import torch

from stepserve.models.moe import experts_reference, route, route_reference

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
    """Every tensor from ``torch.empty`` / ``torch.empty_like`` starts as NaN, or -7 if int32/int64."""
    empty, empty_like = torch.empty, torch.empty_like

    def garbage(make):
        def make_garbage(*args, **kwargs):
            t = make(*args, **kwargs)
            if t.is_floating_point():
                return t.fill_(float("nan"))
            return t.fill_(-7) if t.dtype in (torch.int32, torch.int64) else t

        return make_garbage

    monkeypatch.setattr(torch, "empty", garbage(empty))
    monkeypatch.setattr(torch, "empty_like", garbage(empty_like))


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


@pytest.mark.parametrize("tokens", [1, 7, 32, 64, 1000, 8192])
@pytest.mark.parametrize("top_k", [2, 8])
@pytest.mark.parametrize("experts", [8, 128])
def test_fused_moe_matches_reference(tokens, top_k, experts, device, poisoned):
    """Routed by the model's router, for decode (16-row tiles; up to 32 tokens at top-8, grouped
    by one program) and prefill (up to 128-row tiles)."""
    if not on_cuda(device) and tokens > 64:
        pytest.skip("the interpreter takes the small batches only")
    for dtype in dtypes(device):
        check_against_reference(tokens, top_k, experts, "router", dtype, device)


@pytest.mark.parametrize("batch", ["decode", "prefill"])
@pytest.mark.parametrize("kind", ["skewed", "one"])
@pytest.mark.parametrize("experts", [8, 128])
def test_fused_moe_uneven_routing(batch, kind, experts, device, poisoned):
    """Most copies to a few experts, and every copy to one: long groups beside empty ones, grouped
    by one program (decode) and by several (prefill)."""
    if batch == "decode":
        tokens = 16
    else:
        tokens = 1000 if on_cuda(device) else 72  # 72 copies an expert on average: 128-row tiles
    for dtype in dtypes(device):
        check_against_reference(tokens, 8, experts, kind, dtype, device)


@pytest.mark.parametrize("few", ["one", "most"])
@pytest.mark.parametrize("kind", ["router", "skewed", "one"])
@pytest.mark.parametrize("top_k,experts", [(2, 8), (8, 128)])
def test_few_tokens_take_the_gemvs(few, kind, top_k, experts, device, poisoned, monkeypatch):
    """One token and ``GEMV_MAX_TOKENS``: the two GEMV kernels (the grouping would raise), a
    token's copies on distinct experts, skewed, or all on one; a token more takes the grouping."""
    from stepserve.kernels.triton import moe as K

    tokens = {"one": 1, "most": K.GEMV_MAX_TOKENS}[few]

    def no_grouping(*args):
        raise AssertionError("the grouped path ran")

    monkeypatch.setattr(K, "align", no_grouping)
    for dtype in dtypes(device):
        check_against_reference(tokens, top_k, experts, kind, dtype, device)
    with pytest.raises(AssertionError, match="grouped path"):
        check_against_reference(K.GEMV_MAX_TOKENS + 1, top_k, experts, kind, dtypes(device)[0], device)


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


def check_alignment(ids: torch.Tensor, experts: int, block_m: int, groups, in_copy_order: bool) -> None:
    """The layout the GEMMs (and the LoRA kernels) read: buffers sized by the bound; the groups in
    expert order, each in the fewest whole blocks, marked with its expert, holding exactly the
    copies routed to it (in copy order, if asked) and then padding rows of ``T*K``; -1 for every
    block past them. Rows of those blocks are never read, so they are not checked."""
    flat = ids.cpu().reshape(-1).long()
    num_copies = flat.numel()
    sorted_ids, block_expert = groups.sorted_ids.cpu().long(), groups.block_expert.cpu().long()
    num_blocks = -(-(num_copies + min(experts, num_copies) * (block_m - 1)) // block_m)
    assert block_expert.shape == (num_blocks,) and sorted_ids.shape == (num_blocks * block_m,)
    counts = torch.bincount(flat, minlength=experts)
    blocks = (counts + block_m - 1) // block_m
    used = int(blocks.sum())
    assert torch.equal(block_expert[:used], torch.arange(experts).repeat_interleave(blocks))
    assert (block_expert[used:] == -1).all()
    first = 0
    for expert in torch.nonzero(counts).flatten().tolist():
        count, rows = int(counts[expert]), int(blocks[expert]) * block_m
        group = sorted_ids[first : first + rows]
        routed = torch.nonzero(flat == expert).flatten()
        assert torch.equal(group[:count] if in_copy_order else group[:count].sort().values, routed)
        assert (group[count:] == num_copies).all()
        first += rows


@pytest.mark.parametrize("kind", ["router", "skewed", "one"])
def test_align_groups_copies_by_expert(kind, device, poisoned):
    """Many copies (several programs): every copy once, in a block of its expert; each group
    padded to the fewest whole blocks; blocks past them marked -1; padding rows point past the
    last copy."""
    from stepserve.kernels.triton.moe import ALIGN_ONE_PROGRAM, align

    tokens, top_k, experts, block_m = 300, 8, 16, 16
    assert tokens * top_k > ALIGN_ONE_PROGRAM
    _, ids = routing(tokens, top_k, experts, kind, device)
    check_alignment(ids, experts, block_m, align(ids, experts, block_m), in_copy_order=False)


@pytest.mark.parametrize("kind", ["router", "skewed", "one"])
@pytest.mark.parametrize("copies", [1, 8, 16, 17, 56, 64, 65, 255, 256, 257])
@pytest.mark.parametrize("experts,block_m", [(8, 16), (60, 16), (128, 16), (9, 64)])
def test_align_small_batches_in_one_program(kind, copies, experts, block_m, device, poisoned, monkeypatch):
    """Up to ``ALIGN_ONE_PROGRAM`` copies, one program writes the layout the many-program path
    writes, each group in copy order; past it, the many-program path serves. Copies of decode
    (top-8) where they divide by 8, of LoRA (top-1, an adapter slot a token) elsewhere; 16, 64
    and 256 end the one-program path's tiles, 256 the path."""
    from stepserve.kernels.triton import moe

    assert moe.ALIGN_ONE_PROGRAM == 256, "move the edge cases (255, 256, 257) with the limit"
    top_k = 8 if copies % 8 == 0 else 1
    _, ids = routing(copies // top_k, top_k, experts, kind, device, seed=copies)
    small = moe.align(ids, experts, block_m)
    check_alignment(ids, experts, block_m, small, in_copy_order=copies <= moe.ALIGN_ONE_PROGRAM)
    monkeypatch.setattr(moe, "ALIGN_ONE_PROGRAM", 0)  # every size to the many-program path
    many = moe.align(ids, experts, block_m)
    check_alignment(ids, experts, block_m, many, in_copy_order=False)
    assert torch.equal(small.block_expert, many.block_expert)


def route_logits(tokens: int, experts: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """Router logits [T, E] without ties: float32 normals spread as a trained router's (x3); in 16
    bits, each row a shuffle of distinct multiples of 1/8 (exact in bf16 and fp16)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        logits = 3 * torch.randn(tokens, experts, generator=gen)
    else:
        logits = (torch.rand(tokens, experts, generator=gen).argsort(dim=1) - experts // 2) / 8
    return logits.to(dtype).to(device)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("experts", [8, 60, 128])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_fused_route_matches_reference(tokens, experts, top_k, renormalize, device, poisoned):
    """The experts torch.topk picks, in its order (descending weight), and their weights within
    float32 rounding, on float32 logits and on the model's 16-bit ones."""
    from stepserve.kernels.triton.moe import fused_route

    for dtype in [torch.float32, dtypes(device)[-1]]:
        logits = route_logits(tokens, experts, dtype, device, seed=tokens * experts + top_k)
        weights, ids = fused_route(logits, top_k, renormalize)
        ref_weights, ref_ids = route_reference(logits, top_k, renormalize)
        assert ids.dtype == torch.int32 and weights.dtype == torch.float32
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize("logits_kind", ["distinct", "ties", "nan"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k,experts", [(1, 8), (2, 60), (8, 128)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 7])
def test_routed_moe_is_the_router_then_the_experts(tokens, top_k, experts, renormalize, logits_kind, device, poisoned):
    """``routed_moe`` (the GEMVs routing for themselves up to ``GEMV_MAX_TOKENS`` tokens, else
    ``fused_route`` then ``fused_moe``) equals ``fused_moe`` on ``fused_route``'s choice bit for
    bit, and the references within the bound: distinct logits, ties (all equal: the lowest
    experts), and a row of NaN logits (a faulty pass) still naming real experts."""
    from stepserve.kernels.triton.moe import fused_moe, fused_route, routed_moe

    hidden, inner = sizes(device)
    for dtype in dtypes(device):
        w13, w2 = make_experts(experts, hidden, inner, dtype, device)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
        logits = route_logits(tokens, experts, dtype, device, seed=tokens)
        if logits_kind == "ties":
            logits[0] = 0.5
        elif logits_kind == "nan":
            logits[-1] = float("nan")
        got = routed_moe(x, logits, top_k, renormalize, w13, w2)
        weights, ids = fused_route(logits, top_k, renormalize)
        torch.testing.assert_close(got, fused_moe(x, w13, w2, weights, ids), rtol=0, atol=0, equal_nan=True)
        if logits_kind == "nan":
            assert torch.isnan(got[-1]).all() and (ids[-1] >= 0).all() and (ids[-1] < experts).all()
            got, logits, x, weights, ids = got[:-1], logits[:-1], x[:-1], weights[:-1], ids[:-1]
            if not len(x):
                continue
        elif logits_kind == "ties":  # torch.topk may take any of equal values: the choice is fused_route's
            assert ids[0].tolist() == list(range(top_k))
        else:
            assert torch.equal(ids, route_reference(logits.float(), top_k, renormalize)[1])
        ref = experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
        assert rel_err(got, ref) <= BOUND[dtype]


def test_fused_route_ties_take_the_lowest_expert(device):
    """Equal logits (common in bf16) rank by expert index, where torch.topk leaves their order open."""
    from stepserve.kernels.triton.moe import fused_route

    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, 1.0], [0.5] * 6])
    weights, ids = fused_route(logits.to(device), 4, renormalize=False)
    assert ids.tolist() == [[1, 3, 4, 2], [0, 1, 2, 3]]
    probs = torch.softmax(logits, dim=-1).gather(1, ids.cpu().long())
    torch.testing.assert_close(weights.cpu(), probs, rtol=1e-6, atol=0)


def test_fused_route_names_real_experts_for_non_finite_logits(device):
    """A faulty pass's NaN or infinite router logits still give ids of real experts (the finite
    check fails the request later); an id past the last would send the grouping out of bounds."""
    from stepserve.kernels.triton.moe import fused_route

    nan = float("nan")
    logits = torch.tensor(
        [[nan] * 6, [0.0, nan, 1.0, nan, 2.0, 0.5], [float("inf"), 0.0, -float("inf"), 1.0, 1.0, 1.0]]
    )
    _, ids = fused_route(logits.to(device), 3, renormalize=True)
    assert ((ids >= 0) & (ids < 6)).all()


def test_fused_route_no_tokens(device):
    from stepserve.kernels.triton.moe import fused_route

    weights, ids = fused_route(torch.empty(0, 8, device=device), 2, renormalize=True)
    assert weights.shape == ids.shape == (0, 2)


def test_config_by_tokens_per_expert(device):
    from stepserve.kernels.triton.moe import moe_config

    decode = moe_config(16, 8, 128, 2048, 768, torch.bfloat16)
    prefill = moe_config(8192, 8, 128, 2048, 768, torch.bfloat16)
    assert decode.block_m == 16 and prefill.block_m == 128
    tiny = moe_config(8192, 8, 128, 80, 48, torch.float32)
    assert tiny.block_n == tiny.block_k == 64 and tiny.num_stages == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("tokens", [1, 8, 256])  # the GEMVs, and the grouping by one program and by several
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_fused_route_issues_no_host_sync():
    """``route`` on CUDA is the fused kernel: no sync in eager mode, and a CUDA graph captured on
    one batch of logits replays another as an eager call computes it."""
    from stepserve.kernels.triton.moe import fused_route

    logits = route_logits(24, 128, torch.bfloat16, "cuda", seed=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        route(logits, 8, True)  # also compiles the kernel before the capture
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route(logits, 8, True)
    logits.copy_(route_logits(24, 128, torch.bfloat16, "cuda", seed=1))
    graph.replay()
    ref_weights, ref_ids = fused_route(logits, 8, True)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
    assert torch.equal(ids, route_reference(logits, 8, True)[1])


def expert_lora(slots: int, experts: int, hidden: int, inner: int, rank: int, dtype, device, seed=0):
    """Random adapters of the stacked experts for ``slots`` slots (pairs slot * E + e), rank
    ``rank`` padded to twice it on gate/up as the model's buffers are; large enough to move the
    output."""
    gen = torch.Generator().manual_seed(seed)
    pairs = slots * experts

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    a13 = torch.zeros(pairs, 2 * rank, hidden, dtype=dtype, device=device)
    a13[:, :rank] = rand(pairs, rank, hidden, scale=hidden**-0.5)
    b13 = torch.zeros(pairs, 2 * inner, 2 * rank, dtype=dtype, device=device)
    b13[:, :, :rank] = rand(pairs, 2 * inner, rank, scale=rank**-0.5)
    return a13, b13, rand(pairs, rank, inner, scale=inner**-0.5), rand(pairs, hidden, rank, scale=rank**-0.5)


@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("top_k,experts", [(2, 8), (8, 128)])
def test_fused_moe_with_expert_adapters(tokens, top_k, experts, device, poisoned):
    """Adapters of the stacked experts (``ExpertLoraInputs``): tokens on two adapters and on the
    base in turn, against the reference in float32; and the delta really moves the output (the
    same call with every token on the base is far from it)."""
    from stepserve.kernels.triton.moe import GEMV_MAX_TOKENS, fused_moe
    from stepserve.models.lora import ExpertLoraInputs

    if not on_cuda(device) and tokens > 64:
        pytest.skip("the interpreter takes the small batches only")
    hidden, inner = sizes(device)
    for dtype in dtypes(device):
        w13, w2 = make_experts(experts, hidden, inner, dtype, device)
        weights, ids = routing(tokens, top_k, experts, "router", device, seed=tokens)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        adapters = expert_lora(2, experts, hidden, inner, 4, dtype, device)
        slots = torch.tensor([(t % 3) - 1 for t in range(tokens)], dtype=torch.int32, device=device)  # -1, 0, 1
        got = fused_moe(x, w13, w2, weights, ids, lora=ExpertLoraInputs(*adapters, slots))
        wide = ExpertLoraInputs(*(t.float() for t in adapters), slots)
        ref = experts_reference(x.float(), w13.float(), w2.float(), weights, ids, lora=wide)
        assert rel_err(got, ref) <= BOUND[dtype]
        base = experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
        if tokens > 1:  # token 0 is on the base
            assert rel_err(base, ref) > 0.05
        plain = fused_moe(x, w13, w2, weights, ids)  # up to GEMV_MAX_TOKENS tokens the GEMVs: other sums' order
        if tokens > GEMV_MAX_TOKENS:
            assert torch.equal(got[0], plain[0]) or dtype != torch.float32
        assert rel_err(got[0], plain[0]) <= BOUND[dtype]
