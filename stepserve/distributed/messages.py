"""What rank 0 and the other ranks say to each other over their sockets (the collectives of the
forward pass go over torch.distributed; these carry the control flow)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankStart:
    """The first message a rank process receives: everything it needs to build its shard."""

    config: object  # the EngineConfig, as rank 0 holds it
    eos_token_ids: frozenset[int]  # read once by the front (a rank loads no tokenizer for them)
    rank: int  # this process's rank, 1..size-1
    size: int  # tensor_parallel_size
    store: str  # the FileStore path of torch.distributed's rendezvous
    parent_pid: int  # rank 0's process id: the rank dies with it


@dataclass(frozen=True)
class RankReady:
    """A rank built its shard, its KV cache and its runner, and is taking passes."""

    rank: int
    pid: int


@dataclass(frozen=True)
class RankFailed:
    """A rank could not start; it exits after sending this."""

    rank: int
    traceback: str


@dataclass(frozen=True)
class PassMessage:
    """One scheduler pass as a rank receives it: each request's ``token_ids`` holds only the
    tokens that rank has not been sent yet (a pass would otherwise carry every request's whole
    history, which costs more to pickle than a decode step on a GPU takes)."""

    sched: object  # the SchedulerOutput, token_ids cut down to the new tokens, params only on a request's first pass
    offsets: tuple[int, ...]  # per request: tokens sent before (the receiver checks it holds as many)


@dataclass(frozen=True)
class PassDone:
    """A rank ran one scheduler pass; rank 0 checks that every rank agrees with it."""

    digest: int | None  # hash of the sampled token ids (every rank samples the same tokens)
    error: str | None  # the exception's type name when the pass raised


@dataclass(frozen=True)
class Reseed:
    """Reset the engine's shared generator (after warm-up), on every rank alike."""

    seed: int


@dataclass(frozen=True)
class CloseRank:
    """Exit 0."""
