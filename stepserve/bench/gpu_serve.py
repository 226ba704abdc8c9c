"""The GPU benchmark's server path and cold start (used by ``stepserve.bench.gpu``).

- ``write_vocab_tokenizer``: a word-level tokenizer that covers the model's whole vocabulary
  (every id decodes), and in which each word of ``bench serve``'s random prompts is one token,
  so ``--input-len 512`` sends 512 prompt tokens.
- ``serve_bench``: ``stepserve serve --load-format dummy`` in a child process, loaded by
  ``stepserve bench serve`` with 256 concurrent streams and with one, then the engine core is
  killed with SIGKILL and the time until ``/health`` answers 200 again is measured.
- ``cold_bench``: the offline 8B figure from a fresh process with an empty compilation cache
  (no warm-up other than the engine's own at startup).
- ``long_prompt_bench``: the same server at ``--max-model-len 32768``: TTFT, prefill tok/s and
  MFU of single 8k and 32k-token prompts, and the decode TPOT of 16 running streams alone and
  while a 32k-token prompt prefills beside them (chunked prefill must not starve them).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx

log = logging.getLogger("stepserve.bench")

SERVE_FLAGS = [
    "--max-model-len",
    "1024",
    "--max-num-seqs",
    "256",
    "--num-scheduler-steps",
    "8",
    "--max-num-batched-tokens",
    "8192",
]


def write_vocab_tokenizer(directory: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stepserve.bench.serve import WORDS

    # BOS and EOS sit at the model's ids (low ones too, as Gemma's 2 and 1); the words take the
    # lowest free ids, the rest of the vocabulary is reserved tokens.
    specials = {bos_id: "<|begin_of_text|>", eos_id: "<|end_of_text|>"}
    words = iter(["▁" + w for w in dict.fromkeys(WORDS)] + ["<unk>"])
    vocab = {specials.get(i) or next(words, None) or f"<|reserved_{i}|>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[bos_id], eos_token=specials[eos_id], unk_token="<unk>"
    )
    fast.save_pretrained(directory)


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status
    except Exception:  # refused, 503, timeout: not ready
        return 0


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if _health(port) == 200:
            return time.monotonic() - start
        time.sleep(0.1)
    raise TimeoutError(f"the server was not ready in {timeout:.0f}s")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and "resource_tracker" not in cmdline:
            out.append(int(entry.name))
    return out


def _bench_serve(port: int, out: Path, name: str, num: int, concurrency: int) -> dict:
    path = out / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "stepserve",
        "bench",
        "serve",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--num-prompts",
        str(num),
        "--max-concurrency",
        str(concurrency),
        "--input-len",
        "512",
        "--output-len",
        "256",
        "--ignore-eos",
        "--disable-tqdm",
        "--output-json",
        str(path),
    ]
    subprocess.run(cmd, check=True, timeout=600)
    return json.loads(path.read_text())


def _serve_command(model_dir: Path, port: int, cache_dir: Path, flags: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stepserve",
        "serve",
        "--model",
        str(model_dir),
        "--load-format",
        "dummy",
        "--http-port",
        str(port),
        "--compilation-cache-dir",
        str(cache_dir),
        *flags,
    ]


@contextlib.contextmanager
def _server(cmd: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """The server as a child process, its output in ``log_path``; however the block ends, the
    child gets SIGTERM (it stops its engine core), and SIGKILL if it is not gone in 30 s."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_bench(model_dir: Path, out: Path, cache_dir: Path, flags: list[str] = (), port: int = 8391) -> dict:
    cmd = _serve_command(model_dir, port, cache_dir, [*SERVE_FLAGS, *flags])
    results: dict = {"command": " ".join(cmd[1:])}
    with _server(cmd, out / "serve_8b.log") as proc:
        results["startup_s"] = round(_wait_ready(port, proc, 600), 1)
        many = _bench_serve(port, out, "serve_256", 256, 256)
        one = _bench_serve(port, out, "serve_1", 4, 1)
        results["streams_256"] = {
            k: many[k]
            for k in (
                "completed",
                "failed",
                "duration_s",
                "total_input_tokens",
                "total_output_tokens",
                "output_throughput",
                "ttft_ms",
                "tpot_ms",
            )
        }
        results["streams_1"] = {k: one[k] for k in ("completed", "failed", "output_throughput", "ttft_ms", "tpot_ms")}
        results["restart_s"] = round(_restart(port, proc), 1)
    return results


