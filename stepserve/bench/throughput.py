"""Offline throughput, ``ignore_eos``, fixed seed: random prompts of random lengths, or a named
workload of fixed lengths (TensorRT-LLM's offline max-load workloads)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import dataclass

from stepserve.config import ConfigError, EngineConfig, SchedulerConfig


@dataclass(frozen=True)
class Workload:
    """Fixed lengths and a load, as TensorRT-LLM's performance overview measures offline
    throughput at maximum load (``trtllm-bench throughput`` on a synthetic dataset)."""

    input_len: int  # prompt tokens of every request
    output_len: int  # generated tokens of every request (ignore_eos)
    num_prompts: int  # requests, unless --num-prompts is given
    max_num_seqs: int  # requests computed together, unless --max-num-seqs is given


WORKLOADS = {
    "trtllm-128-128": Workload(128, 128, 4096, 1024),
    "trtllm-500-2000": Workload(500, 2000, 1024, 512),
    "trtllm-1000-1000": Workload(1000, 1000, 1024, 512),
    "trtllm-2048-128": Workload(2048, 128, 1024, 512),
    "trtllm-5000-500": Workload(5000, 500, 512, 256),
}
RANDOM = "random"  # the name results give the default workload
RANDOM_DEFAULTS = {"num_prompts": 64, "input_len": 128, "output_len": 64, "range_ratio": 0.5}
LENGTH_FLAGS = {"input_len": "--input-len", "output_len": "--output-len", "range_ratio": "--range-ratio"}


@dataclass(frozen=True)
class Plan:
    """What one run measures, resolved from the flags and the workload."""

    workload: str  # a name in WORKLOADS, or RANDOM
    num_prompts: int  # requests
    input_len: int  # prompt tokens (the middle of the range when range_ratio > 0)
    output_len: int  # output tokens (likewise)
    range_ratio: float  # lengths uniform in [len*(1-r), len*(1+r)]; 0 for a named workload


def fill_max_num_seqs(args: argparse.Namespace) -> argparse.Namespace:
    """``--max-num-seqs`` where the command line left it out (this command's parser defaults it to
    None, so that a value given equal to the engine's default still counts as given): the
    workload's, else the engine's default."""
    if args.max_num_seqs is None:
        workload = WORKLOADS.get(args.workload)
        args.max_num_seqs = workload.max_num_seqs if workload else SchedulerConfig().max_num_seqs
    return args


def resolve_workload(args: argparse.Namespace, engine: EngineConfig) -> tuple[Plan, EngineConfig]:
    """The run's plan (lengths and prompt count) and the engine config it runs on.

    Raises:
        ConfigError: a length flag beside --workload, or an explicit max_model_len too small.
    """
    if args.workload is None:
        return _random_plan(args), engine
    given = [flag for dest, flag in LENGTH_FLAGS.items() if getattr(args, dest) is not None]
    if given:
        raise ConfigError(f"--workload {args.workload} sets the lengths: leave out {', '.join(given)}")
    workload = WORKLOADS[args.workload]
    num_prompts = workload.num_prompts if args.num_prompts is None else args.num_prompts
    plan = Plan(args.workload, num_prompts, workload.input_len, workload.output_len, 0.0)
    if engine.model.max_model_len is not None:  # else the model's own, checked once it is loaded
        check_fits(plan, engine.model.max_model_len)
    return plan, engine


def _random_plan(args: argparse.Namespace) -> Plan:
    """The default workload: random lengths around --input-len and --output-len."""
    given = {name: getattr(args, name) for name in RANDOM_DEFAULTS}
    return Plan(RANDOM, **{name: RANDOM_DEFAULTS[name] if value is None else value for name, value in given.items()})


def check_fits(plan: Plan, max_model_len: int) -> None:
    """Refuse a context too short for the plan's requests, rather than cut them."""
    needed = plan.input_len + plan.output_len
    if max_model_len < needed:
        raise ConfigError(
            f"workload {plan.workload} needs max_model_len >= {needed} ({plan.input_len} in + {plan.output_len} out), "
            f"the engine has {max_model_len}: raise --max-model-len"
        )


def random_requests(vocab_size: int, num: int, input_len: int, output_len: int, range_ratio: float, seed: int):
    """(prompt token ids, output length) pairs, lengths uniform in [len*(1-r), len*(1+r)]."""
    rng = random.Random(seed)
    span = lambda n: rng.randint(max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio))))  # noqa: E731
    return [([rng.randrange(100, vocab_size) for _ in range(span(input_len))], span(output_len)) for _ in range(num)]


def run(args: argparse.Namespace, engine: EngineConfig) -> dict:
    from stepserve.engine.llm import LLM
    from stepserve.sampling import SamplingParams

    plan, engine = resolve_workload(args, engine)
    llm = LLM(**_flatten(engine))
    if plan.workload in WORKLOADS:
        check_fits(plan, llm.info.max_model_len)  # the context in use, the model's own if not given
    requests = random_requests(
        len(llm.tokenizer), plan.num_prompts, plan.input_len, plan.output_len, plan.range_ratio, args.seed
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
        "workload": plan.workload,
        "input_len": plan.input_len,
        "output_len": plan.output_len,
        "range_ratio": plan.range_ratio,
        "max_num_seqs": engine.scheduler.max_num_seqs,
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
    spread = f" (range ratio {plan.range_ratio})" if plan.range_ratio else ""
    print(
        f"Workload {plan.workload}: {len(prompts)} requests of {plan.input_len} tokens in / {plan.output_len} out"
        f"{spread}, max_num_seqs {result['max_num_seqs']}"
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
    flat = {}
    for part in (getattr(engine, group.name) for group in dataclasses.fields(engine)):
        flat.update({f.name: getattr(part, f.name) for f in dataclasses.fields(part)})
    return flat


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload",
        choices=list(WORKLOADS),
        default=None,
        help="a fixed-length workload of TensorRT-LLM's performance overview (trtllm-IN-OUT tokens): sets the "
        "lengths, range ratio 0, and --num-prompts and --max-num-seqs where not given (default: random lengths)",
    )
    parser.add_argument(
        "--num-prompts",
        "--num_prompts",
        dest="num_prompts",
        type=int,
        default=None,
        help="default: 64, or the workload's",
    )
    parser.add_argument("--input-len", "--input_len", dest="input_len", type=int, default=None, help="default: 128")
    parser.add_argument("--output-len", "--output_len", dest="output_len", type=int, default=None, help="default: 64")
    parser.add_argument(
        "--range-ratio", "--range_ratio", dest="range_ratio", type=float, default=None, help="default: 0.5"
    )
    parser.add_argument("--output-json", "--output_json", dest="output_json", default=None)
    parser.set_defaults(max_num_seqs=None)  # the engine flag's: filled by fill_max_num_seqs
