"""Timing one kernel call on the GPU for the kernel sweeps in ``bench/``: the calls captured in a
CUDA graph and replayed, so that launch overhead does not hide a few-microsecond kernel."""

from __future__ import annotations

import json

import torch


def graph_us(fn, reps: int = 20) -> float:
    """Microseconds a call of ``fn``: ``reps`` calls in one CUDA graph, replayed once to warm up
    and once timed. Without CUDA (a sweep's smoke run under Triton's interpreter) ``fn`` runs
    once and the time is 0."""
    fn()
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def save(results: dict, path: str | None) -> None:
    """Write a sweep's results so far to ``path`` (if given): the sweeps save after every size, so
    one cut short by a time limit still leaves what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
