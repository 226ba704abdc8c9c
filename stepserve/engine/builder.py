"""Build an ``EngineCore``: the worker (``executor/builder.py``), then the block manager, the
scheduler and the core that drives them (warmed up on a GPU). One core serves every task: text
generation, a decoder's embeddings (prefill-only pooling requests) and encoder models."""

from __future__ import annotations

import dataclasses
import logging
import os

from stepserve.config import EngineConfig
from stepserve.core.block_hash import BlockHasher
from stepserve.core.block_manager import BlockManager
from stepserve.core.engine_core import EngineCore
from stepserve.core.scheduler import Scheduler
from stepserve.engine.warmup import warm_up
from stepserve.executor.builder import BuiltWorker, ModelInfo, build_encoder_worker, build_worker
from stepserve.worker.encoder_runner import EncoderSpec

log = logging.getLogger("stepserve")

__all__ = ["ModelInfo", "build_encoder_engine", "build_engine", "build_pooling_engine"]


def build_engine(
    config: EngineConfig, weights=None, eos_token_ids: frozenset[int] | None = None
) -> tuple[EngineCore, object, ModelInfo]:
    """The core, the tokenizer (None when ``eos_token_ids`` are given: the front holds it) and
    what was learned while building them. ``weights`` (a ``(hf_name, tensor)`` stream) replaces
    the checkpoint files when given."""
    built = build_worker(config, weights, eos_token_ids)
    info = built.info
    cache = config.cache
    # PYTHONHASHSEED seeds vLLM's block hashes (its NONE_HASH): indexers are set up with the same value.
    hasher = BlockHasher(cache.hash_algo, os.environ.get("PYTHONHASHSEED"))
    events = cache.kv_events.enabled
    blocks = BlockManager(info.num_kv_blocks, cache.block_size, cache.enable_prefix_caching, hasher, events)
    max_loras = config.lora.max_loras if config.lora.enable_lora else 0
    scheduler = Scheduler(
        config.scheduler,
        blocks,
        info.max_model_len,
        info.eos_token_ids,
        built.window,
        max_loras,
        config.scheduler.speculative,
    )
    core = EngineCore(scheduler, built.worker, config.scheduler.async_scheduling)
    if info.device == "cuda":
        _warm_up(core, config, built)
    if events:
        _start_kv_events(core, config, info.name)
    log.info(
        "engine ready: %s on %s (%s, quantization %s), %d KV blocks, max_model_len %d, in %.1fs",
        info.name,
        info.device,
        info.dtype,
        info.quantization,
        info.num_kv_blocks,
        info.max_model_len,
        info.load_seconds,
    )
    return core, built.tokenizer, info


def _warm_up(core: EngineCore, config: EngineConfig, built: BuiltWorker) -> None:
    """Compile every kernel variant now (see ``warmup``), then restore the engine's generator.
    The other tensor-parallel ranks follow rank 0's warm-up passes."""
    sched, info = config.scheduler, built.info
    budget = (info.num_kv_blocks - 1) * config.cache.block_size // 2
    warm_up(
        core,
        built.runner.vocab_size,
        info.max_model_len,
        sched.num_scheduler_steps,
        sched.max_num_seqs,
        sched.max_num_batched_tokens,
        budget,
    )
    core.worker.reseed(config.model.seed)


def _start_kv_events(core: EngineCore, config: EngineConfig, model_name: str) -> None:
    """Attach the ZMQ publisher once the engine is warm: the warm-up's random prompts leave the
    prefix cache (unannounced), and the first batch is ``AllBlocksCleared``, so that an indexer
    forgets what a previous core of this server held."""
    from stepserve.engine.kv_events import ZmqEventPublisher, default_topic

    settings = config.cache.kv_events
    core.scheduler.blocks.reset_prefix_cache()
    core.scheduler.blocks.take_events()
    topic = settings.topic if settings.topic is not None else default_topic(model_name)
    core.kv_events = ZmqEventPublisher(settings, topic)  # set once, here, before the core serves
    core.reset_prefix_cache()


def build_encoder_engine(
    spec: EncoderSpec, config: EngineConfig, name: str, max_model_len: int
) -> tuple[EngineCore, ModelInfo]:
    """An encoder model's engine: the same core and scheduler as a decoder's, driving an
    ``EncoderRunner``. Its requests are computed whole, so a pass's token budget holds at least
    the longest input; the blocks are only the scheduler's bookkeeping (an encoder keeps no KV
    cache), as many as ``max_num_seqs`` inputs of ``max_model_len`` need; no prefix caching."""
    runner, info = build_encoder_worker(spec, name, max_model_len)
    block_size = config.cache.block_size
    num_blocks = config.scheduler.max_num_seqs * -(-max_model_len // block_size) + 1
    # Async scheduling and multi-step never apply: the runner has no submit, and a prefill is one step.
    budget = config.scheduler.max_num_batched_tokens
    if budget < max_model_len:  # an input is computed whole: a pass must hold the longest
        log.info(
            "max_num_batched_tokens raised from %d to %d, the longest input of %s", budget, max_model_len, info.name
        )
    scheduler_config = dataclasses.replace(config.scheduler, max_num_batched_tokens=max(budget, max_model_len))
    scheduler = Scheduler(scheduler_config, BlockManager(num_blocks, block_size, False), max_model_len, frozenset())
    log.info(
        "encoder engine ready: %s (%s) on %s (%s) in %.1fs",
        info.name,
        spec.head,
        info.device,
        info.dtype,
        info.load_seconds,
    )
    return EngineCore(scheduler, runner), info


def build_pooling_engine(config: EngineConfig, max_model_len: int) -> tuple[EngineCore, ModelInfo]:
    """A decoder embedding model's engine (Qwen3-Embedding and the like): the generation engine
    run at the task's input limit, its requests prefill-only ``pooling`` ones. A
    sentence-transformers checkpoint saves the base model only, so the embedding stands in for
    the missing ``lm_head`` (``with_head``); pooling never reads it."""
    from stepserve.models.loader import open_checkpoint

    model = dataclasses.replace(config.model, max_model_len=max_model_len)
    weights = None if model.load_format == "dummy" else with_head(open_checkpoint(model.model).weights())
    core, _, info = build_engine(dataclasses.replace(config, model=model), weights, eos_token_ids=frozenset())
    return core, info


def with_head(weights):
    """The checkpoint's ``(name, tensor)`` stream, plus the embedding as ``lm_head.weight`` when
    there is none (a tied model skips it): the loader wants every parameter filled."""
    embedding, has_head = None, False
    for name, tensor in weights:
        short = name.removeprefix("model.")
        has_head |= short == "lm_head.weight"
        if short == "embed_tokens.weight":
            embedding = tensor
        yield name, tensor
    if not has_head and embedding is not None:
        yield "lm_head.weight", embedding
