"""The batched LoRA kernels (``kernels/triton/lora.py``) against ``lora_reference`` on copies of
the same inputs, on CUDA and (smaller, without bf16) under Triton's interpreter.

Bounds (relative L2 error of the delta, on the rows with an adapter): 16-bit <= 1e-2 (both round
the shrink to the activations' dtype and the sum once; only the order of the float32 sums
differs); float32 <= 1e-5. Rows without an adapter must come back bit for bit: their ``x`` rows
are NaN, so a kernel that computes them, or leaks them into another row, fails. Every buffer the
kernels allocate starts as NaN, so an unwritten row that is read shows up as a non-finite output.
"""

import pytest
import torch

from stepserve.models.lora import lora_reference

BOUND = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
RANKS = (8, 16, 64)  # the adapters' own ranks, zero-padded to the server's R


def on_cuda(device: str) -> bool:
    return device == "cuda"


def dtypes(device: str) -> list[torch.dtype]:
    # the interpreter mishandles bf16
    return [torch.bfloat16, torch.float16] if on_cuda(device) else [torch.float32, torch.float16]


def sizes(device: str) -> tuple[int, int]:
    """(K, N): a 7B-class projection on CUDA; under the interpreter, small ones that are no multiple of the tiles."""
    return (4096, 6144) if on_cuda(device) else (300, 72)


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


def make_adapters(num_slots: int, rank: int, hidden: int, out: int, dtype: torch.dtype, device: str, seed: int = 0):
    """(lora_a [S, R, K], lora_b [S, N, R]): slot ``s`` of rank ``RANKS[s % 3]`` (at most R), zero-padded."""
    gen = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(num_slots, rank, hidden, generator=gen) / hidden**0.5
    lora_b = torch.randn(num_slots, out, rank, generator=gen)
    for s in range(num_slots):
        own = min(RANKS[s % len(RANKS)], rank)
        lora_a[s, own:] = 0
        lora_b[s, :, own:] = 0
        lora_b[s] /= own**0.5
    return lora_a.to(dtype).to(device), lora_b.to(dtype).to(device)


def assign(tokens: int, num_slots: int, kind: str, device: str, seed: int = 0) -> torch.Tensor:
    """slots [T] int32: uniform over -1..S-1 (``mixed``); all -1 (``none``); all the last slot (``one``)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "mixed":
        slots = torch.randint(-1, num_slots, (tokens,), generator=gen, dtype=torch.int32)
    else:
        slots = torch.full((tokens,), -1 if kind == "none" else num_slots - 1, dtype=torch.int32)
    return slots.to(device)


def inputs(tokens: int, hidden: int, out: int, slots: torch.Tensor, dtype: torch.dtype, device: str, seed: int = 1):
    """(y [T, N], x [T, K]); the rows of ``x`` without an adapter are NaN."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(tokens, out, generator=gen).to(dtype).to(device)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
    x[slots < 0] = float("nan")
    return y, x


def check_against_reference(tokens, num_slots, kind, rank, dtype, device):
    from stepserve.kernels.triton.lora import lora_delta

    hidden, out = sizes(device)
    lora_a, lora_b = make_adapters(num_slots, rank, hidden, out, dtype, device)
    slots = assign(tokens, num_slots, kind, device, seed=tokens)
    y, x = inputs(tokens, hidden, out, slots, dtype, device)
    got = lora_delta(y.clone(), x, lora_a, lora_b, slots)
    ref = lora_reference(y.clone(), x, lora_a, lora_b, slots)
    assert got.dtype == dtype and got.shape == (tokens, out)
    none = slots < 0
    assert torch.equal(got[none], y[none])
    if none.all():
        return
    err = rel_err(got[~none] - y[~none].double(), ref[~none] - y[~none].double())
    print(f"T={tokens} S={num_slots} R={rank} {kind} {dtype}: relative error {err:.2e}")
    assert err <= BOUND[dtype]


