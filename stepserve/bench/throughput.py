"""Offline throughput: random prompts of random lengths, ``ignore_eos``, fixed seed."""

from __future__ import annotations

import argparse
import json
import random
import time

from stepserve.config import EngineConfig


def random_requests(vocab_size: int, num: int, input_len: int, output_len: int, range_ratio: float, seed: int):
    """(prompt token ids, output length) pairs, lengths uniform in [len*(1-r), len*(1+r)]."""
    rng = random.Random(seed)
    span = lambda n: rng.randint(max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio))))  # noqa: E731
    return [([rng.randrange(100, vocab_size) for _ in range(span(input_len))], span(output_len)) for _ in range(num)]


def run(args: argparse.Namespace, engine: EngineConfig) -> dict:
    from stepserve.engine.llm import LLM
    from stepserve.sampling import SamplingParams

    llm = LLM(**_flatten(engine))
    requests = random_requests(
        len(llm.tokenizer), args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed
    )
    prompts = [ids for ids, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, ignore_eos=True)] * 2)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(p) for p in prompts)
    result = {
        "model": llm.info.name,
        "device": llm.info.device,
        "dtype": llm.info.dtype,
        "quantization": llm.info.quantization,
        "num_scheduler_steps": engine.scheduler.num_scheduler_steps,
        "requests": len(prompts),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(prompts) / elapsed, 3),
        "output_tok_s": round(out_tokens / elapsed, 1),
        "total_tok_s": round((in_tokens + out_tokens) / elapsed, 1),
        "load_s": round(llm.info.load_seconds, 2),
    }
    print(
        f"{result['model']} on {result['device']} ({result['dtype']}, quantization {result['quantization']}, "
        f"{result['num_scheduler_steps']} scheduler steps)"
    )
    print(
        f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['output_tok_s']:.1f} output tok/s, "
        f"{result['total_tok_s']:.1f} total tok/s ({len(prompts)} requests, {out_tokens} output tokens, "
        f"{elapsed:.1f}s; load {result['load_s']}s)"
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _flatten(engine: EngineConfig) -> dict:
    import dataclasses

    flat = {}
    for part in (getattr(engine, group.name) for group in dataclasses.fields(engine)):
        flat.update({f.name: getattr(part, f.name) for f in dataclasses.fields(part)})
    return flat


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", "--num_prompts", dest="num_prompts", type=int, default=64)
    parser.add_argument("--input-len", "--input_len", dest="input_len", type=int, default=128)
    parser.add_argument("--output-len", "--output_len", dest="output_len", type=int, default=64)
    parser.add_argument("--range-ratio", "--range_ratio", dest="range_ratio", type=float, default=0.5)
    parser.add_argument("--output-json", "--output_json", dest="output_json", default=None)
