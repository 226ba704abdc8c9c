"""A soak: ``stepserve bench soak --duration-s N`` starts a server, drives a mixed load, and
reports whether anything leaked or got stuck.

The mix: streams, non-streams, chat, ``n > 1``, clients that disconnect mid-stream, clients
that abort before the answer, bad inputs (cases from the fuzzer), and bursts beyond the
admission limit (429s). At the end, after the load stops:

- requests by outcome (HTTP status, or what the client did), and problems: any 5xx, dropped
  connection, stream that did not end in exactly one ``[DONE]``, or error in the server's log
  (a handler that failed after its client left is a 500 nobody receives);
- RSS of the server and the engine core process at start, after warm-up and at the end, and
  sampled about twenty times during the load, so that a plateau shows apart from steady growth.
  The warm-up opens with the mix's largest and rarest requests, one each (``ENVELOPE``: the
  fuzzer's longest prompt, a constrained one), so that the processes' high-water marks and
  one-time builds fall before the warm-up sample, and growth after it means a leak;
- open file descriptors of both at start and at the end (must be back where they started);
- KV cache usage and running/waiting requests at rest (must be 0);
- whether every request ended exactly once: each request id has one "finished" log line,
  every id a client was answered with has one, and the completions those lines count equal the
  completions the metrics saw finish (each completion's end is counted in one place).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from stepserve.bench import fuzz

DEFAULT_SERVE_ARGS = (
    "--max-num-seqs 8 --max-queue-len 8 --default-max-tokens 32 --max-tokens-limit 64 --num-scheduler-steps 4"
)
_FINISHED = re.compile(r"request (\S+) finished: .*completions=(\d+) ")


@dataclass(frozen=True)
class ProcessSample:
    rss_mib: float  # resident set size
    fds: int  # open file descriptors


@dataclass
class SoakReport:
    duration_s: float = 0.0
    outcomes: Counter = field(default_factory=Counter)  # status or client action -> count
    problems: list[str] = field(default_factory=list)
    samples: dict[str, dict[str, ProcessSample]] = field(
        default_factory=dict
    )  # "start"/"warm"/"end" -> process -> sample
    rss_series: dict[str, list[tuple[float, float]]] = field(
        default_factory=dict
    )  # process -> (seconds into the load, RSS MiB)
    kv_usage_at_rest: float = -1.0
    running_at_rest: float = -1.0
    finished_lines: int = 0  # "request ... finished" log lines
    duplicate_ids: int = 0  # ids with more than one such line
    answered_ids_missing: int = 0  # ids a client got that never logged "finished"
    completions_logged: int = 0  # sum of completions= over those lines
    completions_metered: int = 0  # sum of request_success_total over finish reasons
    server_exit_code: int | None = None

    @property
    def ended_exactly_once(self) -> bool:
        return (
            self.duplicate_ids == 0
            and self.answered_ids_missing == 0
            and self.completions_logged == self.completions_metered
        )

    def rss_growth(self, process: str) -> float:
        """RSS growth of a process from after warm-up to the end, as a fraction."""
        warm, end = self.samples["warm"][process].rss_mib, self.samples["end"][process].rss_mib
        return end / warm - 1.0

    def fds_back(self, process: str) -> bool:
        return self.samples["end"][process].fds <= self.samples["start"][process].fds

    @property
    def ok(self) -> bool:
        fds = all(self.fds_back(p) for p in self.samples.get("end", {}))
        return (
            not self.problems
            and self.kv_usage_at_rest == 0
            and self.running_at_rest == 0
            and self.ended_exactly_once
            and fds
        )

    def lines(self) -> list[str]:
        out = [f"soak: {self.duration_s:.0f}s of load, {sum(self.outcomes.values())} requests"]
        out.append(
            "outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items(), key=lambda kv: str(kv[0])))
        )
        for process in self.samples.get("start", {}):
            s, w, e = (self.samples[k][process] for k in ("start", "warm", "end"))
            out.append(
                f"{process}: RSS {s.rss_mib:.1f} -> {w.rss_mib:.1f} (warm) -> {e.rss_mib:.1f} MiB "
                f"({self.rss_growth(process) * 100:+.1f}% after warm-up); open fds {s.fds} -> {e.fds}"
            )
        for process, series in self.rss_series.items():
            out.append(
                f"{process} RSS during the load (s: MiB): " + ", ".join(f"{t:.0f}: {rss:.0f}" for t, rss in series)
            )
        out.append(f"at rest: KV usage {self.kv_usage_at_rest}, running+waiting {self.running_at_rest}")
        out.append(
            f"ended exactly once: {self.ended_exactly_once} ({self.finished_lines} requests logged, "
            f"{self.duplicate_ids} twice, "
            f"{self.answered_ids_missing} answered but never logged; completions logged {self.completions_logged}, "
            f"metered {self.completions_metered})"
        )
        out.append(f"server exit code: {self.server_exit_code}")
        out.append(f"problems: {len(self.problems)}")
        out.extend("  " + p for p in self.problems[:20])
        out.append("OK" if self.ok else "FAILED")
        return out


# -- processes ----------------------------------------------------------------------------


def _sample(pid: int) -> ProcessSample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status)[1])
    return ProcessSample(rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd")))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _core_pid(server_pid: int) -> int | None:
    """The engine core: the server's child started by multiprocessing's spawn."""
    for pid in _children(server_pid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Server:
    process: subprocess.Popen
    url: str
    log_path: Path

    def pids(self) -> dict[str, int]:
        core = _core_pid(self.process.pid)
        return {"server": self.process.pid} | ({"core": core} if core is not None else {})


def _start_server(serve_args: list[str], log_path: Path, timeout: float = 600.0) -> _Server:
    port = _free_port()
    command = [sys.executable, "-m", "stepserve", "serve", "--host", "127.0.0.1", "--http_port", str(port), *serve_args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = _Server(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(server.url + "/v2/health/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server was not ready after {timeout}s; see {log_path}")


class _RssSampler(threading.Thread):
    """Samples each process's RSS every ``every_s`` seconds into ``report.rss_series``."""

    def __init__(self, pids: dict[str, int], report: SoakReport, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pids, self.report, self.every_s = pids, report, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stopped.wait(self.every_s):
            for name, pid in self.pids.items():
                try:
                    self.report.rss_series.setdefault(name, []).append((time.monotonic() - start, _sample(pid).rss_mib))
                except OSError:
                    continue  # the process is gone (a core restart): the report's problems say why


# -- the load -----------------------------------------------------------------------------


# The largest and rarest requests of the mix: a prompt as long as the fuzzer's longest (5,000
# token ids: the largest passes, whose buffers set the core's high-water mark), and a
# constrained one (the core builds llguidance's tokenizer for the first).
ENVELOPE = (
    ("/v1/completions", {"prompt": [1] * 5000, "max_tokens": 2}),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Say hi in JSON."}],
            "max_tokens": 8,
            "response_format": {"type": "json_object"},
        },
    ),
)


