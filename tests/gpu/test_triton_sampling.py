"""The sampler's Triton race kernel against the sampler's torch code (the same splitmix64 noise
written out as a [B, V] tensor, the vocabulary sorted), and its draw frequencies against
transformers' warpers."""

import pytest
import torch
from references import CHI2_ALPHA, chi2_pvalue, warped

from stepserve.worker import sampler as S


def filters(batch: int, vocab: int, kind: str, gen: torch.Generator):
    """Per-row (top_k, top_p, min_p) tensors for a filter kind; None where the batch has none."""
    pick = lambda values: torch.tensor(values)[torch.randint(0, len(values), (batch,), generator=gen)]  # noqa: E731
    top_k = pick([1, 2, 20, 50, vocab]) if "k" in kind else None
    top_p = pick([0.05, 0.5, 0.9, 0.95, 1.0]).float() if "p" in kind else None
    min_p = pick([0.0, 0.01, 0.1, 0.5, 1.0]).float() if "m" in kind else None
    return top_k, top_p, min_p


def sorted_draw(logits, temperature, top_k, top_p, min_p, keys, index):
    """The sampler's torch path: sort, mask, softmax, min-p, then the race with the same noise."""
    b = S.SamplingBatch(
        temperature=temperature,
        greedy=torch.zeros(len(logits), dtype=torch.bool),
        all_greedy=False,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        noise_keys=keys,
        noise_index=index,
        num_logprobs=-1,
    )
    probs = S.sampling_probs(logits, b)
    return probs, probs / S.exponential_noise(keys, index, logits.shape[1])


@pytest.mark.parametrize("batch,vocab", [(16, 1000), (33, 4099), (6, 49152), (3, 128256)])
@pytest.mark.parametrize("kind", ["t", "k", "p", "m", "km", "pm", "kp", "kpm"])
def test_filtered_race_equals_the_sorted_sampler(batch, vocab, kind, device):
    """Temperature, top-k, top-p and min-p without a sort: the same token as the sampler's
    sorted path with the same noise, but where the two sides round a near tie differently (the
    race's ratio, or the mass ranked before either token against top_p of top-k's mass, within
    float32 rounding)."""
    from stepserve.kernels.triton.sampling import filtered_race

    gen = torch.Generator().manual_seed(batch * vocab + len(kind))
    logits = torch.randn(batch, vocab, generator=gen) * 3
    logits[0, vocab // 2 :] = float("-inf")  # a grammar's mask: never drawn
    temperature = torch.rand(batch, generator=gen) * 1.5 + 0.2
    top_k, top_p, min_p = filters(batch, vocab, kind, gen)
    keys = torch.randint(-(1 << 63), (1 << 63) - 1, (batch,), generator=gen)
    index = torch.randint(0, 10_000, (batch,), generator=gen)
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = filtered_race(
        logits.to(device),
        temperature.to(device),
        torch.zeros(batch, dtype=torch.bool, device=device),
        on(top_k),
        on(top_p),
        on(min_p),
        keys.to(device),
        index.to(device),
    ).cpu()
    probs, ratio = sorted_draw(logits, temperature, top_k, top_p, min_p, keys, index)
    want = ratio.argmax(-1)
    assert int(got[0]) < vocab // 2
    for row in (got != want).nonzero().flatten().tolist():
        g, w = int(got[row]), int(want[row])
        near_tie = ratio[row, g] >= ratio[row, w] * (1 - 1e-4)
        scaled = logits[row] / temperature[row]
        if top_k is not None:
            scaled = scaled.masked_fill(
                scaled < scaled.sort(descending=True).values[int(top_k[row]) - 1], float("-inf")
            )
        kept = scaled.softmax(-1)
        edge = top_p is not None and any(
            abs(float(kept[kept > kept[t]].sum()) - float(top_p[row])) < 1e-4 for t in (g, w)
        )
        assert near_tie or edge, (row, g, w, float(ratio[row, g]), float(ratio[row, w]))
    assert (got == want).float().mean() >= 0.9


def test_filtered_race_ranks_ties_by_index(device):
    """Exact ties: top-p cuts them by index (two of four equal tokens reach 0.5), top-k keeps
    every token tied with the k-th (signed zeros tie), min-p = 1 keeps the tied most likely tokens
    only; with both, top-p's share is of the mass top-k keeps."""
    from stepserve.kernels.triton.sampling import filtered_race

    n = 2000

    def draws(row, top_k=None, top_p=None, min_p=None):
        logits = torch.tensor(row, dtype=torch.float32).expand(n, -1).contiguous().to(device)
        full = lambda v, dtype: None if v is None else torch.full((n,), v, dtype=dtype, device=device)  # noqa: E731
        keys = torch.randint(-(1 << 63), (1 << 63) - 1, (n,), generator=torch.Generator().manual_seed(len(row))).to(
            device
        )
        out = filtered_race(
            logits,
            torch.ones(n, device=device),
            torch.zeros(n, dtype=torch.bool, device=device),
            full(top_k, torch.long),
            full(top_p, torch.float32),
            full(min_p, torch.float32),
            keys,
            torch.zeros(n, dtype=torch.long, device=device),
        )
        return set(out.cpu().tolist())

    assert draws([0.0] * 4, top_p=0.5) == {0, 1}
    assert draws([0.0] * 4, top_p=0.51) == {0, 1, 2}
    assert draws([1.0, 3.0, 2.0, 3.0], top_k=1) == {1, 3}
    assert draws([1.0, 3.0, 2.0, 3.0, 2.0], top_k=3) == {1, 2, 3, 4}  # the third largest is 2.0, and both 2.0s stay
    assert draws([-1.0, -3.0, -2.0, -3.0, -2.0], top_k=2) == {0, 2, 4}
    assert draws([0.0, -0.0, -1.0], top_k=1) == {0, 1}
    assert draws([1.0, 3.0, 2.0, 3.0], min_p=1.0) == {1, 3}
    assert draws([1.0, 3.0, 2.0, 3.0, 2.0], top_k=3, top_p=0.999) == {1, 2, 3, 4}
    assert draws([0.0] * 4 + [-5.0] * 4, top_k=4, top_p=0.5) == {0, 1}  # of the whole row's mass, index 2 would stay


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [(0, 0.8, 0.0), (0, 0.95, 0.02), (40, 1.0, 0.05), (0, 1.0, 0.0), (20, 0.8, 0.0), (50, 0.95, 0.02)],
)
def test_filtered_race_draw_frequencies(top_k, top_p, min_p, device):
    """20,000 rows of one distribution, each with its own key, against transformers' warpers:
    the counts pass chi-square; greedy rows in the batch are left to the caller (token 0)."""
    from stepserve.kernels.triton.sampling import filtered_race

    n, vocab, temperature = 20_000, 3000, 0.8
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 2
    keys = torch.randint(-(1 << 63), (1 << 63) - 1, (n,), generator=torch.Generator().manual_seed(6))
    greedy = torch.zeros(n, dtype=torch.bool)
    greedy[:100] = True
    full = lambda v, dtype: torch.full((n,), v, dtype=dtype, device=device)  # noqa: E731
    tokens = filtered_race(
        logits.expand(n, -1).contiguous().to(device),
        full(temperature, torch.float32),
        greedy.to(device),
        full(top_k or vocab, torch.long) if top_k else None,
        full(top_p, torch.float32) if top_p < 1 else None,
        full(min_p, torch.float32) if min_p else None,
        keys.to(device),
        torch.zeros(n, dtype=torch.long, device=device),
    ).cpu()
    assert torch.all(tokens[:100] == 0)
    probs = warped(logits[None], temperature, top_k, top_p, min_p).softmax(-1)[0]
    p = chi2_pvalue(torch.bincount(tokens[100:], minlength=vocab), probs)
    assert p > CHI2_ALPHA, p