def _named(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


def _restart(port: int, proc: subprocess.Popen) -> float:
    """Seconds from SIGKILL of the engine core until ``/health`` answers 200 again (the spare
    core, when the server keeps one, is left alone: it is what takes over)."""
    children = _children(proc.pid)
    deadline = time.monotonic() + 60
    while not any(_named(pid, "stepserve-spare") for pid in children) and time.monotonic() < deadline:
        time.sleep(0.5)  # a crash long after start-up finds the spare ready; wait for it here
        children = _children(proc.pid)
    cores = [pid for pid in children if _named(pid, "stepserve-core")] or children
    if not cores:
        raise RuntimeError("no engine core process found under the server")
    start = time.monotonic()
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    while _health(port) == 200 and time.monotonic() - start < 10:
        time.sleep(0.02)
    while _health(port) != 200:
        if time.monotonic() - start > 300 or proc.poll() is not None:
            raise RuntimeError("the engine did not come back")
        time.sleep(0.05)
    return time.monotonic() - start


def cold_bench(out: Path, num_requests: int, flags: list[str] = ()) -> dict:
    """The offline 8B run in a fresh process with an empty compilation cache."""
    with tempfile.TemporaryDirectory() as cache:
        path = out / "cold_8b.json"
        cmd = [
            sys.executable,
            "-m",
            "stepserve.bench.gpu",
            "--cold",
            str(path),
            "--compilation-cache-dir",
            cache,
            "--out",
            str(out),
            "--num-requests",
            str(num_requests),
            *flags,
        ]
        start = time.monotonic()
        subprocess.run(cmd, check=True, timeout=600)
        result = json.loads(path.read_text())
        result["process_s"] = round(time.monotonic() - start, 1)
        return result


# -- long prompts through HTTP ---------------------------------------------------------------

LONG_FLAGS = [
    "--max-model-len",
    "32768",
    "--max-num-seqs",
    "64",
    "--num-scheduler-steps",
    "8",
    "--max-num-batched-tokens",
    "8192",  # prefill in chunks of at most 8192 tokens a pass, running decodes beside them
]
# Dense bf16 tensor-core peaks (no sparsity) of the SXM cards. PCIe and NVL cards run at lower
# clocks and power, so they get none (and no MFU) rather than a peak they cannot reach.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
TARGET_MFU_32K = 0.5  # of the peak, for the 32k-token prefill
TARGET_TPOT_RATIO = 2.0  # running streams' TPOT while a 32k prompt prefills, over their TPOT alone


@dataclasses.dataclass(frozen=True)
class LongSizes:
    """What the long-prompt part sends (a smoke run on the CPU passes smaller ones)."""

    # single prompts timed alone; the last one also prefills beside the running streams. 32767,
    # not 32768: a prompt of max_model_len tokens leaves no room for its output token.
    prompt_lens: tuple[int, ...] = (8192, 32767)
    streams: int = 16  # running decode streams
    stream_prompt_len: int = 256  # their prompt tokens
    stream_output_len: int = 512  # their max_tokens (ignore_eos: they produce all of them)


@dataclasses.dataclass(frozen=True)
class StreamTrace:
    """One streamed completion as the client saw it; times are ``time.perf_counter()`` seconds."""

    sent: float  # when the request went out
    times: tuple[float, ...]  # arrival of each chunk that carried a choice
    tokens: tuple[int, ...]  # tokens in each of those chunks (``count_tokens`` of its text)
    completion_tokens: int  # the server's usage count of the completion

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def counted(self) -> bool:
        """The chunks' token counts add up to the server's: the TPOT arithmetic is exact."""
        return sum(self.tokens) == self.completion_tokens


def non_embedding_params(config: dict) -> int:
    """Weights every prompt token goes through in a Llama-style dense decoder: each layer's q, k,
    v, o, gate, up and down projections and its two norms, and the final norm. The embedding is
    a lookup and the LM head runs on the last position only, so neither counts."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q and o, k and v
    mlp = 3 * hidden * config["intermediate_size"]
    return config["num_hidden_layers"] * (attention + mlp + 2 * hidden) + hidden


def prefill_flops(config: dict, n: int) -> float:
    """FLOPs of a prefill of ``n`` tokens: 2 per weight and token, plus attention's QK^T and PV
    (2 FLOPs a multiply-add each) over the causal half of the n x n scores, for every layer,
    head and head dimension."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    attention = 2 * 2 * (n * n / 2) * config["num_hidden_layers"] * heads * head_dim
    return 2 * n * non_embedding_params(config) + attention


def peak_bf16_flops(device_name: str | None) -> float | None:
    """The card's dense bf16 peak from ``torch.cuda.get_device_name()``; None where unknown."""
    if not device_name or "PCIe" in device_name or "NVL" in device_name:
        return None
    return next((peak for card, peak in PEAK_BF16_FLOPS.items() if card in device_name), None)


def prompt_ids(n: int, seed: int) -> list[int]:
    """``n`` random token ids clear of the word-level tokenizer's words and of BOS and EOS (as
    ``gpu.workload`` draws them); every request gets its own seed, so the prefix cache serves none."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 128000) for _ in range(n)]


def completion_body(prompt: list[int], max_tokens: int) -> dict:
    """A streamed greedy /v1/completions request of token ids, exactly ``len(prompt)`` tokens.
    Special tokens stay in the text so that every token shows in it (``count_tokens``)."""
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "skip_special_tokens": False,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# A token of write_vocab_tokenizer's vocabulary as the server streams it: a reserved or special
# token ("<|reserved_7|>", "<|end_of_text|>"), "<unk>", or a word (" the"; words have no "<").
_TOKEN = re.compile(r"<\|[^|]*\|>|<unk>|[^\s<]+")


def count_tokens(text: str) -> int:
    """Tokens in streamed text of the benchmark's vocabulary (a multi-step pass streams several
    in one chunk); ``StreamTrace.counted`` checks the sum against the server's usage."""
    return len(_TOKEN.findall(text))


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-99 * len(ordered) // 100) - 1))]  # nearest rank