@pytest.mark.parametrize("tokens", [1, 7, 64, 1000, 8192])
@pytest.mark.parametrize("num_slots", [1, 3, 8])
def test_lora_delta_matches_reference(tokens, num_slots, device, poisoned):
    """Slots mixed per batch, -1 rows among them, for decode (16-token tiles, the shrink split
    16 ways) and prefill (64-token tiles, unsplit)."""
    for dtype in dtypes(device):
        check_against_reference(tokens, num_slots, "mixed", 64, dtype, device)


@pytest.mark.parametrize("kind", ["none", "one"])
@pytest.mark.parametrize("tokens", [7, 1000])
def test_lora_delta_uniform_slots(kind, tokens, device, poisoned):
    """A batch without adapters leaves ``y`` as it was; a batch of one slot is one group."""
    for dtype in dtypes(device):
        check_against_reference(tokens, 4, kind, 64, dtype, device)


@pytest.mark.parametrize("tokens", [7, 300])
def test_lora_delta_fused_rank(tokens, device, poisoned):
    """R = 192, a fused qkv's three slices of rank 64: three rank tiles in the shrink, three
    reduction steps in the expand."""
    for dtype in dtypes(device):
        check_against_reference(tokens, 3, "mixed", 192, dtype, device)


@pytest.mark.parametrize("tokens", [1, 300])
def test_lora_delta_shares_grouping(tokens, device, poisoned):
    """The calls of one forward share the grouping through ``cache``: projections of other widths
    and ranks (a fused qkv, a down projection) each still equal the reference, the cache holds one
    grouping per tile height, and new slots (a new tensor) are grouped again."""
    from stepserve.kernels.triton.lora import lora_delta

    dtype, num_slots = dtypes(device)[0], 4
    hidden, out = sizes(device)
    cache: dict = {}
    for step in range(2):
        slots = assign(tokens, num_slots, "mixed", device, seed=step)
        for rank, (k, n) in [(192, (hidden, out)), (16, (out, hidden))]:
            lora_a, lora_b = make_adapters(num_slots, rank, k, n, dtype, device, seed=rank)
            y, x = inputs(tokens, k, n, slots, dtype, device, seed=step)
            got = lora_delta(y.clone(), x, lora_a, lora_b, slots, cache)
            ref = lora_reference(y.clone(), x, lora_a, lora_b, slots)
            none = slots < 0
            assert torch.equal(got[none], y[none])
            if not none.all():
                assert rel_err(got[~none] - y[~none].double(), ref[~none] - y[~none].double()) <= BOUND[dtype]
        assert len(cache) == step + 1


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_split_partials_summed_by_a_kernel_of_their_own(tokens, device, poisoned, monkeypatch):
    """``sum_in_expand=False``: the shrink's split partials summed before the expand, not in it;
    the same results."""
    import dataclasses

    from stepserve.kernels.triton import lora as K

    chosen = K.lora_config

    def split_summed_apart(*args):
        cfg = chosen(*args)
        return dataclasses.replace(cfg, split_k=max(2, cfg.split_k), sum_in_expand=False)

    monkeypatch.setattr(K, "lora_config", split_summed_apart)
    for dtype in dtypes(device):
        check_against_reference(tokens, 3, "mixed", 64, dtype, device)


def test_lora_delta_no_tokens(device):
    from stepserve.kernels.triton.lora import lora_delta

    hidden, out = sizes(device)
    dtype = dtypes(device)[0]
    lora_a, lora_b = make_adapters(2, 16, hidden, out, dtype, device)
    y = torch.empty(0, out, dtype=dtype, device=device)
    x = torch.empty(0, hidden, dtype=dtype, device=device)
    assert lora_delta(y, x, lora_a, lora_b, torch.empty(0, dtype=torch.int32, device=device)) is y


