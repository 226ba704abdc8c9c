"""``stepserve bench serve --sweep 1,4,16,64 [--plot FILE.png]``: the same workload at each
concurrency, one table row per point, and a plot of throughput and latency against concurrency.

Each point is a full ``bench serve`` run with ``--max-concurrency`` set to the point and the
same dataset (same seed), so the points differ in concurrency only.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys

import httpx

from stepserve.bench.serve import run


def sweep(args: argparse.Namespace) -> list[dict]:
    results = []
    for concurrency in args.sweep:
        if concurrency > args.num_prompts:
            print(
                f"note: concurrency {concurrency} > --num-prompts {args.num_prompts}: "
                f"at most {args.num_prompts} run at once",
                file=sys.stderr,
            )
        point = argparse.Namespace(**{**vars(args), "max_concurrency": concurrency, "request_rate": float("inf")})
        results.append(asyncio.run(run(point)))
        print(table(results[-1:], header=len(results) == 1), flush=True)
    return results


COLUMNS = (
    ("concurrency", "max_concurrency", "{}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("out tok/s", "output_throughput", "{:.1f}"),
    ("total tok/s", "total_token_throughput", "{:.1f}"),
    ("TTFT mean ms", ("ttft_ms", "mean"), "{:.0f}"),
    ("TTFT p99 ms", ("ttft_ms", "p99"), "{:.0f}"),
    ("TPOT mean ms", ("tpot_ms", "mean"), "{:.1f}"),
    ("TPOT p99 ms", ("tpot_ms", "p99"), "{:.1f}"),
    ("failed", "failed", "{}"),
)


def _value(result: dict, key):
    return result[key[0]][key[1]] if isinstance(key, tuple) else result[key]


def table(results: list[dict], header: bool = True) -> str:
    """A markdown table, one row per point."""
    lines = []
    if header:
        lines.append("| " + " | ".join(title for title, _, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
    for r in results:
        lines.append("| " + " | ".join(fmt.format(_value(r, key)) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: str, title: str) -> None:
    """Two panels against concurrency (log scale): throughput; TTFT and TPOT (mean, p99)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    x = [r["max_concurrency"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    left.plot(x, [r["output_throughput"] for r in results], "o-", label="output")
    left.plot(x, [r["total_token_throughput"] for r in results], "s--", label="prompt + output")
    left.set(xlabel="concurrent requests", ylabel="tokens/s", title="throughput")
    for metric, marker, color in (("ttft_ms", "o", "tab:red"), ("tpot_ms", "s", "tab:green")):
        name = metric.split("_")[0].upper()
        right.plot(x, [r[metric]["mean"] for r in results], marker + "-", color=color, label=f"{name} mean")
        right.plot(x, [r[metric]["p99"] for r in results], marker + ":", color=color, label=f"{name} p99")
    right.set(xlabel="concurrent requests", ylabel="ms", title="latency (log scale)", yscale="log")
    right.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    right.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    right.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(c) for c in x])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so before the long run
        print("stepserve bench serve: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    try:
        results = sweep(args)
    except httpx.HTTPError as exc:
        print(f"stepserve bench serve: cannot reach {args.base_url}: {exc}", file=sys.stderr)
        return 1
    print(f"\n{table(results)}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        first = results[0]
        title = (
            f"{first['model']}: {args.num_prompts} requests of {args.input_len} words in, "
            f"{args.output_len} tokens out ({first['date']})"
        )
        plot(results, args.plot, title)
        print(f"plot written to {args.plot}")
    return 0 if all(r["completed"] for r in results) else 1
