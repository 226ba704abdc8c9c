"""Online serving benchmark against any OpenAI-compatible server (``--base-url``).

Streams ``/v1/completions`` requests built from a random dataset with a fixed seed, sent at a
Poisson ``--request-rate`` or as fast as ``--max-concurrency`` allows, and reports with vLLM's
``benchmark_serving`` definitions:

- request / output / total token throughput: completed requests, generated tokens and
  prompt+generated tokens over the benchmark's wall time;
- TTFT: time from sending a request to its first streamed text;
- TPOT: per request, (latency - TTFT) / (output tokens - 1), for requests with > 1 token;
- ITL: the gaps between successive streamed chunks, pooled over all requests;
- E2EL: time from sending a request to its last chunk.

Token counts come from the server's ``usage`` (``stream_options.include_usage``); a server that
sends none is counted by its streamed chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

# Common short English words: about one token each for most tokenizers.
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very"
).split()


@dataclass(frozen=True)
class BenchRequest:
    prompt: str  # random words
    prompt_len: int  # words in it (the server's usage gives the token count)
    output_len: int  # max_tokens
    schema: dict | None = None  # a JSON schema the answer must follow (--structured json)
    ignore_eos: bool = False  # go on past EOS (the free side of --structured json)


@dataclass
class RequestResult:
    """What one request measured; times in seconds."""

    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between chunks after the first
    prompt_tokens: int = 0
    output_tokens: int = 0


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, seed: int) -> list[BenchRequest]:
    """Prompts of random words, lengths uniform in [len*(1-r), len*(1+r)]; the same for a seed."""
    rng = random.Random(seed)

    def span(n: int) -> int:
        return rng.randint(max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio))))

    out = []
    for _ in range(num):
        words, max_tokens = span(input_len), span(output_len)
        out.append(BenchRequest(" ".join(rng.choice(WORDS) for _ in range(words)), words, max_tokens))
    return out


async def arrivals(requests: list[BenchRequest], rate: float, seed: int) -> AsyncIterator[BenchRequest]:
    """Yield requests with exponential gaps (a Poisson process) of mean 1/rate; rate=inf: at once."""
    rng = random.Random(seed)
    for i, request in enumerate(requests):
        yield request
        if rate != float("inf") and i + 1 < len(requests):
            await asyncio.sleep(rng.expovariate(rate))


# -- one request --------------------------------------------------------------------------


def _payload(args: argparse.Namespace, model: str, request: BenchRequest) -> dict:
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.schema is not None:
        body["structured_outputs"] = {"json": request.schema}
    return body | ({"ignore_eos": True} if args.ignore_eos or request.ignore_eos else {})


def with_schemas(requests: list[BenchRequest], seed: int) -> list[BenchRequest]:
    """The same requests, each with its own JSON schema (distinct property names, so each one
    is compiled anew: their TTFT includes compilation). The first property is a string of at
    least 16 characters per output token, more than a model writes in ``max_tokens`` tokens, so
    every answer runs to ``max_tokens`` as a free request with ignore_eos does: the two kinds
    of request do the same work, and their throughputs differ by what the constraint costs."""
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(requests):
        a, b, c = (f"{rng.choice(WORDS)}_{i}_{k}" for k in range(3))
        schema = {
            "type": "object",
            "properties": {
                a: {"type": "string", "minLength": 16 * r.output_len, "maxLength": 32 * r.output_len},
                b: {"type": "integer", "minimum": 0, "maximum": 10_000},
                c: {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 32},
            },
            "required": [a, b, c],
            "additionalProperties": False,
        }
        out.append(BenchRequest(r.prompt, r.prompt_len, r.output_len, schema))
    return out


async def _events(response: httpx.Response) -> AsyncIterator[dict]:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def send(client: httpx.AsyncClient, url: str, payload: dict) -> RequestResult:
    result = RequestResult(prompt_tokens=0)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for event in _events(response):
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices", [])):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    result.error = "" if result.ok else "no text streamed"
    return result


# -- the run ------------------------------------------------------------------------------


async def _model_name(client: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    if model:
        return model
    response = await client.get(base_url + "/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run(args: argparse.Namespace, requests: list[BenchRequest] | None = None) -> dict:
    requests = requests or random_requests(
        args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed
    )
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    base_url = args.base_url.rstrip("/")
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(args.timeout), limits=httpx.Limits(max_connections=None)
    ) as client:
        model = await _model_name(client, base_url, args.model)
        progress = _progress(len(requests), args.disable_tqdm)

        async def one(request: BenchRequest) -> RequestResult:
            async with limit:
                result = await send(client, base_url + args.endpoint, _payload(args, model, request))
            progress.update(1)
            return result

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(r)) async for r in arrivals(requests, args.request_rate, args.seed)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        progress.close()
    return summarize(args, model, requests, results, duration)


def _progress(total: int, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", disable=disabled)


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(v * 1000 for v in values)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered) + 0.5) - 1))]
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p99": p99}


def summarize(
    args: argparse.Namespace, model: str, requests: list[BenchRequest], results: list[RequestResult], duration: float
) -> dict:
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens or q.prompt_len for q, r in zip(requests, results) if r.ok)
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "base_url": args.base_url,
        "model": model,
        "num_prompts": len(requests),
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in done]),
        "tpot_ms": _stats_ms(tpot),
        "itl_ms": _stats_ms([gap for r in done for gap in r.itl]),
        "e2el_ms": _stats_ms([r.latency for r in done]),
    }


def report(result: dict) -> str:
    lines = [
        "{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="),
        f"{'Successful requests:':<40}{result['completed']:<10}",
        f"{'Failed requests:':<40}{result['failed']:<10}",
        f"{'Benchmark duration (s):':<40}{result['duration_s']:<10.2f}",
        f"{'Total input tokens:':<40}{result['total_input_tokens']:<10}",
        f"{'Total generated tokens:':<40}{result['total_output_tokens']:<10}",
        f"{'Request throughput (req/s):':<40}{result['request_throughput']:<10.2f}",
        f"{'Output token throughput (tok/s):':<40}{result['output_throughput']:<10.2f}",
        f"{'Total Token throughput (tok/s):':<40}{result['total_token_throughput']:<10.2f}",
    ]
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL")):
        lines.append("{s:{c}^50}".format(s=f" {title} ", c="-"))
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {title} (ms):"
            lines.append(f"{label:<40}{result[key][stat]:<10.2f}")
    lines.append("=" * 50)
    for error in result["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    if args.structured == "json":
        return structured_main(args)
    if args.plot and not args.sweep:
        print("stepserve bench serve: --plot needs --sweep", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run(args))
    except httpx.HTTPError as exc:
        print(f"stepserve bench serve: cannot reach {args.base_url}: {exc}", file=sys.stderr)
        return 1
    print(report(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["completed"] else 1


def add_args(parser: argparse.ArgumentParser) -> None:
    def flag(name: str, **kwargs) -> None:
        parser.add_argument(f"--{name}", f"--{name.replace('-', '_')}", dest=name.replace("-", "_"), **kwargs)

    flag("base-url", default="http://127.0.0.1:8080", help="the server, without /v1")
    flag("endpoint", default="/v1/completions", help="completions route to load")
    flag("model", default=None, help="model name to send; default: the first of /v1/models")
    flag("num-prompts", type=int, default=64, help="requests to send")
    flag("input-len", type=int, default=128, help="prompt length in random words")
    flag("output-len", type=int, default=64, help="max_tokens of each request")
    flag("range-ratio", type=float, default=0.0, help="lengths vary uniformly by this share")
    flag("seed", type=int, default=0, help="seed of the dataset and the arrival times")
    flag(
        "request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals; inf sends all at once",
    )
    flag("max-concurrency", type=int, default=None, help="requests in flight at most")
    flag("ignore-eos", action="store_true", help="ask the server to go on past EOS (vLLM's extension)")
    flag("timeout", type=float, default=600.0, help="per-request timeout, seconds")
    flag("output-json", default=None, help="also write the result here")
    flag("disable-tqdm", action="store_true", help="no progress bar")
    flag(
        "sweep",
        type=parse_sweep,
        default=None,
        help="run at each of these concurrencies, e.g. 1,4,16,64 (replaces --max-concurrency)",
    )
    flag(
        "plot",
        default=None,
        help="with --sweep: draw throughput and TTFT/TPOT against concurrency into this PNG (needs matplotlib)",
    )

    flag(
        "structured",
        choices=("none", "json"),
        default="none",
        help="json: compare constrained with free output throughput (each request its own JSON schema), "
        "over --rounds interleaved rounds",
    )
    flag(
        "rounds",
        type=int,
        default=5,
        help="with --structured json: rounds of one free and one constrained phase, in alternating order",
    )


def structured_main(args: argparse.Namespace) -> int:
    """The --structured json workload, made robust to a noisy (shared) machine.

    Free and constrained requests do the same work: the same prompts, each running to
    ``max_tokens`` (free ones with ignore_eos, constrained ones held to a schema that cannot end
    sooner: see ``with_schemas``). After a warm-up and one phase with new schemas (their TTFT
    includes compiling them), ``--rounds`` rounds each run a free phase and a constrained phase
    (cached schemas), the order alternating (free first, then constrained first, ...), so that
    a drift in the machine's load falls on both kinds alike. Each round gives a ratio of output
    throughputs; the summary has their median and spread, and the load average at each phase.
    """
    if args.rounds < 1:
        print("stepserve bench serve: --rounds must be at least 1", file=sys.stderr)
        return 2
    base = random_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed)
    free = [BenchRequest(r.prompt, r.prompt_len, r.output_len, ignore_eos=True) for r in base]
    constrained = with_schemas(base, args.seed)
    phases: list[dict] = []

    def phase(name: str, requests: list[BenchRequest], round_: int | None) -> dict:
        load = os.getloadavg()[0]
        result = asyncio.run(run(args, requests)) | {"phase": name, "round": round_, "load_1min": load}
        print(f"-- {name} (round {round_}, load {load:.1f})\n{report(result)}", flush=True)
        phases.append(result)
        return result

    try:
        asyncio.run(run(args, free))  # warm-up, not reported: the server's first passes are slow
        phase("json_new_schemas", constrained, None)
        ratios = []
        for k in range(args.rounds):
            order = (("free", free), ("json", constrained)) if k % 2 == 0 else (("json", constrained), ("free", free))
            got = {name: phase(name, requests, k) for name, requests in order}
            ratios.append(got["json"]["output_throughput"] / max(got["free"]["output_throughput"], 1e-9))
    except httpx.HTTPError as exc:
        print(f"stepserve bench serve: cannot reach {args.base_url}: {exc}", file=sys.stderr)
        return 1
    summary = structured_summary(phases, ratios)
    print(json.dumps(summary, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"phases": phases, "summary": summary}, f, indent=2)
    return 0 if all(p["completed"] == len(base) for p in phases) else 1


def structured_summary(phases: list[dict], ratios: list[float]) -> dict:
    """The rounds' JSON/free throughput ratios (median, spread) and each kind's figures."""

    def of(name: str, key: str) -> list[float]:
        return [p[key] for p in phases if p["phase"] == name]

    def median_of(name: str, key: str, stat: str | None = None) -> float:
        return statistics.median(v[stat] if stat else v for v in of(name, key))

    return {
        "rounds": len(ratios),
        "ratio_json_vs_free": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "each": ratios,
        },
        "output_throughput_median": {name: median_of(name, "output_throughput") for name in ("free", "json")},
        "output_tokens_per_phase": {name: sorted(set(of(name, "total_output_tokens"))) for name in ("free", "json")},
        "median_tpot_ms": {name: median_of(name, "tpot_ms", "median") for name in ("free", "json")},
        "mean_ttft_ms": {
            "json_new_schemas": of("json_new_schemas", "ttft_ms")[0]["mean"],
            "json_cached": median_of("json", "ttft_ms", "mean"),
            "free": median_of("free", "ttft_ms", "mean"),
        },
        "load_1min": {"min": min(p["load_1min"] for p in phases), "max": max(p["load_1min"] for p in phases)},
    }


def parse_sweep(text: str) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16]; each a positive integer."""
    try:
        points = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep {text!r}: give concurrencies as integers, e.g. 1,4,16,64") from None
    if not points or min(points) < 1:
        raise argparse.ArgumentTypeError(f"--sweep {text!r}: give one or more concurrencies of at least 1")
    return points
