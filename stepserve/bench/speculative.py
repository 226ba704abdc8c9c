"""``stepserve bench spec``: speculative decoding against the same engine without it, in one run.

Three workloads of chat requests, greedy, the model's own end of answer (no ``ignore_eos``):

- ``grounded``: rewrite a given text as it is (the answer repeats the prompt);
- ``code-edit``: return a given function with one variable renamed;
- ``chat``: free questions, nothing to copy.

Each runs at batch 1 (one request at a time) with and without speculation, the two engines
taking turns request by request so that both see the same machine state. Each request runs
three times: cut to one token (its prompt's full blocks go into the prefix cache), cut to one
token again (timed: the time to the first token with the prompt cached), then whole (timed).
``e2e`` is generated tokens over the whole request's wall time; ``decode`` is the tokens after
the first over the wall time less the time to the first token. Then 16 chat streams at once
(where speculation backs off), prompts not cached. The ratios are speculation's against the
plain engine's. ``--peer NAME=URL`` times an OpenAI-compatible server (llama.cpp's,
with or without its prompt-lookup decoding) on the same batch-1 requests over HTTP, one at a
time, each after its one-token twin too (llama.cpp keeps the last prompt's state).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path

DEFAULT_SPEC = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'

TEXTS = [
    "The city council met on Tuesday to discuss the new budget. The mayor proposed spending more on parks, roads "
    "and schools, while several members asked for lower taxes. After a long debate, the council agreed to delay "
    "the vote until next month so that residents could comment on the plan.",
    "Our library will be closed on Monday for repairs to the heating system. Books that are due that day may be "
    "returned on Tuesday without a fine. The reading room will open again at nine in the morning, and the "
    "children's story hour will take place as usual on Wednesday afternoon.",
    "To make the bread, mix the flour, water, salt and yeast in a large bowl. Knead the dough for ten minutes, "
    "then leave it to rise for an hour in a warm place. Shape it into a loaf, let it rise again, and bake it "
    "for forty minutes until the crust is golden brown.",
]
CODE = [
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n",
    "def count_words(text):\n    counts = {}\n    for word in text.split():\n"
    "        counts[word] = counts.get(word, 0) + 1\n    return counts\n",
    "def clamp(x, low, high):\n    if x < low:\n        return low\n"
    "    if x > high:\n        return high\n    return x\n",
]
RENAMES = [("total", "acc"), ("counts", "tally"), ("x", "value")]
CHAT = [
    "Write a short poem about the sea.",
    "Explain how a bicycle works to a child.",
    "Give me three tips for learning a new language.",
]


def workloads() -> dict[str, list[list[dict]]]:
    grounded = [f"Rewrite the following text exactly as it is, word for word:\n\n{t}" for t in TEXTS]
    edits = [
        f"Rename the variable `{old}` to `{new}` in this Python function and return the whole function:\n\n{code}"
        for code, (old, new) in zip(CODE, RENAMES)
    ]
    as_messages = lambda prompts: [[{"role": "user", "content": p}] for p in prompts]  # noqa: E731
    return {"grounded": as_messages(grounded), "code-edit": as_messages(edits), "chat": as_messages(CHAT)}


def _engine(args: argparse.Namespace, speculative: str | None):
    from stepserve.engine.llm import LLM

    options = {"max_model_len": args.max_model_len, "device": args.device}
    if args.device == "cuda":  # two engines share the card: the second's share counts the first's memory
        options["gpu_memory_utilization"] = 0.85 if speculative else 0.4
    if args.model:
        options["model"] = args.model
    if speculative:
        options["speculative_config"] = speculative
    return LLM(**options)


def _timed(llm, messages, params) -> tuple[int, float]:
    start = time.perf_counter()
    outputs = llm.chat(messages, params)
    return sum(len(o.outputs[0].token_ids) for o in outputs), time.perf_counter() - start


def _decode(llm, messages, params) -> tuple[int, float, float]:
    """(tokens, seconds, seconds to the first token) of one request whose prompt is cached."""
    from stepserve.sampling import SamplingParams

    one = SamplingParams(temperature=0, max_tokens=1)
    llm.chat([messages], one)
    first = _timed(llm, [messages], one)[1]
    return (*_timed(llm, [messages], params), first)


def _peer(url: str, messages: list[dict], max_tokens: int) -> tuple[int, float, float]:
    _ask(url, messages, 1)
    first = _ask(url, messages, 1)[1]
    return (*_ask(url, messages, max_tokens), first)


def _rates(runs: list[tuple[int, float, float]]) -> tuple[float, float]:
    """e2e and decode tok/s of (tokens, seconds, seconds to the first token) runs."""
    tokens, seconds, first = (sum(column) for column in zip(*runs))
    return round(tokens / seconds, 1), round((tokens - len(runs)) / (seconds - first), 1)


def _ask(url: str, messages: list[dict], max_tokens: int) -> tuple[int, float]:
    body = {"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return answer["usage"]["completion_tokens"], time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    from stepserve.sampling import SamplingParams

    plain, spec = _engine(args, None), _engine(args, args.speculative_config)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    loads = workloads()
    for llm in (plain, spec):  # warm-up: kernels, the prefix cache's first fill
        llm.chat(loads["chat"][0], SamplingParams(temperature=0, max_tokens=8))
    results: dict = {
        "model": plain.info.name,
        "device": plain.info.device,
        "quantization": plain.info.quantization,
        "speculative_config": json.loads(args.speculative_config),
        "max_tokens": args.max_tokens,
        "date": time.strftime("%Y-%m-%d"),
        "batch1": {},
    }
    for name, conversations in loads.items():
        runs: dict[str, list] = {"plain": [], "spec": []}
        for _ in range(args.repeats):
            for messages in conversations:
                for key, llm in (("plain", plain), ("spec", spec)):
                    runs[key].append(_decode(llm, messages, params))
        for peer in args.peer:
            label, url = peer.split("=", 1)
            runs[label] = [_peer(url, m, args.max_tokens) for _ in range(args.repeats) for m in conversations]
        row = {}
        for key, measured in runs.items():
            row[f"{key}_e2e"], row[f"{key}_decode"] = _rates(measured)
        row["ratio_e2e"] = round(row["spec_e2e"] / row["plain_e2e"], 2)
        row["ratio_decode"] = round(row["spec_decode"] / row["plain_decode"], 2)
        results["batch1"][name] = row
        print(f"batch 1, {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    streams = [loads["chat"][i % len(loads["chat"])] for i in range(args.streams)]
    totals = {}
    for key, llm in (("plain", plain), ("spec", spec)):
        tokens, seconds = _timed(llm, streams, params)
        totals[key] = round(tokens / seconds, 1)
    totals["ratio"] = round(totals["spec"] / totals["plain"], 2)
    results[f"streams{args.streams}"] = totals
    print(f"{args.streams} chat streams: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    counters = spec.core.scheduler.spec_counters
    results["acceptance"] = {
        "num_drafts": counters.num_drafts,
        "num_draft_tokens": counters.num_draft_tokens,
        "num_accepted_tokens": counters.num_accepted_tokens,
        "accepted_per_pos": counters.accepted_per_pos,
    }
    print(f"acceptance: {results['acceptance']}")
    targets = {
        "grounded >= 1.8x (decode)": results["batch1"]["grounded"]["ratio_decode"] >= 1.8,
        "grounded >= 1.8x (e2e)": results["batch1"]["grounded"]["ratio_e2e"] >= 1.8,
        "chat >= 0.95x (decode)": results["batch1"]["chat"]["ratio_decode"] >= 0.95,
        f"{args.streams} streams >= 0.95x": totals["ratio"] >= 0.95,
    }
    results["targets"] = targets
    print("targets: " + ", ".join(f"{k}: {'met' if ok else 'missed'}" for k, ok in targets.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--speculative-config", dest="speculative_config", default=DEFAULT_SPEC)
    parser.add_argument("--max-tokens", dest="max_tokens", type=int, default=192)
    parser.add_argument("--max-model-len", dest="max_model_len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="passes over each workload's requests")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--peer", action="append", default=[], help="NAME=URL of an OpenAI-compatible server")
    parser.add_argument("--out", default=None, help="write the results here (JSON)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepserve.bench.speculative", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
