"""The stepserve command: generate, serve, bench."""

from __future__ import annotations

import argparse
import logging
import sys

from stepserve.cli.engine_args import add_engine_args, located_engine_config
from stepserve.cli.serve import add_serve_parser
from stepserve.config import ConfigError
from stepserve.version import __version__


def _generate(args: argparse.Namespace) -> int:
    from stepserve.engine.llm import LLM
    from stepserve.sampling import SamplingParams

    config, _ = located_engine_config(args)
    from stepserve.bench.throughput import _flatten

    llm = LLM(**_flatten(config))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        out = llm.generate(args.prompt, params)
    completion = out[0].outputs[0]
    print(completion.text)
    print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.bench == "embeddings":
        from stepserve.bench import embeddings

        embeddings.run(args)
        return 0
    if args.bench == "throughput":
        from stepserve.bench import throughput

        throughput.run(args, located_engine_config(throughput.fill_max_num_seqs(args))[0])
        return 0
    if args.bench == "spec":
        from stepserve.bench import speculative

        speculative.run(args)
        return 0
    if args.bench in ("fuzz", "soak"):
        import importlib

        return importlib.import_module(f"stepserve.bench.{args.bench}").main(args)
    if getattr(args, "sweep", None):
        from stepserve.bench import sweep

        return sweep.main(args)
    from stepserve.bench import serve

    return serve.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepserve",
        description="An LLM server for Hugging Face models: the OpenAI and KServe protocols over its own engine.",
    )
    parser.add_argument("--version", action="version", version=f"stepserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one completion offline")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the chat template")
    gen.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--sampling-seed", dest="sampling_seed", type=int, default=None)
    gen.set_defaults(func=_generate)

    add_serve_parser(sub, add_engine_args)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    tp = bench_sub.add_parser("throughput", help="offline throughput of the engine")
    add_engine_args(tp)
    from stepserve.bench.throughput import add_args

    add_args(tp)
    tp.set_defaults(func=_bench)
    try:
        from stepserve.bench.serve import add_args as add_serve_bench_args
    except ImportError:
        add_serve_bench_args = None
    if add_serve_bench_args is not None:
        sv = bench_sub.add_parser("serve", help="load an OpenAI-compatible server")
        add_serve_bench_args(sv)
        sv.set_defaults(func=_bench)
    _add_hardening_benches(bench_sub)
    from stepserve.bench import speculative

    spec = bench_sub.add_parser("spec", help="speculative decoding against the same engine without it")
    speculative.add_args(spec)
    spec.set_defaults(func=_bench)
    from stepserve.bench.embeddings import add_args as add_embeddings_args

    emb = bench_sub.add_parser("embeddings", help="a server's /v1/embeddings beside plain transformers")
    add_embeddings_args(emb)
    emb.set_defaults(func=_bench)
    return parser


def _add_hardening_benches(bench_sub) -> None:
    from stepserve.bench import fuzz, soak

    fz = bench_sub.add_parser(
        "fuzz", help="schema-aware fuzzing of every route of a running server; prints status counts"
    )
    fuzz.add_args(fz)
    fz.set_defaults(func=_bench)
    sk = bench_sub.add_parser(
        "soak", help="start a server, drive a mixed load for a while, report leaks and stuck requests"
    )
    soak.add_args(sk)
    sk.set_defaults(func=_bench)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:  # a startup error: one line, no traceback
        print(f"stepserve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
