"""Weight-loading progress: a bar over tensors (with the shard) on a terminal, one log line per
shard otherwise (a pod's log, a file), so that loading a large checkpoint is never silent."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from typing import IO

import torch

log = logging.getLogger("stepserve.loader")

Weights = Iterator[tuple[str, torch.Tensor]]


class LoadProgress:
    """Wraps each shard's ``(name, tensor)`` stream; readers call ``shard`` once per file."""

    def __init__(self, num_shards: int, total_tensors: int | None = None, stream: IO[str] | None = None) -> None:
        self.num_shards = num_shards
        self.known_total = total_tensors is not None  # else the total grows as shards open
        stream = stream or sys.stderr
        self.bar = _bar(total_tensors, stream) if stream.isatty() else None

    def shard(self, index: int, label: str, num_tensors: int, tensors: Weights) -> Weights:
        """``tensors`` of shard ``index`` (0-based), counted as they are consumed."""
        if self.bar is not None:
            if not self.known_total:
                self.bar.total = (self.bar.total or 0) + num_tensors
            self.bar.set_postfix_str(f"shard {index + 1}/{self.num_shards}")
        start, count, nbytes = time.monotonic(), 0, 0
        for name, tensor in tensors:
            count, nbytes = count + 1, nbytes + tensor.nbytes
            if self.bar is not None:
                self.bar.update(1)
            yield name, tensor
        self._shard_done(index, label, count, nbytes, time.monotonic() - start)

    def _shard_done(self, index: int, label: str, count: int, nbytes: int, seconds: float) -> None:
        if self.bar is None:
            log.info(
                "loaded weights shard %d/%d (%s): %d tensors, %.1f MiB in %.1fs",
                index + 1,
                self.num_shards,
                label,
                count,
                nbytes / 2**20,
                seconds,
            )
        elif index + 1 == self.num_shards:
            self.bar.close()


def _bar(total: int | None, stream: IO[str]):
    from tqdm import tqdm

    return tqdm(total=total, desc="Loading weights", unit="tensor", file=stream)
