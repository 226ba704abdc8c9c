"""Batched sampling: greedy, temperature, top-k, top-p, min-p, penalties, logit bias, seeds, logprobs.

All rows are handled with tensor ops: no per-row Python and no host sync, so a CUDA graph can
capture a whole step's sampling (``cuda_graphs.py``).

The noise is counter-based: the exponential noise of vocabulary entry i when a row samples its
output token t is a pure function of (the row's noise key, t, i), splitmix64's finalizer over
64-bit integers (``noise_words``). A request with a seed has the key ``noise_key(seed)``, so what a
seed gives depends on nothing but the seed, the token's index and the logits (not on the batch,
chunking, preemption, the number of scheduler steps, or whether a graph ran the step). Unseeded
rows get a fresh key per pass from the engine's generator, drawn on the host.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from stepserve.core.outputs import ScheduledRequest
from stepserve.kernels import NOISE_BITS
from stepserve.sampling import mix_seed

# splitmix64 (Steele, Lea and Flood), written over int64 tensors: multiplication and addition wrap
# as uint64 does, and right shifts are masked to be logical. The constants as signed int64.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MUL1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MUL2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shr(x, 30)
    x = x * _MUL1
    x = x ^ _shr(x, 27)
    x = x * _MUL2
    return x ^ _shr(x, 31)


def noise_key(seed: int) -> int:
    """The noise key of a request's seed, in [0, 2**63)."""
    return mix_seed(seed, -1)


