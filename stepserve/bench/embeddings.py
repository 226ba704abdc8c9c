"""Embeddings workload: a running server's ``/v1/embeddings`` throughput beside plain
``transformers`` on the same inputs in the same run, so the ratio shows what serving costs.

Inputs are random token ids (``--input-len`` each, special tokens excluded), sent as token-id
inputs so every request is exactly that long. Three figures, in inputs per second:

- server: ``--num-prompts`` requests of one input each, at most ``--max-concurrency`` in flight;
- transformers batched: ``AutoModel`` forward plus mean pooling over batches of ``--batch-size``;
- transformers one by one: the same, one input per call (what a naive server would do), timed
  once over the first ``--single-inputs`` inputs (it is slow).

The server and the batched baseline alternate for ``--rounds`` rounds, each round on new inputs
(the same for both), and each reports its best round; the baselines run in this process with
torch's default threads while the server idles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time

import httpx


def add_args(parser: argparse.ArgumentParser) -> None:
    def flag(name: str, **kwargs) -> None:
        parser.add_argument(f"--{name}", f"--{name.replace('-', '_')}", dest=name.replace("-", "_"), **kwargs)

    flag("base-url", default="http://127.0.0.1:8080", help="the server, without /v1")
    flag("model-dir", required=True, help="the served model's directory, for the transformers baselines")
    flag("model", default=None, help="model name to send; default: the first of /v1/models")
    flag("num-prompts", type=int, default=64, help="requests to send (one input each)")
    flag("input-len", type=int, default=128, help="tokens per input")
    flag("max-concurrency", type=int, default=64, help="requests in flight at most")
    flag("batch-size", type=int, default=32, help="inputs per transformers batched call")
    flag(
        "rounds", type=int, default=3, help="timed rounds of the server and the batched baseline; the best is reported"
    )
    flag("single-inputs", type=int, default=16, help="inputs of the one-by-one baseline")
    flag("seed", type=int, default=0, help="seed of the inputs")
    flag("output-json", default=None, help="also write the result here")


def random_inputs(tokenizer, num: int, length: int, seed: int) -> list[list[int]]:
    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    return [[rng.choice(pool) for _ in range(length)] for _ in range(num)]


async def _server_round(base_url: str, model: str | None, inputs: list[list[int]], concurrency: int) -> float:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=600, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def one(ids: list[int]) -> None:
            async with limit:
                response = await client.post("/v1/embeddings", json={"model": model, "input": ids})
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(one(ids) for ids in inputs))
        return time.perf_counter() - start


def _transformers_round(model, inputs: list[list[int]], batch_size: int) -> float:
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(inputs), batch_size):
            ids = torch.tensor(inputs[i : i + batch_size])
            mask = torch.ones_like(ids)
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.nn.functional.normalize(hidden.mean(1), dim=-1)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # Fresh inputs each round: a decoder embedding model runs on the engine, whose prefix cache
    # would otherwise serve a repeated round's prompts from the first one's KV blocks.
    rounds = [random_inputs(tokenizer, args.num_prompts, args.input_len, args.seed + r) for r in range(args.rounds + 1)]
    warm, rounds = rounds[-1], rounds[:-1]
    model = AutoModel.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    n = args.num_prompts
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _transformers_round(model, warm[: args.batch_size], args.batch_size)  # warm-up
    asyncio.run(_server_round(args.base_url, args.model, warm[:4], 4))
    batched, server = [], []
    for inputs in rounds:  # interleaved, so that a busy machine slows both alike
        batched.append(_transformers_round(model, inputs, args.batch_size))
        server.append(asyncio.run(_server_round(args.base_url, args.model, inputs, args.max_concurrency)))
    batched, server = min(batched), min(server)
    singles = rounds[0][: args.single_inputs]
    single = _transformers_round(model, singles, 1) * n / len(singles)  # scaled to n inputs
    result = {
        "inputs": n,
        "input_len": args.input_len,
        "max_concurrency": args.max_concurrency,
        "batch_size": args.batch_size,
        "server_inputs_per_s": n / server,
        "transformers_batched_inputs_per_s": n / batched,
        "transformers_single_inputs_per_s": n / single,
        "server_vs_batched": batched / server,
        "server_vs_single": single / server,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result