class _Load:
    """Workers that pick a kind of request at random until the deadline."""

    def __init__(
        self, client: httpx.AsyncClient, model: str, rng: random.Random, report: SoakReport, burst: int
    ) -> None:
        self.client, self.model, self.rng, self.report, self.burst = client, model, rng, report, burst
        self.answered_ids: set[str] = set()

    def _body(self, **kw) -> dict:
        prompt = " ".join(
            self.rng.choice(("soak", "the", "test", "of", "memory", "and", "time"))
            for _ in range(self.rng.randint(1, 40))
        )
        return {"model": self.model, "prompt": prompt, "max_tokens": self.rng.randint(1, 24)} | kw

    async def envelope(self) -> None:
        """One each of the mix's largest and rarest requests (see the module's docstring)."""
        for path, body in ENVELOPE:
            try:
                response = await self.client.post(path, json={"model": self.model, **body})
            except httpx.HTTPError as exc:
                self._note("dropped", f"{path}: dropped connection: {type(exc).__name__}: {exc}")
                continue
            # A 400 is an answer too (a prompt past a short context); what it reached is warmed.
            problem = (
                f"{path}: HTTP {response.status_code}: {response.text[:200]}" if response.status_code >= 500 else None
            )
            self._note(f"envelope {response.status_code}", problem)

    async def run(self, deadline: float, concurrency: int, burst_every_s: float) -> None:
        await asyncio.gather(
            self._bursts(deadline, burst_every_s), *(self._worker(deadline) for _ in range(concurrency))
        )

    async def _worker(self, deadline: float) -> None:
        kinds = (
            self._stream,
            self._stream,
            self._plain,
            self._chat,
            self._n_many,
            self._disconnect,
            self._abort,
            self._bad,
            self._bad,
        )
        while time.monotonic() < deadline:
            await self.rng.choice(kinds)()

    async def _bursts(self, deadline: float, every_s: float) -> None:
        """``burst`` requests at once every ``every_s``: beyond the admission limit, so some get 429."""
        while time.monotonic() + every_s < deadline:
            await asyncio.sleep(every_s)
            await asyncio.gather(*(self._plain() for _ in range(self.burst)))

    def _note(self, outcome, problem: str | None = None) -> None:
        self.report.outcomes[outcome] += 1
        if problem:
            self.report.problems.append(problem)

    async def _plain(self, path: str = "/v1/completions", body: dict | None = None) -> None:
        try:
            response = await self.client.post(path, json=body or self._body())
        except httpx.TimeoutException:
            return self._note("client timeout")
        except httpx.HTTPError as exc:
            return self._note("dropped", f"{path}: dropped connection: {type(exc).__name__}: {exc}")
        if response.status_code == 200:
            self.answered_ids.add(response.json()["id"])
        problem = (
            f"{path}: HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code not in (200, 429)
            else None
        )
        self._note(response.status_code, problem)

    async def _chat(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self._body()["prompt"]}],
            "max_tokens": self.rng.randint(1, 24),
        }
        await self._plain("/v1/chat/completions", body)

    async def _n_many(self) -> None:
        await self._plain(
            "/v1/completions", self._body(n=self.rng.randint(2, 4), temperature=0.8, seed=self.rng.randint(0, 99))
        )

    async def _stream(self, leave_after: int | None = None) -> None:
        body = self._body(stream=True, stream_options={"include_usage": True}, ignore_eos=self.rng.random() < 0.5)
        events = []
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    problem = f"stream: HTTP {response.status_code}" if response.status_code != 429 else None
                    return self._note(response.status_code, problem)
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                    if leave_after is not None and len(events) >= leave_after:
                        return self._note("disconnected mid-stream")
        except httpx.TimeoutException:
            return self._note("client timeout")
        except httpx.HTTPError as exc:
            return self._note("dropped", f"stream: dropped connection: {type(exc).__name__}: {exc}")
        self._note("stream 200", self._stream_problem(events))

    def _stream_problem(self, events: list[str]) -> str | None:
        if not events or events[-1] != "[DONE]" or events.count("[DONE]") != 1:
            return f"stream did not end with exactly one [DONE]: {events[-3:]}"
        for event in events[:-1]:
            chunk = json.loads(event)
            if "error" in chunk:
                return None if chunk["error"].get("code") == 429 else f"stream error event: {event[:200]}"
            self.answered_ids.add(chunk["id"])
        return None

    async def _disconnect(self) -> None:
        await self._stream(leave_after=self.rng.randint(1, 4))

    async def _abort(self) -> None:
        try:
            await asyncio.wait_for(
                self.client.post("/v1/completions", json=self._body(max_tokens=64, ignore_eos=True)),
                self.rng.uniform(0.01, 0.3),
            )
            self._note("answered before abort")
        except TimeoutError:
            self._note("aborted by client")
        except httpx.HTTPError as exc:
            self._note("dropped", f"abort: dropped connection: {type(exc).__name__}: {exc}")

    async def _bad(self) -> None:
        case = fuzz.make_case(self.rng, self.model)
        status, problem = await fuzz.send(self.client, case)
        self._note(f"fuzz {status}" if status < 300 else status, f"{case.what}: {problem}" if problem else None)