def window_decode(traces: list[StreamTrace], start: float, end: float) -> dict:
    """Decode speed of running streams over [start, end]. Per stream, the chunks from its last
    one at or before ``start`` to its first one at or after ``end`` cover the window: TPOT is
    their span over the tokens that came after the first of them, ITL the gaps between them.
    Streams that do not cover the window (not streaming yet at ``start``, or done before
    ``end``) are left out; ``streams`` says how many counted."""
    tpots, gaps = [], []
    for trace in traces:
        first = bisect.bisect_right(trace.times, start) - 1
        last = bisect.bisect_left(trace.times, end)
        if first < 0 or last >= len(trace.times) or last <= first:
            continue
        tokens = sum(trace.tokens[first + 1 : last + 1])
        if tokens:
            tpots.append((trace.times[last] - trace.times[first]) / tokens)
            gaps += [b - a for a, b in zip(trace.times[first:last], trace.times[first + 1 : last + 1])]
    ms = lambda x: round(1e3 * x, 2)  # noqa: E731
    return {
        "streams": len(tpots),
        "tpot_ms": ms(statistics.fmean(tpots)) if tpots else None,
        "itl_p99_ms": ms(_p99(gaps)) if gaps else None,  # gaps between chunks, as `bench serve`'s ITL
        "itl_max_ms": ms(max(gaps)) if gaps else None,
    }


