"""Where a GPU waits: the idle gaps between device activities in a profiler trace.

    python -m stepserve.bench.trace_gaps TRACE.json[.gz] [--min-us 10] [--top 10]

A kernel table says what the GPU did; at batch 1 a good part of a decode step is the GPU doing
nothing (busy shares of 0.85-0.92 on an H100), and the table cannot say where. This reads a
Chrome trace written by ``torch.profiler`` (``export_chrome_trace``; the GPU benchmarks write one
beside each batch-1 profile), takes the device's kernels, copies and memsets, merges them into
busy intervals (several streams may overlap) and reports the gaps between: the idle total, how
it splits by gap size, and the largest gaps with the activity before and after each, which tells
a gap at a pass boundary (the host scheduling, a sync) from gaps between a graph's kernels.
"""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
BUCKETS_US = (10.0, 50.0, 200.0, 1000.0)  # gap size classes: [10, 50), [50, 200), [200, 1000), >= 1000


@dataclass(frozen=True)
class Activity:
    start_us: float
    end_us: float
    name: str


def read_trace(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def device_activities(trace: dict) -> list[Activity]:
    """The device's complete events ("X") of the kernel, copy and memset categories, by start."""
    out = [
        Activity(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), str(e.get("name", "?")))
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES
    ]
    return sorted(out, key=lambda a: a.start_us)


def gap_summary(activities: list[Activity], min_us: float = 10.0, top: int = 10) -> dict:
    """Idle time between the merged busy intervals of ``activities`` (sorted by start): totals, the
    gaps of at least ``min_us`` by size class, and the ``top`` largest with their neighbours."""
    if not activities:
        return {"activities": 0}
    gaps = []  # (gap_us, activity before, activity after)
    busy = 0.0
    first, last_end, last = activities[0].start_us, activities[0].end_us, activities[0]
    run_start = first
    for a in activities[1:]:
        if a.start_us > last_end:
            busy += last_end - run_start
            gaps.append((a.start_us - last_end, last.name, a.name))
            run_start = a.start_us
        if a.end_us >= last_end:
            last_end, last = a.end_us, a
    busy += last_end - run_start
    span = last_end - first
    counted = [g for g in gaps if g[0] >= min_us]
    classes = {}
    for low, high in zip(BUCKETS_US, BUCKETS_US[1:] + (float("inf"),)):
        inside = [g[0] for g in counted if low <= g[0] < high]
        label = f">= {low:g} us" if high == float("inf") else f"{low:g}-{high:g} us"
        classes[label] = {"gaps": len(inside), "idle_us": round(sum(inside), 1)}
    largest = sorted(counted, key=lambda g: g[0], reverse=True)[:top]
    return {
        "activities": len(activities),
        "span_us": round(span, 1),
        "busy_us": round(busy, 1),
        "idle_us": round(span - busy, 1),
        "busy_share": round(busy / span, 3) if span > 0 else None,
        "min_gap_us": min_us,
        "idle_us_counted": round(sum(g[0] for g in counted), 1),  # in gaps of min_gap_us or more
        "by_size": classes,
        "largest": [
            {"gap_us": round(g, 1), "after": before[:100], "before": after[:100]} for g, before, after in largest
        ],
    }


def report(summary: dict) -> str:
    """The summary as a few lines of text (for the profile files and stdout)."""
    if not summary.get("activities"):
        return "no device activity in the trace\n"
    lines = [
        f"device activities {summary['activities']}, span {summary['span_us']} us, busy {summary['busy_us']} us "
        f"({summary['busy_share']}), idle {summary['idle_us']} us",
        "idle by gap size: "
        + ", ".join(f"{label}: {c['gaps']} gaps, {c['idle_us']} us" for label, c in summary["by_size"].items()),
        "largest gaps:",
    ]
    lines += [f"  {g['gap_us']} us after {g['after']} / before {g['before']}" for g in summary["largest"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="a Chrome trace from torch.profiler (.json or .json.gz)")
    parser.add_argument("--min-us", type=float, default=10.0, help="smallest gap counted by size (default 10)")
    parser.add_argument("--top", type=int, default=10, help="largest gaps listed (default 10)")
    args = parser.parse_args(argv)
    print(report(gap_summary(device_activities(read_trace(args.trace)), args.min_us, args.top)), end="")


if __name__ == "__main__":
    main()