# -- the run ------------------------------------------------------------------------------


def _metric_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def _at_rest(url: str, report: SoakReport, timeout: float = 60.0) -> str:
    """Wait until nothing runs, then read KV usage; the last /metrics text."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", timeout=30).text
        busy = _metric_sum(text, "stepserve:num_requests_running") + _metric_sum(text, "stepserve:num_requests_waiting")
        if busy == 0 or time.monotonic() > deadline:
            report.running_at_rest = busy
            report.kv_usage_at_rest = _metric_sum(text, "stepserve:kv_cache_usage_perc")
            return text
        time.sleep(0.5)


def _check_log_errors(report: SoakReport, log_text: str) -> None:
    """Errors the clients cannot see (a handler that failed after its client left) still count."""
    errors = [line for line in log_text.splitlines() if " ERROR " in line or line.startswith(("Traceback", "ERROR:"))]
    report.problems += [f"server log: {line[:200]}" for line in errors]


def _check_endings(report: SoakReport, log_text: str, metrics_text: str, answered: set[str]) -> None:
    counts: Counter = Counter()
    for request_id, completions in _FINISHED.findall(log_text):
        counts[request_id] += 1
        report.completions_logged += int(completions)
    report.finished_lines = sum(counts.values())
    report.duplicate_ids = sum(1 for c in counts.values() if c > 1)
    report.answered_ids_missing = len(answered - set(counts))
    report.completions_metered = int(_metric_sum(metrics_text, "stepserve:request_success_total"))


async def _drive(
    url: str,
    model: str,
    seconds: float,
    concurrency: int,
    seed: int,
    burst: int,
    report: SoakReport,
    burst_every_s: float = 10.0,
    timeout_s: float = 300.0,
    envelope: bool = False,
) -> set[str]:
    limits = httpx.Limits(max_connections=concurrency + burst + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        load = _Load(client, model, random.Random(seed), report, burst)
        start = time.monotonic()
        if envelope:
            await load.envelope()
        await load.run(start + seconds, concurrency, burst_every_s)
    return load.answered_ids


def run(
    duration_s: float,
    serve_args: list[str],
    *,
    concurrency: int = 6,
    seed: int = 0,
    burst: int = 40,
    warmup_s: float | None = None,
    log_path: Path | None = None,
    timeout_s: float = 300.0,
) -> SoakReport:
    """Start a server with ``serve_args``, load it for ``duration_s`` and report."""
    report = SoakReport(duration_s=duration_s)
    log_path = log_path or Path(tempfile.mkdtemp(prefix="stepserve-soak-")) / "server.log"
    server = _start_server(serve_args, log_path)
    try:
        pids = server.pids()
        report.samples["start"] = {name: _sample(pid) for name, pid in pids.items()}
        model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        warmup = min(30.0, duration_s / 6) if warmup_s is None else warmup_s
        sampler = _RssSampler(pids, report, max(duration_s / 20, 1.0))
        sampler.start()
        answered = asyncio.run(
            _drive(server.url, model, warmup, concurrency, seed, burst, report, timeout_s=timeout_s, envelope=True)
        )
        report.samples["warm"] = {name: _sample(pid) for name, pid in pids.items()}
        answered |= asyncio.run(
            _drive(server.url, model, duration_s - warmup, concurrency, seed + 1, burst, report, timeout_s=timeout_s)
        )
        sampler.stopped.set()
        metrics_text = _at_rest(server.url, report)
        time.sleep(1.0)  # the server closes the client's last connections
        report.samples["end"] = {name: _sample(pid) for name, pid in pids.items()}
    finally:
        server.process.send_signal(signal.SIGTERM)
        try:
            report.server_exit_code = server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            report.server_exit_code = server.process.wait()
    log_text = log_path.read_text(errors="replace")
    _check_endings(report, log_text, metrics_text, answered)
    _check_log_errors(report, log_text)
    return report


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration-s", type=float, default=60.0, help="seconds of load (the first sixth, at most 30 s, is warm-up)"
    )
    parser.add_argument(
        "--serve-args", default=DEFAULT_SERVE_ARGS, help="flags for `stepserve serve` (add --model to pick a model)"
    )
    parser.add_argument("--concurrency", type=int, default=6, help="clients looping at once (bursts add more)")
    parser.add_argument(
        "--burst", type=int, default=40, help="requests fired at once in a burst, beyond the admission limit"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        help="client timeout per request (counted as an outcome, not a problem)",
    )
    parser.add_argument("--log", default=None, help="where the server's log goes (default: a temporary file)")


def main(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = run(
        args.duration_s,
        shlex.split(args.serve_args),
        concurrency=args.concurrency,
        seed=args.seed,
        burst=args.burst,
        log_path=Path(args.log) if args.log else None,
        timeout_s=args.timeout_s,
    )
    print("\n".join(report.lines()))
    return 0 if report.ok else 1