def steady_window(traces: list[StreamTrace]) -> tuple[float, float]:
    """From when the last stream got its first token (all are decoding) to when the first one
    got its last (none has finished)."""
    return max(t.times[0] for t in traces), min(t.times[-1] for t in traces)


def prefill_figures(config: dict, n: int, ttfts: list[float], peak: float | None) -> dict:
    """TTFT of each run of an ``n``-token prompt; the figures use the last (the first may include
    warm-up)."""
    ttft = ttfts[-1]
    achieved = prefill_flops(config, n) / ttft
    return {
        "prompt_tokens": n,
        "ttft_s": [round(t, 4) for t in ttfts],
        "prefill_tok_s": round(n / ttft, 1),
        "tflops": round(achieved / 1e12, 1),
        "mfu": round(achieved / peak, 3) if peak else None,
    }


def decode_figures(alone: list[StreamTrace], busy: list[StreamTrace], prompt: StreamTrace) -> dict:
    """Running streams' decode alone (their steady window) and while ``prompt`` prefilled
    beside them (from its send to its first token), and the ratio of the TPOTs."""
    quiet = window_decode(alone, *steady_window(alone))
    loaded = window_decode(busy, prompt.sent, prompt.times[0])
    ratio = round(loaded["tpot_ms"] / quiet["tpot_ms"], 2) if loaded["tpot_ms"] and quiet["tpot_ms"] else None
    return {
        "alone": quiet,
        "during_prefill": {**loaded, "prompt_ttft_s": round(prompt.ttft, 4)},
        "tpot_ratio": ratio,
        "token_counts_match_usage": all(t.counted for t in [*alone, *busy]),
    }


async def _stream(client: httpx.AsyncClient, url: str, body: dict, times: list, tokens: list) -> StreamTrace:
    """Send one streamed request; ``times`` and ``tokens`` grow as its chunks arrive (the
    caller watches them), and come back frozen in the trace."""
    sent, completion = time.perf_counter(), 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"the stream failed: {event['error']}")
            completion = (event.get("usage") or {}).get("completion_tokens", completion)
            if event.get("choices"):
                times.append(now)
                tokens.append(sum(count_tokens(c.get("text") or "") for c in event["choices"]))
    if not times:
        raise RuntimeError("the stream ended without a token")
    return StreamTrace(sent, tuple(times), tuple(tokens), completion)


async def _decode_run(
    client: httpx.AsyncClient, url: str, sizes: LongSizes, seed: int, prompt_len: int | None
) -> tuple[list[StreamTrace], StreamTrace | None]:
    """``sizes.streams`` streams to the end; with ``prompt_len``, one prompt of that length is
    sent once every stream has had two chunks (all are past their prefill and decoding)."""
    live: list[tuple[list, list]] = [([], []) for _ in range(sizes.streams)]
    bodies = [
        completion_body(prompt_ids(sizes.stream_prompt_len, seed + i), sizes.stream_output_len)
        for i in range(sizes.streams)
    ]
    tasks = [asyncio.create_task(_stream(client, url, body, *record)) for body, record in zip(bodies, live)]
    if prompt_len is not None:
        while any(len(times) < 2 for times, _ in live) and not any(t.done() for t in tasks):
            await asyncio.sleep(0.002)
        body = completion_body(prompt_ids(prompt_len, seed + sizes.streams), 1)
        tasks.append(asyncio.create_task(_stream(client, url, body, [], [])))
    traces = await asyncio.gather(*tasks)
    return traces[: sizes.streams], traces[sizes.streams] if prompt_len is not None else None


