"""One process's place in a tensor-parallel group, and what the builder asks of it.

``TensorParallel`` is what ``executor.builder`` calls at each step that differs between ranks: the
device, the shard of the config, of the weights and of LoRA adapters' pairs, the all-reduces in the
model and the number of KV blocks every rank can hold. With one rank (``SINGLE``) every call is the
identity, so the single-process engine runs the same builder.
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from stepserve.config import ConfigError
from stepserve.distributed.layers import join_ranks
from stepserve.distributed.sharding import check_tensor_parallel, cut, cut_adapter, shard_config, take, take_slice
from stepserve.models.config import DecoderConfig

log = logging.getLogger("stepserve.distributed")

# The longest one rank waits inside a collective for another. Ranks run the same pass at the
# same time, so only a broken group waits this long; loading (ranks read their shards side by
# side, then agree on the KV cache size) is the longest legitimate wait.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes: the only difference of the two paths."""
    return "nccl" if device_type == "cuda" else "gloo"


def check_devices(size: int, device_type: str) -> None:
    if size == 1:
        return
    if device_type == "cuda" and size > torch.cuda.device_count():
        raise ConfigError(
            f"tensor_parallel_size={size} needs {size} GPUs (one per rank); {torch.cuda.device_count()} are visible"
        )
    cpus = len(os.sched_getaffinity(0))
    if device_type == "cpu" and size > cpus:
        raise ConfigError(f"tensor_parallel_size={size} on CPU needs a core per rank; this process may use {cpus}")


class TensorParallel:
    """Rank ``rank`` of ``size``; on rank 0 of a group, also the other ranks' processes."""

    def __init__(self, rank: int, size: int, ranks=None) -> None:
        self.rank, self.size = rank, size
        self.ranks = ranks  # RankProcesses on rank 0 of a group; None elsewhere

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank: rank r computes on cuda:r."""
        if device.type != "cuda" or self.size == 1:
            return device
        torch.cuda.set_device(self.rank)
        return torch.device("cuda", self.rank)

    def shard_config(self, cfg: DecoderConfig) -> DecoderConfig:
        return shard_config(cfg, self.size)

    def weights(self, checkpoint, cfg: DecoderConfig, weights, load_format: str, dtype=torch.float32, device="cpu"):
        """This rank's weight stream: None for dummy weights, else only its slices. A safetensors
        checkpoint is read slice by slice (a rank reads its rows or columns, not whole
        tensors); a GGUF's or an FP8 checkpoint's tensors are dequantized whole, then cut."""
        if weights is not None and self.size > 1:
            raise ConfigError(
                "a weight stream handed to build_engine cannot reach "
                "the other tensor-parallel ranks; give the model's files"
            )
        if weights is not None or load_format == "dummy":
            return weights
        if self.size == 1:
            return checkpoint.weights(dtype, device)
        if checkpoint.source.gguf_path is not None or checkpoint.fp8_format is not None:
            return (
                (name, take(t, cut(name, cfg, self.rank, self.size))) for name, t in checkpoint.weights(dtype, device)
            )
        from stepserve.models.weights import safetensors_weights

        def read(key: str, f) -> torch.Tensor:
            return take_slice(lambda: f.get_slice(key), lambda: f.get_tensor(key), cut(key, cfg, self.rank, self.size))

        return safetensors_weights(checkpoint.source.directory, read)

    def adapter_shard(self, cfg: DecoderConfig):
        """``(module path, A, B) -> (A, B)``: this rank's share of a LoRA pair of the model
        ``cfg`` (whole, not this rank's shard); None with one rank."""
        if self.size == 1:
            return None
        return functools.partial(cut_adapter, cfg=cfg, rank=self.rank, size=self.size)

    def join(self, model) -> None:
        """Insert the all-reduces after the row-parallel projections."""
        if self.size > 1:
            join_ranks(model, None)

    def min(self, n: int, device: torch.device) -> int:
        """The smallest ``n`` of all ranks (the KV blocks every rank can hold)."""
        if self.size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = TensorParallel(0, 1)


def set_cpu_threads(size: int) -> None:
    """Ranks on one CPU share its cores: each gets its share of the threads."""
    threads = max(1, len(os.sched_getaffinity(0)) // size)
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)


def init_group(rank: int, size: int, store: str, device_type: str) -> None:
    dist.init_process_group(
        backend_for(device_type), init_method=f"file://{store}", rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT
    )


def start_tensor_parallel(
    config, model_config: DecoderConfig, eos_token_ids: frozenset[int], device: torch.device, quantization: str
) -> TensorParallel:
    """Rank 0: check the split, start ranks 1..N-1 (they load their shards while this process
    loads its own) and join them in the process group. ``SINGLE`` when there is one rank."""
    size = config.parallel.tensor_parallel_size
    check_tensor_parallel(size, model_config, quantization)
    check_devices(size, device.type)
    if size == 1:
        return SINGLE
    if dist.is_initialized():
        raise ConfigError(
            "this process already holds a tensor-parallel group; close that engine first (one group per process)"
        )
    from stepserve.distributed.ranks import RankProcesses

    if device.type == "cpu":
        set_cpu_threads(size)
    ranks = RankProcesses(config, eos_token_ids, size)
    log.info("tensor parallelism: %d ranks over %s (rank pids %s)", size, backend_for(device.type), ranks.pids)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    try:
        init_group(0, size, ranks.store, device.type)
    except BaseException:
        ranks.close()
        raise
    return TensorParallel(0, size, ranks)
