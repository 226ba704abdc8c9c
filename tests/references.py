"""Independent references for the sampling tests: transformers' own logits processors, its logits
and log_softmax, a chi-square test, and a greedy loop with OpenAI's penalty formula written out."""

from __future__ import annotations

from collections import Counter

import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# Every chi-square test in the suite uses this level; fewer than 100 of them run, so a correct
# sampler fails one by chance less often than once in a million runs of the suite.
CHI2_ALPHA = 1e-8


def warped(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """transformers' warpers in generate()'s order: temperature, top-k, top-p, min-p."""
    out = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k > 0:
        out = TopKLogitsWarper(top_k)(None, out)
    if top_p < 1.0:
        out = TopPLogitsWarper(top_p)(None, out)
    if min_p > 0:
        out = MinPLogitsWarper(min_p)(None, out)
    return out


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of ``counts`` drawn from ``probs`` (bins under 5 expected pooled).

    Raises AssertionError if anything was drawn where ``probs`` is 0.
    """
    counts, probs = counts.double(), probs.double()
    outside = counts[probs == 0].sum().item()
    assert outside == 0, f"{outside:.0f} draws fell on tokens the reference forbids"
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < 5:  # pool the small rest into the smallest regular bin
        i = int(exp[:-1].argmin())
        obs[i] += obs[-1]
        exp[i] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    if len(exp) < 2:
        return 1.0
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor(len(exp) - 1, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), V] of one forward over ``ids``."""
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax [len(output), V] of the logits that produced each output token."""
    logits = hf_logits(model, list(prompt) + list(output))
    return logits[len(prompt) - 1 : len(prompt) + len(output) - 1].log_softmax(-1)


def assert_logprobs_match(model, prompt, token_ids, chosen, tops, tol=1e-4) -> None:
    """``chosen[t]`` and ``tops[t]`` (list of (id, logprob)) against transformers' log_softmax."""
    ref = hf_logprobs(model, prompt, token_ids)
    assert len(chosen) == len(token_ids) == len(tops)
    for t, token in enumerate(token_ids):
        assert abs(chosen[t] - ref[t, token].item()) < tol, (t, chosen[t], ref[t, token].item())
        k = len(tops[t])
        kth = ref[t].topk(k).values[-1].item()
        values = [v for _, v in tops[t]]
        assert values == sorted(values, reverse=True)
        for token_id, value in tops[t]:
            assert abs(value - ref[t, token_id].item()) < tol, (t, token_id, value, ref[t, token_id].item())
            assert ref[t, token_id].item() >= kth - tol  # one of the k most likely


@torch.no_grad()
def reference_greedy(
    model, prompt: list[int], steps: int, *, presence=0.0, frequency=0.0, bias=None, min_tokens=0, stop_ids=(), eos=None
) -> list[int]:
    """Greedy decoding with OpenAI's penalty formula written out, logit bias and min_tokens:
    ``logit[j] += bias[j]; logit[j] -= c[j] * frequency + (c[j] > 0) * presence`` where ``c``
    counts the generated tokens; EOS and stop ids are forbidden before ``min_tokens`` outputs."""
    ids, out = list(prompt), []
    ends = set(stop_ids) | ({eos} if eos is not None else set())
    for _ in range(steps):
        logits = hf_logits(model, ids)[-1]
        for j, b in (bias or {}).items():
            logits[j] += b
        for j, c in Counter(out).items():
            logits[j] -= c * frequency + (c > 0) * presence
        if len(out) < min_tokens:
            for j in ends:
                logits[j] = float("-inf")
        token = int(logits.argmax())
        ids.append(token)
        out.append(token)
        if token in ends:
            break
    return out
