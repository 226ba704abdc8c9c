"""The Triton paged attention kernels against the SDPA reference, on fresh random inputs.

Each case draws a new batch (context lengths, query runs, scattered block tables, cache contents),
poisons the output with NaN, and compares with SDPA over gathered pages computed in float32.
"""

import pytest
import torch

from attention_batches import make_batch, to_fp8_cache
from stepserve.attention.base import AttentionMetadata
from stepserve.attention.sdpa import SdpaBackend


def reference(q, k, v, cache, meta, scale):
    """SDPA over gathered pages, in float64 on the CPU; returns the output and the written cache."""
    fields = {f: getattr(meta, f) for f in meta.__dataclass_fields__ if f != "extras"}
    moved = AttentionMetadata(**{f: (x.cpu() if torch.is_tensor(x) else x) for f, x in fields.items()})
    backend = SdpaBackend()
    backend.prepare(moved)
    cache64 = cache.double().cpu()
    out = backend.forward(q.double().cpu(), k.double().cpu(), v.double().cpu(), cache64, moved, scale)
    return out, cache64


def run_triton(q, k, v, cache, meta, scale):
    from stepserve.attention.triton_backend import TritonBackend

    backend = TritonBackend()
    backend.prepare(meta)
    return backend.forward(q, k, v, cache, meta, scale)


