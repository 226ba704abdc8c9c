"""The periodic stats line, as vLLM prints it: throughput, queue, KV cache, prefix cache, restarts.

Every ``--log-stats-interval`` seconds the server logs what happened since the last line. An
idle server logs one idle line and then stays quiet (at DEBUG) until something happens, as
vLLM does, so that a quiet log means a quiet server, not a dead one: the line comes back with
the first request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from stepserve.core.engine_core import EngineStats
from stepserve.engine.async_engine import AsyncEngine
from stepserve.server.config import ServerConfig

log = logging.getLogger("stepserve.stats")


@dataclass(frozen=True)
class StatsSample:
    """Counters at one moment; two of them make a line."""

    time: float  # time.monotonic()
    prompt_tokens: int  # prompt tokens of requests that produced a first token, since start
    generation_tokens: int  # tokens generated since start
    engine: EngineStats  # the engine's latest snapshot
    restarts: int  # engine core restarts since start


def take_sample(engine: AsyncEngine, restarts: Callable[[], int]) -> StatsSample:
    counts = engine.token_counts
    return StatsSample(time.monotonic(), counts.prompt, counts.generation, engine.stats(), restarts())


def is_idle(prev: StatsSample, cur: StatsSample) -> bool:
    """Nothing computed in between and nothing in flight."""
    moved = cur.prompt_tokens != prev.prompt_tokens or cur.generation_tokens != prev.generation_tokens
    return not moved and cur.engine.num_running == 0 and cur.engine.num_waiting == 0


def format_line(prev: StatsSample, cur: StatsSample) -> str:
    """vLLM's line; the prefix cache hit rate is over all prompt tokens looked up since start."""
    seconds = max(cur.time - prev.time, 1e-9)
    e = cur.engine
    hit_rate = e.prefix_cache_hits / e.prefix_cache_queries if e.prefix_cache_queries else 0.0
    return (
        f"Avg prompt throughput: {(cur.prompt_tokens - prev.prompt_tokens) / seconds:.1f} tokens/s, "
        f"Avg generation throughput: {(cur.generation_tokens - prev.generation_tokens) / seconds:.1f} tokens/s, "
        f"Running: {e.num_running} reqs, Waiting: {e.num_waiting} reqs, "
        f"KV cache usage: {100 * e.kv_cache_usage:.1f}%, Prefix cache hit rate: {100 * hit_rate:.1f}%, "
        f"Engine restarts: {cur.restarts}"
    )


async def log_stats_forever(engine: AsyncEngine, restarts: Callable[[], int], interval_s: float) -> None:
    """The stats task; cancel it to stop."""
    prev, was_idle = take_sample(engine, restarts), False
    while True:
        await asyncio.sleep(interval_s)
        cur = take_sample(engine, restarts)
        idle = is_idle(prev, cur)
        log.log(logging.DEBUG if idle and was_idle else logging.INFO, format_line(prev, cur))
        prev, was_idle = cur, idle


def start_stats_logger(engine: AsyncEngine, client, config: ServerConfig) -> asyncio.Task | None:
    """The stats task for this server, or None with ``--disable-log-stats``."""
    if config.disable_log_stats:
        return None
    restarts = lambda: getattr(client, "restarts", 0)  # noqa: E731 (the in-process client never restarts)
    return asyncio.get_running_loop().create_task(log_stats_forever(engine, restarts, config.log_stats_interval))