async def _drive_long(url: str, config: dict, peak: float | None, sizes: LongSizes) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=httpx.Limits(max_connections=None)) as client:
        prefill = {}
        for k, n in enumerate(sizes.prompt_lens):
            runs = [await _stream(client, url, completion_body(prompt_ids(n, 10 * k + i), 1), [], []) for i in (1, 2)]
            prefill[str(n)] = prefill_figures(config, n, [r.ttft for r in runs], peak)
        # Each decode run twice, as the prompts: the first mixed prefill-and-decode passes may
        # compile kernels for their shapes, which must not land in the measured window.
        runs = []
        for seed in (1000, 2000):
            alone, _ = await _decode_run(client, url, sizes, seed, None)
            busy, prompt = await _decode_run(client, url, sizes, seed + 500, sizes.prompt_lens[-1])
            runs.append(decode_figures(alone, busy, prompt))
    return {"prefill": prefill, "decode": runs[-1], "decode_first_run": runs[0]}


def long_report(results: dict) -> list[str]:
    """One line per figure of ``long_prompt_bench``'s results."""
    lines = []
    for n, p in results["prefill"].items():
        mfu = f"{p['mfu']:.1%} MFU" if p["mfu"] is not None else "MFU unknown (no peak for this card)"
        lines.append(
            f"long: {n}-token prompt alone: TTFT {p['ttft_s'][-1]} s (first run {p['ttft_s'][0]} s), "
            f"{p['prefill_tok_s']} prefill tok/s, {p['tflops']} TFLOP/s = {mfu} (target for 32k: {TARGET_MFU_32K:.0%})"
        )
    d = results["decode"]
    quiet, loaded = d["alone"], d["during_prefill"]
    lines.append(
        f"long: {quiet['streams']} streams decoding alone: TPOT {quiet['tpot_ms']} ms, ITL p99 {quiet['itl_p99_ms']} ms"
    )
    lines.append(
        f"long: {loaded['streams']} streams while a {results['sizes']['prompt_lens'][-1]}-token prompt prefills "
        f"(its TTFT {loaded['prompt_ttft_s']} s): TPOT {loaded['tpot_ms']} ms, "
        f"ITL p99 {loaded['itl_p99_ms']} ms, max {loaded['itl_max_ms']} ms"
    )
    lines.append(
        f"long: TPOT while prefilling over alone: {d['tpot_ratio']}x (target at most {TARGET_TPOT_RATIO}x; "
        f"first run {results['decode_first_run']['tpot_ratio']}x)"
    )
    return lines


def long_prompt_bench(
    model_dir: Path,
    out: Path,
    cache_dir: Path,
    flags: list[str] = (),
    port: int = 8392,
    device_name: str | None = None,
    sizes: LongSizes = LongSizes(),
) -> dict:
    """``stepserve serve --load-format dummy`` with ``LONG_FLAGS`` (then ``flags``): single long
    prompts' TTFT and MFU against ``device_name``'s bf16 peak, then running streams' TPOT alone
    and while the longest prompt prefills. Results in ``out/long.json``, returned."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("max_position_embeddings", 0) <= max(sizes.prompt_lens):
        raise ValueError(f"{model_dir}: max_position_embeddings must exceed {max(sizes.prompt_lens)} prompt tokens")
    peak = peak_bf16_flops(device_name)
    cmd = _serve_command(model_dir, port, cache_dir, [*LONG_FLAGS, *flags])
    results: dict = {
        "command": " ".join(cmd[1:]),
        "device": device_name,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "sizes": dataclasses.asdict(sizes),
    }
    with _server(cmd, out / "long_8b.log") as proc:
        results["startup_s"] = round(_wait_ready(port, proc, 600), 1)
        results |= asyncio.run(_drive_long(f"http://127.0.0.1:{port}/v1/completions", config, peak, sizes))
    if not all(results[k]["token_counts_match_usage"] for k in ("decode", "decode_first_run")):
        log.warning("streamed token counts differ from the server's usage: the TPOT figures are off")
    (out / "long.json").write_text(json.dumps(results, indent=2))
    for line in long_report(results):
        print(line, flush=True)
    return results