def test_filtered_race_compiles_one_variant(device):
    """Eager passes of any filters and batch size reuse the kernel that the sampling graphs'
    capture compiled: the filters are runtime flags, and an odd batch's output indices (after its
    keys in one upload, 8-byte aligned) do not make a new specialization."""
    if device != "cuda":
        pytest.skip("compilation is the GPU's matter")
    from stepserve.kernels.triton import sampling as T

    def call(rows: int, top_k: bool, top_p: bool, min_p: bool) -> None:
        noise = torch.randint(0, 1000, (2, rows), device=device)  # keys and indices as the sampler uploads them
        full = lambda on, v, dtype: torch.full((rows,), v, dtype=dtype, device=device) if on else None  # noqa: E731
        T.filtered_race(
            torch.randn(rows, 1000, device=device),
            torch.ones(rows, device=device),
            torch.zeros(rows, dtype=torch.bool, device=device),
            full(top_k, 5, torch.long),
            full(top_p, 0.9, torch.float32),
            full(min_p, 0.1, torch.float32),
            noise[0],
            noise[1],
        )

    cache = T._filtered_race_kernel.device_caches[torch.cuda.current_device()][0]
    cache.clear()  # the tests before this one compiled whatever their calls needed
    call(8, True, True, True)  # as the capture does: every buffer given
    compiled = set(cache)
    assert len(compiled) == 1
    for rows, flags in [
        (3, (False, False, False)),
        (5, (True, False, False)),
        (1, (False, True, True)),
        (6, (False, False, True)),
    ]:
        call(rows, *flags)
    torch.cuda.synchronize()
    assert set(cache) == compiled