def check(q, k, v, cache, meta, dtype):
    if q.device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter mishandles bf16 stores; bf16 is checked on the GPU")
    scale = q.shape[-1] ** -0.5
    ref, ref_cache = reference(q, k, v, cache.clone(), meta, scale)
    got_cache = cache.clone()
    torch.manual_seed(0)
    out = run_triton(q, k, v, got_cache, meta, scale)
    assert torch.isfinite(out).all(), "some output element was never written (NaN poison survives) or overflowed"
    err = (out.double().cpu() - ref).norm() / ref.norm()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert err <= tol, f"relative error {err:.2e} > {tol}"
    assert torch.equal(got_cache.double().cpu(), ref_cache), "the KV write differs from the reference's"


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every output buffer the backend allocates starts as NaN, so unwritten elements fail."""
    real = torch.empty_like

    def poisoned(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty_like", poisoned)


SHAPES = [
    (32, 8, 128),
    (32, 8, 64),
    (4, 2, 64),
    (12, 12, 64),
    (16, 8, 256),
]  # (heads, kv heads, head dim); the last is Gemma-3-12B's


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_sdpa(device, dtype, shape, block_size):
    heads, kv_heads, head_dim = shape
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed + block_size)
        batch = int(torch.randint(1, 9, (1,), generator=gen))
        ctx = torch.randint(0, 300, (batch,), generator=gen).tolist()
        q, k, v, cache, meta = make_batch([1] * batch, ctx, heads, kv_heads, head_dim, block_size, dtype, device, seed)
        check(q, k, v, cache, meta, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:])
def test_decode_long_context_splits(device, dtype, shape):
    """One sequence of a few thousand tokens: the split-K path and its merge."""
    heads, kv_heads, head_dim = shape
    q, k, v, cache, meta = make_batch([1, 1], [3000, 700], heads, kv_heads, head_dim, 16, dtype, device, 7)
    check(q, k, v, cache, meta, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(9, 3, 64)])  # the last: SmolLM2's group of 3 (not a power of two)
@pytest.mark.parametrize("grouped", [True, False], ids=["gqa-grouped", "one-head"])
def test_prefill_and_mixed_match_sdpa(device, dtype, shape, grouped, monkeypatch):
    """The varlen prefill kernel, with a program per GQA group (the default) and per query head
    (its twin)."""
    import functools

    from stepserve.kernels.triton import attention as K

    monkeypatch.setattr(K, "paged_prefill", functools.partial(K.paged_prefill, grouped=grouped))
    heads, kv_heads, head_dim = shape
    for seed in range(2):
        gen = torch.Generator().manual_seed(100 + seed)
        batch = int(torch.randint(2, 7, (1,), generator=gen))
        q_lens = [int(x) for x in torch.randint(1, 150, (batch,), generator=gen)]
        q_lens[0] = 1  # at least one decoding row beside the prompt chunks
        q_lens[-1] = max(q_lens[-1], 2)
        ctx = [
            int(x) * (i % 2) for i, x in enumerate(torch.randint(0, 200, (batch,), generator=gen))
        ]  # some with a cached prefix
        q, k, v, cache, meta = make_batch(q_lens, ctx, heads, kv_heads, head_dim, 16, dtype, device, seed)
        check(q, k, v, cache, meta, dtype)


def test_num_splits_fill_the_gpu():
    pytest.importorskip("triton")
    from stepserve.attention.triton_backend import MAX_SPLITS, num_splits

    assert num_splits(256, 8, 132) == 1
    assert 1 < num_splits(1, 8, 132) <= MAX_SPLITS
    assert num_splits(3, 2, 132) == MAX_SPLITS


@pytest.mark.parametrize("shape", [(32, 8, 128), (16, 8, 256)])
@pytest.mark.parametrize(
    "q_lens, ctx",
    [([1] * 6, [3000, 700, 5, 63, 300, 17]), ([1, 150, 37, 1, 200], [40, 0, 90, 260, 17])],
    ids=["decode", "mixed"],
)
def test_fp8_cache_matches_sdpa(device, shape, q_lens, ctx):
    """FP8 pages with per-tensor scales (K 0.5, V 2.0) against the float64 reference over the
    same pages dequantized; the written slots hold the new keys and values (already on the FP8
    grid, so any rounding mode stores them exactly)."""
    if device == "cpu":
        pytest.skip("FP8 in Triton's interpreter is not supported")
    heads, kv_heads, head_dim = shape
    q, k, v, cache, meta = make_batch(q_lens, ctx, heads, kv_heads, head_dim, 16, torch.bfloat16, device, 11)
    k, v, fp8, exact = to_fp8_cache(k * 4, v, cache * 4, (0.5, 2.0))
    fields = {f: getattr(meta, f) for f in meta.__dataclass_fields__ if f != "extras"}
    moved = AttentionMetadata(**{f: (x.cpu() if torch.is_tensor(x) else x) for f, x in fields.items()})
    ref = SdpaBackend()
    ref.prepare(moved)
    scale = head_dim**-0.5
    want = ref.forward(q.double().cpu(), k.double().cpu(), v.double().cpu(), exact.cpu(), moved, scale)
    from stepserve.attention.triton_backend import TritonBackend

    backend = TritonBackend()
    backend.prepare(meta)
    got = backend.forward(q, k, v, fp8, meta, scale, kv_scale=(0.5, 2.0))
    assert torch.isfinite(got).all()
    err = (got.double().cpu() - want).norm() / want.norm()
    assert err <= 1e-2, f"relative error {err:.2e}"
    slots = fp8.shape[1] * fp8.shape[2]
    written = (
        fp8.view(torch.uint8)
        .view(2, slots, kv_heads, head_dim)[:, meta.slot_mapping]
        .view(torch.float8_e4m3fn)
        .double()
        .cpu()
    )
    assert torch.equal(written[0] * 0.5, k.double().cpu()) and torch.equal(written[1] * 2.0, v.double().cpu())


# Small models whose attention layers differ in what comes before the KV write: GQA, a partial
# rotary (the trailing dims pass through), Qwen3's q/k norm, Gemma 3's windowed layers with their
# own rotary base.
MODELS = {
    "llama-gqa": dict(architectures=["LlamaForCausalLM"], num_attention_heads=8, num_key_value_heads=2),
    "llama-partial-rotary": dict(
        architectures=["LlamaForCausalLM"], num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5
    ),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], num_attention_heads=8, num_key_value_heads=2),
    "gemma3": dict(
        architectures=["Gemma3ForCausalLM"],
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        sliding_window_pattern=2,
        query_pre_attn_scalar=64,
    ),
}


def step_meta(q_lens, seq_lens, tables, block_size, device):
    """The runner's metadata for one step: each sequence's last ``q_lens`` tokens are new."""
    slots, positions = [], []
    for q, s, table in zip(q_lens, seq_lens, tables):
        positions += range(s - q, s)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(s - q, s)]
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    is_decode = max(q_lens) == 1
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        positions=torch.tensor(positions, device=device),
        query_start_loc=i32([0, *torch.tensor(q_lens).cumsum(0).tolist()]),
        seq_lens=i32(seq_lens),
        block_tables=i32(tables),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        is_decode=is_decode,
        prefill_rows=None if is_decode else i32(range(len(q_lens))),
    )


@torch.inference_mode()
def prefill_then_decode(model, backend, device, poison=float("nan")):
    """Two prompts prefilled into scattered blocks of a cache of ``poison`` (NaN: a slot left
    unwritten shows in the logits), then one greedy decode step each: (prefill logits, the greedy
    tokens, decode logits, the caches)."""
    from stepserve.worker.runner import allocate_kv_cache

    tables, prompt_lens, block = [[3, 1, 6], [2, 5, 0]], [37, 13], 16
    caches = [c.fill_(poison) for c in allocate_kv_cache(model, 8, block, torch.float32, device)]

    def step(ids, q_lens, seq_lens):
        meta = step_meta(q_lens, seq_lens, tables, block, device)
        backend.prepare(meta)
        return model.compute_logits(model(ids.to(device), meta.positions, caches, meta, backend))

    prompts = torch.randint(0, model.cfg.vocab_size, (sum(prompt_lens),), generator=torch.Generator().manual_seed(0))
    prefill = step(prompts, prompt_lens, prompt_lens)
    tokens = prefill[torch.tensor(prompt_lens).cumsum(0) - 1].argmax(-1)
    decode = step(tokens, [1, 1], [n + 1 for n in prompt_lens])
    return prefill, tokens, decode, caches


@pytest.mark.parametrize("family", MODELS)
def test_model_with_the_rotary_fused_into_the_kv_write(device, family, monkeypatch):
    """A small model's prefill and decode through the Triton backend: with the rotary (and
    Qwen3's q/k norms) fused into the KV write, the logits, greedy tokens and caches of
    [``rms_norm_heads_``,] ``rotary_`` then ``write_kv`` bit for bit (Qwen3: within float32's
    last bit), and the logits and tokens of SDPA with the PyTorch rotary and norms. SDPA, which
    does not fuse, still gets rotated q and k from the Triton rotary."""
    from stepserve.attention.triton_backend import TritonBackend
    from stepserve.kernels.triton import attention as K
    from stepserve.kernels.triton import fused as triton_ops
    from stepserve.models import layers, rope
    from stepserve.models.loader import ModelSource, load_model

    hf = dict(
        vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2, head_dim=64,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip
    hf.update(MODELS[family])
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmuls, as the reference's
    source = ModelSource(None, None, "random")  # never read: dummy weights
    model = load_model(source, hf, torch.float32, torch.device(device), 512, load_format="dummy", seed=5)
    with torch.no_grad():
        for layer in model.layers:  # peaked attention, so that a wrong rotation shows in the logits
            layer.self_attn.qkv_proj.weight.mul_(5.0)

    for module in (rope, layers):  # the PyTorch rotary and norms
        monkeypatch.setattr(module, "fused_ops", lambda x: None)
    want = prefill_then_decode(model, SdpaBackend(), device, poison=0.0)  # SDPA reads whole pages
    for module in (rope, layers):  # the Triton rotary and norms, on the CPU too
        monkeypatch.setattr(module, "fused_ops", lambda x: triton_ops)
    sdpa = prefill_then_decode(model, SdpaBackend(), device, poison=0.0)
    unfused = TritonBackend()
    unfused.fuses_rotary = False  # rotary_ then write_kv
    twin = prefill_then_decode(model, unfused, device)
    calls, kernel = [], K.rotary_write_kv

    def counted(*args):
        calls.append(args)
        kernel(*args)

    monkeypatch.setattr(K, "rotary_write_kv", counted)
    got = prefill_then_decode(model, TritonBackend(), device)

    assert len(calls) == 2 * len(model.layers), "the fused kernel did not run in every layer of both steps"
    normed = [args[8] is not None for args in calls]  # qk_norm: Qwen3's q/k norms in the same launch
    assert normed == [family == "qwen3"] * len(calls), "q/k norms fused where the model has none, or not fused"
    for a, b in zip([*got[:3], *got[3]], [*twin[:3], *twin[3]]):
        if family == "qwen3":  # the q/k norms' sums may be ordered otherwise on a GPU: the last bit
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5, equal_nan=True)
        else:
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # the caches' NaN poison too
    assert torch.equal(got[1], twin[1])
    for run in (got, sdpa):
        assert torch.equal(run[1], want[1]), "greedy tokens differ from SDPA's with the PyTorch rotary"
        for a, b in ((run[0], want[0]), (run[2], want[2])):
            assert torch.isfinite(a).all()
            err = ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()
            assert err < 1e-4, f"relative error {err:.2e} against SDPA with the PyTorch rotary"
