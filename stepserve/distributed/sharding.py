"""How a dense decoder splits over tensor-parallel ranks: which sizes a rank holds and which
slice of each checkpoint tensor it reads. Pure shape logic; no processes, no collectives.

The layout is Megatron's, as vLLM uses it:

- column-parallel q/k/v and gate/up: rank r holds heads ``[r*H/N, (r+1)*H/N)`` (and their KV
  heads) and the same share of the intermediate size, so attention and the activation run on
  local data;
- row-parallel o and down: rank r multiplies its slice of the input dimension and an all-reduce
  sums the partial outputs (``layers.py``); their bias is added once, by rank 0;
- KV heads split when N divides them; when there are fewer KV heads than ranks (N a multiple of
  them) each KV head is replicated on the N/KV ranks whose query heads read it, as vLLM does;
- the embedding, the LM head and the norms are replicated (see ``__init__``'s docstring for why).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stepserve.config import ConfigError
from stepserve.models.config import DecoderConfig

if TYPE_CHECKING:  # the front checks a split without PyTorch; the loader cuts tensors with it
    import torch

INT4_GROUP = 32  # cpu_linear.GROUP: a row-parallel input slice must hold whole int4 groups

ZERO = "zero"  # a cut that reads nothing: this rank's copy is zeros (a row-parallel bias off rank 0)


@dataclass(frozen=True)
class Part:
    """One contiguous slice of a checkpoint tensor."""

    dim: int  # 0: output rows (column-parallel), 1: input columns (row-parallel); 1 and 2 for stacked experts
    start: int  # first row or column
    length: int  # how many


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_tensor_parallel(size: int, cfg: DecoderConfig, quantization: str = "none") -> None:
    """Refuse, with what to change, a model that cannot split over ``size`` ranks."""
    if size == 1:
        return
    h, kv = cfg.num_heads, cfg.num_kv_heads
    if h % size:
        raise ConfigError(
            f"tensor_parallel_size={size} must divide the model's {h} attention heads; use one of {_divisors(h)}"
        )
    if kv % size and size % kv:
        raise ConfigError(
            f"tensor_parallel_size={size} and the model's {kv} KV heads: one must divide the other "
            f"(split when {size} divides {kv}, replicated when {kv} "
            f"divides {size}); use one of {_divisors(h)} that does"
        )
    if cfg.intermediate_size % size:
        raise ConfigError(
            f"tensor_parallel_size={size} must divide the model's intermediate_size "
            f"{cfg.intermediate_size}; use one of {_divisors(cfg.intermediate_size)}"
        )
    moe = cfg.moe
    for what, n in (
        ("moe_intermediate_size", moe and moe.intermediate_size),
        ("shared expert's width", moe and moe.shared_intermediate_size),
    ):
        if n and n % size:
            raise ConfigError(
                f"tensor_parallel_size={size} must divide the model's {what} {n}; use one of {_divisors(n)}"
            )
    if quantization == "int4":
        for what, n in (
            ("attention width (heads x head_dim)", h * cfg.head_dim),
            ("intermediate_size", cfg.intermediate_size),
        ):
            if (n // size) % INT4_GROUP:
                raise ConfigError(
                    f"quantization=int4 with tensor_parallel_size={size}: each rank's share of the {what} {n} "
                    f"must hold whole groups of {INT4_GROUP} weights; "
                    "use a smaller tensor_parallel_size or --quantization none"
                )


def check_tensor_parallel_startup(config, cfg: DecoderConfig) -> None:
    """What the front checks before it starts the core: the model splits over the ranks, and a
    CPU group has a core per rank. A GPU group's devices are counted by the core (``group.py``),
    the process that imports CUDA."""
    size = config.parallel.tensor_parallel_size
    check_tensor_parallel(size, cfg, config.model.quantization)
    cpus = len(os.sched_getaffinity(0))
    if size > 1 and config.model.device == "cpu" and size > cpus:
        raise ConfigError(f"tensor_parallel_size={size} on CPU needs a core per rank; this process may use {cpus}")


def shard_config(cfg: DecoderConfig, size: int) -> DecoderConfig:
    """The decoder one rank builds: its heads, its KV heads, its share of the intermediate."""
    if size == 1:
        return cfg
    moe = cfg.moe
    if moe is not None:  # each rank holds every expert, with its share of each one's inner width
        moe = dataclasses.replace(
            moe,
            intermediate_size=moe.intermediate_size // size,
            shared_intermediate_size=moe.shared_intermediate_size // size,
        )
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // size,
        num_kv_heads=max(1, cfg.num_kv_heads // size),
        intermediate_size=cfg.intermediate_size // size,
        moe=moe,
    )


def _kv_heads(cfg: DecoderConfig, rank: int, size: int) -> tuple[int, int]:
    """(first KV head, count) of a rank; with fewer KV heads than ranks, the one its queries read."""
    if cfg.num_kv_heads >= size:
        per = cfg.num_kv_heads // size
        return rank * per, per
    return rank // (size // cfg.num_kv_heads), 1


def cut(name: str, cfg: DecoderConfig, rank: int, size: int) -> tuple[Part, ...] | str | None:
    """What rank ``rank`` reads of the checkpoint tensor ``name`` (a Hugging Face name): parts
    concatenated along their dim, ``ZERO``, or None for the whole tensor (replicated)."""
    if size == 1:
        return None
    module, kind = name.split(".")[-2:]
    hd, inter = cfg.head_dim, cfg.intermediate_size
    if ".experts." in name or ".shared_expert." in name:
        return _expert_cut(name, cfg, rank, size)
    q_per = cfg.num_heads // size * hd
    kv_first, kv_count = _kv_heads(cfg, rank, size)
    q = Part(0, rank * q_per, q_per)
    k = Part(0, kv_first * hd, kv_count * hd)
    gate = Part(0, rank * (inter // size), inter // size)
    if module == "q_proj":
        return (q,)
    if module in ("k_proj", "v_proj"):
        return (k,)
    if module == "qkv_proj":  # Phi-3 stores q, k and v stacked in one tensor
        q_full, kv_full = cfg.num_heads * hd, cfg.num_kv_heads * hd
        return q, Part(0, q_full + k.start, k.length), Part(0, q_full + kv_full + k.start, k.length)
    if module in ("gate_proj", "up_proj"):
        return (gate,)
    if module == "gate_up_proj":  # Phi-3 stores gate and up stacked
        return gate, Part(0, inter + gate.start, gate.length)
    if module in ("o_proj", "down_proj"):
        if kind == "bias":  # summed over ranks by the all-reduce: only rank 0 adds it
            return None if rank == 0 else ZERO
        width = q_per if module == "o_proj" else inter // size
        return (Part(1, rank * width, width),)
    return None


def _expert_cut(name: str, cfg: DecoderConfig, rank: int, size: int) -> tuple[Part, ...]:
    """An expert's (or the shared expert's) matrices split as a dense MLP's: gate and up by rows
    of the inner width, down by its columns. transformers 5's stacked layout ([E, 2I, H] and
    [E, H, I]) is cut along the same axes, one further in."""
    inner = cfg.moe.shared_intermediate_size if ".shared_expert." in name else cfg.moe.intermediate_size
    share = inner // size
    module = name.split(".")[-2] if name.endswith((".weight", ".bias")) else name.split(".")[-1]
    if module in ("gate_proj", "up_proj", "w1", "w3"):
        return (Part(0, rank * share, share),)
    if module in ("down_proj", "w2") and name.endswith(".weight"):
        return (Part(1, rank * share, share),)
    if module == "gate_up_proj":  # stacked: [E, 2I, H]
        return Part(1, rank * share, share), Part(1, inner + rank * share, share)
    if module == "down_proj":  # stacked: [E, H, I]
        return (Part(2, rank * share, share),)
    raise ConfigError(f"cannot split the expert weight {name!r} over tensor-parallel ranks")


def cut_adapter(path: str, a: torch.Tensor, b: torch.Tensor, cfg: DecoderConfig, rank: int, size: int):
    """A rank's share of one LoRA pair of the projection at ``path`` (PEFT's module path, e.g.
    ``model.layers.3.self_attn.q_proj`` or, for stacked experts, ``...mlp.experts.gate_up_proj``):
    PEFT's ``A`` [r, in] and ``B`` [out, r] (stacked experts: [E * r, in] and [out, r * E]), cut
    as the projection's weight is. A column-parallel projection keeps its rank's output rows, so
    ``B`` keeps those rows and ``A`` stays whole; a row-parallel one keeps its input columns, so
    ``A`` keeps those columns and ``B`` stays whole: each rank's delta is then a partial sum, and
    the all-reduce after the projection adds the ranks' deltas as it adds their partial products
    (``B (A x) = sum over ranks of B (A_r x_r)``)."""
    import torch

    stacked = ".experts." in path  # [E, out, in]: the weight's axes are one further in
    parts = cut(path if stacked else f"{path}.weight", cfg, rank, size)
    if parts is None or parts == ZERO:
        return a, b
    if parts[0].dim == (1 if stacked else 0):  # output rows
        return a, torch.cat([b.narrow(0, p.start, p.length) for p in parts])
    return torch.cat([a.narrow(1, p.start, p.length) for p in parts], dim=1), b


def take(tensor: torch.Tensor, parts: tuple[Part, ...] | str | None) -> torch.Tensor:
    import torch

    """A rank's share of a whole tensor (a GGUF's, or any ``(name, tensor)`` stream's)."""
    if parts is None:
        return tensor
    if parts == ZERO:
        return torch.zeros_like(tensor)
    return torch.cat([tensor.narrow(p.dim, p.start, p.length) for p in parts], dim=parts[0].dim)


def take_slice(get_slice: Callable[[], object], get_tensor: Callable[[], torch.Tensor], parts) -> torch.Tensor:
    import torch

    """The same from a safetensors file, reading only the rank's rows or columns from disk."""
    if parts is None or parts == ZERO:
        return take(get_tensor(), parts)
    view = get_slice()
    pieces = [view[(slice(None),) * p.dim + (slice(p.start, p.start + p.length),)] for p in parts]
    return torch.cat(pieces, dim=parts[0].dim)
