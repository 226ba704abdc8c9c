"""Build an ``EngineCore`` from an ``EngineConfig``: the worker (``executor/builder.py``), then the
block manager, the scheduler and the core that drives them, warmed up on a GPU."""

from __future__ import annotations

import logging

from stepserve.config import EngineConfig
from stepserve.core.block_manager import BlockManager
from stepserve.core.engine_core import EngineCore
from stepserve.core.scheduler import Scheduler
from stepserve.engine.warmup import warm_up
from stepserve.executor.builder import BuiltWorker, ModelInfo, build_worker

log = logging.getLogger("stepserve")

__all__ = ["ModelInfo", "build_engine"]


def build_engine(config: EngineConfig, weights=None, eos_token_ids: frozenset[int] | None = None) -> tuple[EngineCore, object, ModelInfo]:
    """The core, the tokenizer (None when ``eos_token_ids`` are given: the front holds it) and
    what was learned while building them. ``weights`` (a ``(hf_name, tensor)`` stream) replaces
    the checkpoint files when given."""
    built = build_worker(config, weights, eos_token_ids)
    info = built.info
    blocks = BlockManager(info.num_kv_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
    scheduler = Scheduler(config.scheduler, blocks, info.max_model_len, info.eos_token_ids, built.window)
    core = EngineCore(scheduler, built.worker, config.scheduler.async_scheduling)
    if info.device == "cuda":
        _warm_up(core, config, built)
    log.info(
        "engine ready: %s on %s (%s, quantization %s), %d KV blocks, max_model_len %d, in %.1fs",
        info.name, info.device, info.dtype, info.quantization, info.num_kv_blocks, info.max_model_len, info.load_seconds,
    )
    return core, built.tokenizer, info


def _warm_up(core: EngineCore, config: EngineConfig, built: BuiltWorker) -> None:
    """Compile every kernel variant now (see ``warmup``), then restore the engine's generator.
    The other tensor-parallel ranks follow rank 0's warm-up passes."""
    sched, info = config.scheduler, built.info
    budget = (info.num_kv_blocks - 1) * config.cache.block_size // 2
    warm_up(core, built.runner.vocab_size, info.max_model_len, sched.num_scheduler_steps, sched.max_num_seqs, sched.max_num_batched_tokens, budget)
    core.worker.reseed(config.model.seed)
