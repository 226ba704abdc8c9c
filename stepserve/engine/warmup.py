"""No cold start: before a CUDA engine reports ready, run a small synthetic workload through it
so that every Triton kernel specialization and every lazily loaded library kernel the real
traffic will meet is compiled (or read back from the compilation cache) now, not inside the
first user requests.

Triton compiles one variant per combination of constexprs and of integer arguments that are 1
or divisible by 16; the passes below cover what the scheduler sends: full prefill chunks of
``max_num_batched_tokens`` that pack several prompts and split one, prompt lengths with and
without a multiple of 16, mixed passes (decode rows beside prefill chunks), pure decode passes
(graph replays, and eager multi-step steps where no graph fits), and the sampling paths
(greedy; temperature with top-k, top-p and min-p; seeded; logprobs; penalties). The decode
graphs themselves are captured before this, one per batch-size bucket.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time

from stepserve.core.engine_core import EngineCore
from stepserve.core.outputs import EngineCoreRequest
from stepserve.sampling import SamplingParams

log = logging.getLogger("stepserve")

SAMPLING_PATHS = (
    SamplingParams(temperature=0.0, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=7, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.7, presence_penalty=0.5, repetition_penalty=1.1, ignore_eos=True),
)


def _prompt_lengths(max_model_len: int, max_tokens: int, chunk: int, num_seqs: int) -> list[int]:
    """Lengths that make full chunks, split chunks and odd remainders, within the context."""
    room = max(1, max_model_len - max_tokens)
    wanted = [min(room, chunk + chunk // 2 + 3), 1, 17, 33, 100, 255, 256, 513]
    lengths = [min(room, n) for n in wanted]
    fill = min(room - 2, max(16, chunk // 8))
    count = max(8, -(-3 * chunk // (2 * fill)))  # the second wave spans more than one chunk
    lengths += [max(1, fill + (i % 3)) for i in range(count)]
    return lengths[:num_seqs]


def warm_up(
    core: EngineCore, vocab_size: int, max_model_len: int, steps: int, max_num_seqs: int, chunk: int, token_budget: int
) -> float:
    """Run the synthetic workload to completion; returns its seconds. ``token_budget`` caps the
    KV tokens it holds at once (a share of the cache), so it never needs preemption."""
    start = time.monotonic()
    rng = random.Random(0)
    max_tokens = 2 * steps + 3
    lengths = _prompt_lengths(max_model_len, max_tokens, chunk, max_num_seqs)
    while sum(lengths) + len(lengths) * max_tokens > token_budget and len(lengths) > 1:
        lengths.pop(0)
    waves = (lengths[: len(lengths) // 2], lengths[len(lengths) // 2 :])
    count = 0
    for wave in waves:
        for n in wave:
            params = dataclasses.replace(SAMPLING_PATHS[count % len(SAMPLING_PATHS)], max_tokens=max_tokens)
            ids = tuple(rng.randrange(vocab_size) for _ in range(n))
            core.add_request(EngineCoreRequest(f"warmup-{count}", ids, params, time.monotonic()))
            count += 1
        core.step()  # the second wave's prefill then runs beside the first wave's decode rows
    while core.has_unfinished:
        core.step()
    count += _mixed_sweep(core, vocab_size, rng, max_model_len, max_num_seqs)
    seconds = time.monotonic() - start
    log.info("warm-up: %d synthetic requests through prefill, mixed and decode passes in %.1fs", count, seconds)
    return seconds


DECODE_ROWS = (1, 2, 3, 5, 9, 11, 17, 33, 65)


def _mixed_sweep(core: EngineCore, vocab_size: int, rng: random.Random, max_model_len: int, max_num_seqs: int) -> int:
    """For each count of decode rows: that many short requests decode while one prompt is
    prefilled beside them (one mixed pass), then they are aborted. Returns requests added."""
    added = 0
    max_tokens = max(1, min(16, max_model_len - 8))
    for rows in DECODE_ROWS:
        if rows >= max_num_seqs:
            break
        ids = [f"warmup-d{rows}-{i}" for i in range(rows)]
        for request_id in ids:
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
            core.add_request(
                EngineCoreRequest(
                    request_id, tuple(rng.randrange(vocab_size) for _ in range(5)), params, time.monotonic()
                )
            )
        core.step()  # their prefill
        prompt = tuple(rng.randrange(vocab_size) for _ in range(min(40, max_model_len - 2)))
        core.add_request(
            EngineCoreRequest(
                f"warmup-p{rows}",
                prompt,
                SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1),
                time.monotonic(),
            )
        )
        core.step()  # decode rows beside the prompt's prefill
        core.abort(ids)
        while core.has_unfinished:
            core.step()
        added += rows + 1
    return added