def token_keys(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per row [B]: the key of the draw of output token ``index`` under noise key ``keys``."""
    return _mix64(keys + _mix64((index + 1) * _GOLDEN))


def noise_words(keys: torch.Tensor, index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] int64: splitmix64's outputs 1..V from each row's token key."""
    counters = torch.arange(1, vocab_size + 1, dtype=torch.long, device=keys.device) * _GOLDEN
    return _mix64(token_keys(keys, index)[:, None] + counters)


def exponential_noise(keys: torch.Tensor, index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 Exp(1) noise: -log(u) of the top NOISE_BITS bits of each word."""
    top = _shr(noise_words(keys, index, vocab_size), 64 - NOISE_BITS)
    return -((top.float() + 0.5) * 2.0**-NOISE_BITS).log()


def _tensor(data, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """A device tensor of host values; on CUDA through pinned memory without a host sync."""
    t = torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class SamplingBatch:
    """Per-pass sampling tensors for B rows; counts and min-token masks advance step by step."""

    temperature: torch.Tensor  # [B] float, 1.0 on greedy rows (never divided by zero)
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool  # every row greedy: argmax only
    top_k: torch.Tensor | None = None  # [B] int64, vocab size where disabled
    top_p: torch.Tensor | None = None  # [B] float
    min_p: torch.Tensor | None = None  # [B] float
    presence: torch.Tensor | None = None  # [B] float; the three penalties are set together or not at all
    frequency: torch.Tensor | None = None  # [B] float
    repetition: torch.Tensor | None = None  # [B] float
    output_counts: torch.Tensor | None = None  # [B, V] int: occurrences of each token in the outputs
    prompt_mask: torch.Tensor | None = None  # [B, V] bool: tokens present in the prompt
    bias: torch.Tensor | None = None  # [B, V] float logit bias
    stop_mask: torch.Tensor | None = None  # [B, V] bool: EOS and stop tokens, masked below min_tokens
    min_left: torch.Tensor | None = None  # [B] int: outputs still to come before stop tokens may appear
    noise_keys: torch.Tensor | None = (
        None  # [B] int64: noise_key(seed), or a fresh draw for unseeded rows; None if all greedy
    )
    noise_index: torch.Tensor | None = (
        None  # [B] int64: output index of the token the next step samples; None if all greedy
    )
    num_logprobs: int = -1  # top alternatives to return; -1 for none


def build_sampling_batch(
    requests: Sequence[ScheduledRequest],
    eos_token_ids: Collection[int],
    vocab_size: int,
    device: torch.device,
    shared: torch.Generator | None = None,
) -> SamplingBatch:
    """``shared``: the CPU generator that keys unseeded rows (torch's default one if None)."""
    params = [r.params for r in requests]
    b = len(params)
    f32 = lambda xs: _tensor(xs, dtype=torch.float32, device=device)  # noqa: E731
    greedy = [p.greedy for p in params]
    noise = None if all(greedy) else _noise(requests, greedy, shared, device)
    batch = SamplingBatch(
        temperature=f32([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
        greedy=_tensor(greedy, device=device),
        all_greedy=all(greedy),
        noise_keys=None if noise is None else noise[0],
        noise_index=None if noise is None else noise[1],
        num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
    )
    if any(p.top_k > 0 for p in params):
        batch.top_k = _tensor([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params], device=device)
    if any(p.top_p < 1.0 for p in params):
        batch.top_p = f32([p.top_p for p in params])
    if any(p.min_p > 0 for p in params):
        batch.min_p = f32([p.min_p for p in params])
    if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
        _add_penalties(batch, requests, vocab_size, device)
    if any(p.logit_bias for p in params):
        batch.bias = torch.zeros(b, vocab_size, device=device)
        for row, p in enumerate(params):
            for token, value in p.logit_bias:
                if 0 <= token < vocab_size:
                    batch.bias[row, token] += value
    if any(p.min_tokens > 0 for p in params):
        _add_min_tokens(batch, requests, eos_token_ids, vocab_size, device)
    return batch


def _noise(requests, greedy: list[bool], shared: torch.Generator | None, device) -> torch.Tensor:
    """[2, B] int64 in one upload: each row's noise key and the output index its first step samples."""
    params = [r.params for r in requests]
    drawn = [p.seed is None and not g for p, g in zip(params, greedy)]  # greedy rows draw nothing
    draws = iter(torch.randint(-(1 << 63), (1 << 63) - 1, (sum(drawn),), generator=shared).tolist())
    keys = [noise_key(p.seed) if p.seed is not None else next(draws) if d else 0 for p, d in zip(params, drawn)]
    return _tensor([keys, [len(r.token_ids) - r.num_prompt_tokens for r in requests]], dtype=torch.long, device=device)


def _add_penalties(batch: SamplingBatch, requests, vocab_size: int, device) -> None:
    params = [r.params for r in requests]
    batch.presence = _tensor([p.presence_penalty for p in params], device=device)
    batch.frequency = _tensor([p.frequency_penalty for p in params], device=device)
    batch.repetition = _tensor([p.repetition_penalty for p in params], device=device)
    batch.output_counts = torch.zeros(len(params), vocab_size, dtype=torch.int32, device=device)
    batch.prompt_mask = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
    for row, r in enumerate(requests):
        prompt = _tensor(r.token_ids[: r.num_prompt_tokens], dtype=torch.long, device=device)
        batch.prompt_mask[row, prompt] = True
        outputs = r.token_ids[r.num_prompt_tokens :]
        if outputs:
            ids = _tensor(outputs, dtype=torch.long, device=device)
            batch.output_counts[row].scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))


def _add_min_tokens(batch: SamplingBatch, requests, eos_token_ids, vocab_size: int, device) -> None:
    batch.stop_mask = torch.zeros(len(requests), vocab_size, dtype=torch.bool, device=device)
    left = []
    for row, r in enumerate(requests):
        p = r.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        ids = [t for t in stops if 0 <= t < vocab_size]
        if ids:
            batch.stop_mask[row, ids] = True
        left.append(p.min_tokens - (len(r.token_ids) - r.num_prompt_tokens))
    batch.min_left = _tensor(left, device=device)


def has_logits_processors(batch: SamplingBatch) -> bool:
    """Logit bias, penalties or a min_tokens mask on some row: ``apply_logits_processors`` is no identity."""
    return batch.bias is not None or batch.output_counts is not None or batch.stop_mask is not None


def is_plain_greedy(batch: SamplingBatch) -> bool:
    """Every row greedy with no logits processor: each token is the raw logits' argmax."""
    return batch.all_greedy and not has_logits_processors(batch)


def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.bias is not None:
        logits = logits + batch.bias
    if batch.output_counts is not None:
        seen = batch.prompt_mask | (batch.output_counts > 0)
        rep = batch.repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - batch.frequency[:, None] * batch.output_counts
        logits = logits - batch.presence[:, None] * (batch.output_counts > 0)
    if batch.stop_mask is not None:
        masked = batch.stop_mask & (batch.min_left > 0)[:, None]
        logits = logits.masked_fill(masked, float("-inf"))
    return logits


def _mask_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if batch.top_k is not None:
        kth = sorted_logits.gather(1, (batch.top_k - 1).clamp(min=0)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if batch.top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always survives
        # A token goes once the ones before it reach top_p (transformers' and vLLM's rule, which
        # decides exact ties). Rows without top-p (1.0) keep every token: their cumulative sum
        # can round past 1.0, which cut their tail whenever another row of the batch used top-p.
        cut = (mass_before >= batch.top_p[:, None]) & (batch.top_p < 1.0)[:, None]
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def race(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One draw per row from ``probs`` [B, V], by the exponential race argmax(p / E), E ~ Exp(1)
    (on CUDA ``triton_sampling.filtered_race`` runs it with the noise made in registers)."""
    return (probs / exponential_noise(batch.noise_keys, batch.noise_index, probs.shape[1])).argmax(dim=-1)


def sampling_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """What non-greedy rows draw from [B, V]: temperature, then top-k and top-p, then min-p."""
    scaled = logits / batch.temperature[:, None]
    if batch.top_k is not None or batch.top_p is not None:
        scaled = _mask_top_k_top_p(scaled, batch)
    probs = scaled.softmax(dim=-1)
    if batch.min_p is not None:
        floor = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Token ids [B] from float32 logits [B, V] after the logits processors. On CUDA one
    Triton kernel draws from the logits without sorting (``filtered_race``); elsewhere top-k
    and top-p sort the vocabulary."""
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    if logits.is_cuda:
        from stepserve.kernels.triton.sampling import filtered_race

        drawn = filtered_race(
            logits,
            batch.temperature,
            batch.greedy,
            batch.top_k,
            batch.top_p,
            batch.min_p,
            batch.noise_keys,
            batch.noise_index,
        )
    else:
        drawn = race(sampling_probs(logits, batch), batch)
    return torch.where(batch.greedy, greedy_tokens, drawn)


def advance(batch: SamplingBatch, tokens: torch.Tensor) -> None:
    """Account for the tokens just sampled before the next step of a multi-step pass."""
    if batch.noise_index is not None:
        batch.noise_index += 1
    if batch.output_counts is not None:
        batch.output_counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.int32))
    if batch.min_left is not None:
        batch.min_left -= 1


def top_logprobs(
    raw_logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens [B] and the top-k alternatives [B, k] (ids, values)."""
    logprobs = raw_logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    values, ids = logprobs.topk(max(k, 1), dim=-1)
    return chosen, ids[:, :k], values[:, :k]


def expand(batch: SamplingBatch, row_of: torch.Tensor, offset: torch.Tensor) -> SamplingBatch:
    """The batch for a verify pass's positions: position m samples as row ``row_of[m]`` would
    ``offset[m]`` tokens later (its noise index and min_tokens countdown advanced; penalties
    are only for rows that propose nothing, whose offset is 0)."""

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, row_of)

    return SamplingBatch(
        temperature=rows(batch.temperature),
        greedy=rows(batch.greedy),
        all_greedy=batch.all_greedy,
        top_k=rows(batch.top_k),
        top_p=rows(batch.top_p),
        min_p=rows(batch.min_p),
        presence=rows(batch.presence),
        frequency=rows(batch.frequency),
        repetition=rows(batch.repetition),
        output_counts=rows(batch.output_counts),
        prompt_mask=rows(batch.prompt_mask),
        bias=rows(batch.bias),
        stop_mask=rows(batch.stop_mask),
        min_left=None if batch.min_left is None else rows(batch.min_left) - offset,
        noise_keys=rows(batch.noise_keys),
        noise_index=None if batch.noise_index is None else rows(batch.noise_index) + offset,
        num_logprobs=batch.num_logprobs,
    )
