"""Build an EngineCore from an EngineConfig: model, tokenizer, KV cache, runner, scheduler."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from stepserve.attention import get_backend
from stepserve.config import ConfigError, EngineConfig
from stepserve.core.block_manager import BlockManager
from stepserve.core.engine_core import EngineCore
from stepserve.core.scheduler import Scheduler
from stepserve.models.gguf_cache import converted_source
from stepserve.models.loader import load_model, read_hf_config, resolve_source
from stepserve.models.tokenizer import eos_token_ids, load_tokenizer
from stepserve.worker.runner import ModelRunner, allocate_kv_cache, kv_cache_bytes_per_block

log = logging.getLogger("stepserve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """Facts learned while building the engine (returned, never written back into config)."""

    name: str  # default served model name
    max_model_len: int  # context length in use
    eos_token_ids: frozenset[int]  # ids that end a sequence
    num_kv_blocks: int  # KV cache blocks (one is the null block)
    device: str  # "cpu" or "cuda"
    dtype: str  # weights and activations
    load_seconds: float  # wall time to build the engine


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use --device cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _num_blocks(config: EngineConfig, model, dtype, device, max_model_len: int) -> int:
    cache = config.cache
    if cache.num_blocks is not None:
        num_blocks = cache.num_blocks
    else:
        per_block = kv_cache_bytes_per_block(model, cache.block_size, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            budget = free - total * (1 - cache.gpu_memory_utilization) - 2 * 2**30  # room for activations
        else:
            budget = cache.cpu_kv_cache_gib * 2**30
        num_blocks = int(budget // per_block)
    needed = -(-max_model_len // cache.block_size) + 1
    if num_blocks < needed:
        raise ConfigError(
            f"the KV cache ({num_blocks} blocks of {cache.block_size} tokens) cannot hold one request of "
            f"max_model_len={max_model_len}; lower max_model_len or give the cache more memory"
        )
    return num_blocks


def build_engine(config: EngineConfig) -> tuple[EngineCore, object, ModelInfo]:
    """Returns the core, the tokenizer and what was learned while building them."""
    start = time.monotonic()
    source = resolve_source(config.model.model)
    if source.gguf_file is not None:
        source = converted_source(source)
    hf_config = read_hf_config(source)
    device = pick_device(config.model.device)
    dtype = pick_dtype(config.model.dtype, device)
    native_len = hf_config.get("max_position_embeddings", 2048)
    max_model_len = config.model.max_model_len or native_len
    if max_model_len > native_len:
        raise ConfigError(f"max_model_len={max_model_len} exceeds the model's {native_len} positions")
    tokenizer = load_tokenizer(source)
    eos = eos_token_ids(source, hf_config, tokenizer)
    steps = config.scheduler.num_scheduler_steps
    model = load_model(source, hf_config, dtype, device, max_positions=max_model_len + steps)
    num_blocks = _num_blocks(config, model, dtype, device, max_model_len)
    kv_caches = allocate_kv_cache(model, num_blocks, config.cache.block_size, dtype, device)
    backend = get_backend("sdpa")
    runner = ModelRunner(model, kv_caches, config.cache.block_size, backend, eos, device, config.model.seed)
    blocks = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
    scheduler = Scheduler(config.scheduler, blocks, max_model_len, eos)
    info = ModelInfo(source.name, max_model_len, eos, num_blocks, device.type, str(dtype).removeprefix("torch."), time.monotonic() - start)
    log.info("engine ready: %s on %s (%s), %d KV blocks, max_model_len %d, in %.1fs", info.name, info.device, info.dtype, num_blocks, max_model_len, info.load_seconds)
    return EngineCore(scheduler, runner), tokenizer, info