def test_config_by_tokens(device):
    from stepserve.kernels.triton.lora import lora_config

    decode = lora_config(1, 64, 4096, 6144, torch.bfloat16)
    prefill = lora_config(8192, 192, 4096, 6144, torch.bfloat16)
    assert (decode.block_m, decode.split_k, decode.block_n, decode.sum_in_expand) == (16, 16, 128, True)
    assert (prefill.block_m, prefill.split_k, prefill.sum_in_expand) == (64, 4, False)
    tiny = lora_config(1, 8, 40, 24, torch.float32)
    assert (tiny.block_r, tiny.block_k, tiny.split_k, tiny.block_n, tiny.num_stages) == (16, 64, 1, 32, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("tokens", [8, 256])
def test_lora_delta_issues_no_host_sync(tokens):
    """No sync in eager mode (sync debug mode raises on one), and a CUDA graph captured on one
    slot assignment replays another (one slot, then mixed with -1 rows) exactly as an eager call
    computes it, leaving the rows without an adapter as they were."""
    from stepserve.kernels.triton.lora import lora_delta

    device, dtype, num_slots = "cuda", torch.bfloat16, 8
    hidden, out = sizes(device)
    lora_a, lora_b = make_adapters(num_slots, 64, hidden, out, dtype, device)
    slots = assign(tokens, num_slots, "mixed", device)
    y, x = inputs(tokens, hidden, out, slots, dtype, device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        lora_delta(y, x, lora_a, lora_b, slots)  # also compiles every kernel before the capture
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_delta(y, x, lora_a, lora_b, slots)
    for kind, seed in [("one", 7), ("mixed", 9)]:
        new_slots = assign(tokens, num_slots, kind, device, seed=seed)
        new_y, new_x = inputs(tokens, hidden, out, new_slots, dtype, device, seed=seed)
        y.copy_(new_y)
        x.copy_(new_x)
        slots.copy_(new_slots)
        graph.replay()
        assert torch.equal(y, lora_delta(new_y.clone(), new_x, lora_a, lora_b, new_slots))
        ref = lora_reference(new_y.clone(), new_x, lora_a, lora_b, new_slots)
        none = new_slots < 0
        assert torch.equal(y[none], new_y[none])
        assert rel_err(y[~none] - new_y[~none].double(), ref[~none] - new_y[~none].double()) <= 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles happen on CUDA")
def test_warm_up_leaves_no_variant_to_compile():
    """After ``warm_up`` for a projection's shapes, a call of any token count up to the bound
    compiles nothing: an eager prefill pass of an odd size must not stall on a compile."""
    import triton

    from stepserve.kernels.triton.lora import lora_delta, warm_up

    device, dtype, num_slots = "cuda", torch.bfloat16, 8
    hidden, out = sizes(device)
    lora_a, lora_b = make_adapters(num_slots, 48, hidden, out, dtype, device)
    assert warm_up(lora_a, lora_b, 8192) > 0
    compiled = []
    triton.knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(kw["repr"])
    try:
        for tokens in (2, 3, 31, 63, 99, 257, 777, 2146, 4095, 6001, 8192):
            slots = assign(tokens, num_slots, "mixed", device, seed=tokens)
            y, x = inputs(tokens, hidden, out, slots, dtype, device)
            lora_delta(y, x, lora_a, lora_b, slots)
    finally:
        triton.knobs.runtime.jit_post_compile_hook = None
    assert compiled == []


@pytest.fixture(params=[False, True], ids=["shrink-launch", "shrink-in-launch"])
def shrink_in_launch(request, monkeypatch):
    """``lora_gemv`` both ways: the shrink as a launch of its own (the default), and inside the
    GEMV's launch (``gemv.SHRINK_IN_LAUNCH``)."""
    from stepserve.kernels.triton import gemv as G

    monkeypatch.setattr(G, "SHRINK_IN_LAUNCH", request.param)
    return request.param


@pytest.mark.parametrize("kind", ["none", "one", "first"])
@pytest.mark.parametrize("rank", [16, 48])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_gemv_is_the_projection_plus_the_delta(device, poisoned, shrink_in_launch, kind, rank, bias):
    """One row (batch-1 decode): ``lora_gemv`` equals the projection rounded to the dtype, then
    ``lora_reference``'s delta; a row on the base (slot -1) is the projection alone, reading none
    of the unwritten partials (NaN)."""
    from stepserve.kernels.triton.lora import lora_gemv

    hidden, out = sizes(device)
    for dtype in dtypes(device):
        gen = torch.Generator().manual_seed(rank)
        weight = (torch.randn(out, hidden, generator=gen) / hidden**0.5).to(dtype).to(device)
        b = torch.randn(out, generator=gen).to(dtype).to(device) if bias else None
        x = torch.randn(1, hidden, generator=gen).to(dtype).to(device)
        lora_a, lora_b = make_adapters(3, rank, hidden, out, dtype, device, seed=rank)
        slot = {"none": -1, "one": 2, "first": 0}[kind]
        slots = torch.tensor([slot], dtype=torch.int32, device=device)
        base = x.double() @ weight.double().T + (b.double() if bias else 0)
        got = lora_gemv(x, weight, b, lora_a, lora_b, slots)
        assert got.dtype == dtype and got.shape == (1, out)
        if kind == "none":
            assert rel_err(got, base) <= BOUND[dtype]
            continue
        rounded = base.to(dtype)
        ref = lora_reference(rounded.clone(), x, lora_a, lora_b, slots)
        err = rel_err(got.double() - rounded.double(), ref.double() - rounded.double())
        print(f"lora_gemv R={rank} slot {slot} bias {bias} {dtype}: relative error of the delta {err:.2e}")
        assert err <= BOUND[dtype]


def test_lora_gemv_is_one_launch_that_leaves_its_counters_zero(device, poisoned, monkeypatch):
    """With ``SHRINK_IN_LAUNCH`` the shrink runs inside the GEMV's launch: one kernel a
    projection, whose programs draw tickets and wait for the shrink's count; the launch's last
    program zeroes the counters, so the next launch (alternating adapters, the base and the
    gated form, and on CUDA 200 replays of one graph) starts from zero and each result is its
    own row's."""
    from stepserve.kernels.triton import gemv as G
    from stepserve.kernels.triton.lora import lora_gemv

    monkeypatch.setattr(G, "SHRINK_IN_LAUNCH", True)

    hidden, out = sizes(device)
    dtype = dtypes(device)[0]
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(out, hidden, generator=gen) / hidden**0.5).to(dtype).to(device)
    lora_a, lora_b = make_adapters(3, 16, hidden, out, dtype, device, seed=3)
    xs = [torch.randn(1, hidden, generator=gen).to(dtype).to(device) for _ in range(4)]

    def check(got: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, what: str) -> None:
        projected = (x.double() @ weight.double().T).to(dtype)
        if slots.item() < 0:
            assert rel_err(got, projected) <= BOUND[dtype], what
            return
        want = lora_reference(projected.clone(), x, lora_a, lora_b, slots)
        assert rel_err(got.double() - projected.double(), want.double() - projected.double()) <= BOUND[dtype], what

    for i in range(50 if on_cuda(device) else 6):
        slots = torch.tensor([(i % 4) - 1], dtype=torch.int32, device=device)
        if i % 5 == 4:  # the gated form between them
            lora_gemv(xs[i % 4], weight, None, lora_a, lora_b, slots, silu_mul=True)
        else:
            check(lora_gemv(xs[i % 4], weight, None, lora_a, lora_b, slots), xs[i % 4], slots, f"call {i}")
        assert G._lora_counters(xs[0].device).tolist() == [0, 0, 0, 0], f"call {i}"
    if not on_cuda(device):
        return
    slots = torch.tensor([1], dtype=torch.int32, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        lora_gemv(xs[0], weight, None, lora_a, lora_b, slots)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels == ["_gemv_kernel"], kernels
    x = xs[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lora_gemv(x, weight, None, lora_a, lora_b, slots)
    for i in range(200):
        slots.fill_((i % 4) - 1)
        x.copy_(xs[i % 4])
        graph.replay()
        check(y, x, slots, f"replay {i}")
    assert G._lora_counters(x.device).tolist() == [0, 0, 0, 0]


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``fused.silu_and_mul``'s rounding in PyTorch: silu(gate) rounded, times up, rounded."""
    gate, up = gate_up.chunk(2, dim=-1)
    g = gate.double()
    return ((g / (1 + torch.exp(-g))).to(gate.dtype).double() * up.double()).to(gate.dtype)


@pytest.mark.parametrize("kind", ["none", "one"])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_gemv_silu_mul_is_the_activation_of_the_adapted_projection(device, poisoned, shrink_in_launch, kind, bias):
    """The gated MLP's gate/up at one row: ``lora_gemv(silu_mul=True)`` equals ``silu_and_mul``
    of the adapted projection (the projection rounded, ``lora_reference``'s delta on gate and up
    rows alike), the base's row (slot -1) that of the projection alone."""
    from stepserve.kernels.triton.lora import lora_gemv

    hidden, inner = sizes(device)
    for dtype in dtypes(device):
        gen = torch.Generator().manual_seed(7)
        weight = (torch.randn(2 * inner, hidden, generator=gen) / hidden**0.5).to(dtype).to(device)
        b = torch.randn(2 * inner, generator=gen).to(dtype).to(device) if bias else None
        x = torch.randn(1, hidden, generator=gen).to(dtype).to(device)
        lora_a, lora_b = make_adapters(3, 16, hidden, 2 * inner, dtype, device, seed=7)
        lora_b[:, inner:] *= -2  # up's rows unlike gate's: a delta on the wrong half shows
        slots = torch.tensor([{"none": -1, "one": 1}[kind]], dtype=torch.int32, device=device)
        rounded = (x.double() @ weight.double().T + (b.double() if bias else 0)).to(dtype)
        adapted = lora_reference(rounded.clone(), x, lora_a, lora_b, slots)
        got = lora_gemv(x, weight, b, lora_a, lora_b, slots, silu_mul=True)
        assert got.dtype == dtype and got.shape == (1, inner)
        want = silu_mul_reference(adapted)
        assert kind == "none" or rel_err(want, silu_mul_reference(rounded)) > 10 * BOUND[dtype]  # the delta matters
        assert rel_err(got, want) <= BOUND[dtype]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-row path runs on CUDA only")
def test_a_one_row_pass_of_the_gated_mlp_takes_one_gemv_in_a_graph(monkeypatch):
    """``GatedMLP`` at one row on CUDA: gate/up and its activation in one GEMV (``gemv_silu_mul``;
    with adapters ``lora_gemv(silu_mul=True)``, captured and replayed for other slots and the
    base's -1), equal to the path of two rows (cuBLAS, ``lora_delta``, ``silu_and_mul``) on the
    same row twice."""
    from types import SimpleNamespace

    from stepserve.kernels.triton import gemv as G
    from stepserve.kernels.triton import lora as K
    from stepserve.models.layers import GatedMLP
    from stepserve.models.lora import LoraLinear, LoraState

    device, dtype, hidden, inner = "cuda", torch.bfloat16, 2048, 5632
    cfg = SimpleNamespace(hidden_size=hidden, intermediate_size=inner, mlp_bias=False, activation="silu")
    mlp = GatedMLP(cfg).to(device, dtype)
    calls = []
    for module, name, tag in ((G, "gemv_silu_mul", "gemv"), (K, "lora_gemv", "lora")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, tag=tag, **kw: calls.append(tag) or real(*a, **kw))

    x = torch.randn(1, hidden, device=device, dtype=dtype)
    got = mlp(x)
    assert calls == ["gemv"]
    assert rel_err(got, mlp(torch.cat([x, x]))[:1]) <= BOUND[dtype]  # two rows: cuBLAS, then silu_and_mul
    state = LoraState()
    mlp.gate_up_proj = LoraLinear(mlp.gate_up_proj, (inner, inner), max_loras=3, max_rank=16, state=state)
    lora_a, lora_b = make_adapters(3, 32, hidden, 2 * inner, dtype, device)  # R: 16 a slice, gate's and up's
    mlp.gate_up_proj.lora_a.copy_(lora_a)
    mlp.gate_up_proj.lora_b.copy_(lora_b)
    state.slots = torch.tensor([0], dtype=torch.int32, device=device)
    calls.clear()
    mlp(x)  # compiles before the capture
    assert calls == ["lora"]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mlp(x)
    for slot in (2, -1, 1):
        slots = state.slots
        slots.fill_(slot)
        x.copy_(torch.randn(1, hidden, device=device, dtype=dtype))
        graph.replay()
        state.slots = torch.tensor([slot, slot], dtype=torch.int32, device=device)
        calls.clear()
        want = mlp(torch.cat([x, x]))[:1]  # two rows: cuBLAS, lora_delta, silu_and_mul
        assert calls == []
        state.slots = slots
        assert rel_err(y, want) <= BOUND[dtype], f"slot {slot}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-row path runs on CUDA only")
def test_a_one_row_pass_of_an_adapted_projection_takes_lora_gemv_in_a_graph(monkeypatch):
    """``LoraLinear`` on a bf16 ``nn.Linear``: one row goes through ``lora_gemv`` (captured in a
    CUDA graph, replayed for other slots, the base's -1 too), equal to the float64 projection
    rounded, plus ``lora_reference``'s delta; two rows keep the projection then ``lora_delta``."""
    from torch import nn

    from stepserve.kernels.triton import lora as K
    from stepserve.models.lora import LoraLinear, LoraState

    device, dtype = "cuda", torch.bfloat16
    hidden, out = sizes(device)
    state = LoraState()
    base = nn.Linear(hidden, out, bias=False, device=device, dtype=dtype)
    linear = LoraLinear(base, (out,), max_loras=3, max_rank=16, state=state)
    lora_a, lora_b = make_adapters(3, 16, hidden, out, dtype, device)
    linear.lora_a.copy_(lora_a)
    linear.lora_b.copy_(lora_b)
    assert linear.one_row_gemv()
    calls = []
    monkeypatch.setattr(K, "lora_gemv", lambda *args, real=K.lora_gemv: calls.append(1) or real(*args))

    def expected(x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projected = (x.double() @ base.weight.double().T).to(dtype)
        return projected, lora_reference(projected.clone(), x, lora_a, lora_b, slots)

    state.slots = torch.tensor([0], dtype=torch.int32, device=device)
    x = torch.randn(1, hidden, device=device, dtype=dtype)
    linear(x)  # compiles before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x)
    for slot in (2, -1, 1):
        state.slots.fill_(slot)
        x.copy_(torch.randn(1, hidden, device=device, dtype=dtype))
        graph.replay()
        projected, ref = expected(x, state.slots)
        if slot < 0:
            assert rel_err(y, projected) <= BOUND[dtype]
        else:
            assert rel_err(y.double() - projected.double(), ref.double() - projected.double()) <= BOUND[dtype]
    assert calls  # the one-row path ran
    calls.clear()
    state.slots = torch.tensor([1, -1], dtype=torch.int32, device=device)
    two = torch.randn(2, hidden, device=device, dtype=dtype)
    two[1] = float("nan")  # the base row of the old path: lora_delta never reads it
    got = linear(two)
    assert not calls
    projected, ref = expected(two[:1], state.slots[:1])
    assert rel_err(got[:1].double() - projected.double(), ref.double() - projected.double()) <= BOUND[dtype]
