"""stepserve beside peer servers on the CPU: each server alone, the same client, the same workloads.

    python bench/sitting.py \\
        --server 'stepserve=stepserve serve --model-name smollm2 --http-port {port}' \\
        --server 'llama-server=$PEERS/llama.cpp/build/bin/llama-server -m $GGUF --alias smollm2 \\
            --host 127.0.0.1 --port {port} -t 2 -np 16 -c 16384 -cb'

Each ``--server NAME=COMMAND`` (``{port}`` is filled in; run through the shell, in its own process
group) is started alone, waited for on ``/v1/models``, warmed up with 2 requests, then driven by
stepserve's client (``stepserve.bench.serve``, vLLM's definitions) through two workloads of
128-word prompts and 64 output tokens with ``ignore_eos``: 16 requests one at a time, then 64
requests 16 at a time; then stopped. The tokens each server really produced are counted (from
its ``usage``), since some peers do not always honour ``ignore_eos``. The machine's load
averages (``/proc/loadavg``) are read before and after each server: on a shared machine the
figures are taken under that load. Prints a markdown table; ``--output-json`` keeps everything.
How to install the peers: ``../shared/peers/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stepserve.bench import serve as client  # noqa: E402

WORKLOADS = (("1 stream", 16, 1), ("16 streams", 64, 16))  # (label, requests, concurrency)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _client_args(base_url: str, num: int, concurrency: int, seed: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    client.add_args(parser)
    return parser.parse_args(
        [
            "--base-url",
            base_url,
            "--num-prompts",
            str(num),
            "--max-concurrency",
            str(concurrency),
            "--input-len",
            "128",
            "--output-len",
            "64",
            "--ignore-eos",
            "--seed",
            str(seed),
            "--disable-tqdm",
        ]
    )


def _wait_ready(base_url: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(base_url + "/v1/models", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready in {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the server and what it started
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def sit(name: str, command: str, port: int, ready_timeout: float, log_dir: Path) -> dict:
    base_url = f"http://127.0.0.1:{port}"
    row = {"server": name, "command": command, "load_before": _load()}
    log = open(log_dir / f"{name.replace(' ', '_').replace('/', '_')}.log", "w")
    proc = subprocess.Popen(
        command.format(port=port), shell=True, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        row["ready_s"] = _wait_ready(base_url, proc, ready_timeout)
        asyncio.run(client.run(_client_args(base_url, 2, 1, seed=99)))  # warm-up, other prompts
        for label, num, concurrency in WORKLOADS:
            row[label] = asyncio.run(client.run(_client_args(base_url, num, concurrency, seed=0)))
    except Exception as err:  # one server failing must not end the sitting
        row["error"] = f"{type(err).__name__}: {err}"
    finally:
        _stop(proc)
        log.close()
    row["load_after"] = _load()
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| server | 1 stream: out tok/s | TPOT ms | TTFT ms | 16 streams: out tok/s | TTFT ms | TPOT ms "
        "| tokens (c1 / c16) | failed | load avg before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['server']} | {row['error']} | | | | | | | | {row['load_before']} -> {row['load_after']} |"
            )
            continue
        one, many = row["1 stream"], row["16 streams"]
        lines.append(
            f"| {row['server']} | {one['output_throughput']:.1f} | {one['tpot_ms']['mean']:.1f} "
            f"| {one['ttft_ms']['mean']:.0f} "
            f"| {many['output_throughput']:.1f} | {many['ttft_ms']['mean']:.0f} | {many['tpot_ms']['mean']:.1f} "
            f"| {one['total_output_tokens']} / {many['total_output_tokens']} | {one['failed'] + many['failed']} "
            f"| {row['load_before']} -> {row['load_after']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--server", action="append", required=True, metavar="NAME=COMMAND", help="a server to sit, {port} filled in"
    )
    parser.add_argument("--port", type=int, default=8190)
    parser.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds a server may take to answer /v1/models"
    )
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--log-dir", default=".", help="each server's output goes to NAME.log here")
    args = parser.parse_args()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    rows = []
    for spec in args.server:
        name, _, command = spec.partition("=")
        print(f"sitting {name} (load {_load()})", file=sys.stderr, flush=True)
        rows.append(sit(name, command, args.port, args.ready_timeout, Path(args.log_dir)))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs")
    print(table(rows))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=2))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
