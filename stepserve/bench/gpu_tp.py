"""Tensor parallelism on several GPUs of one host, over NCCL: the multi-GPU benchmark.

    python -m stepserve.bench.gpu_tp --out DIR [--tp N] [--only 8b,70b,70b-fp8]

Random weights made on each rank (``--load-format dummy``: every rank fills its own shard), the
usual workload (256 requests of 512 random prompt tokens and 256 output tokens, ``ignore_eos``,
8 scheduler steps, asynchronous scheduling), timed through the engine loop as
``stepserve.bench.gpu`` times it. Measured:

- ``8b``: the Llama-3.1-8B shape at TP=1 and TP=2, offline output tok/s (target: TP=2 >= 1.6x TP=1);
- ``70b`` and ``70b-fp8``: the Llama-3.1-70B shape (bf16 141 GB; FP8 weights 70 GB) at TP=N (the
  GPUs visible, or ``--tp``), offline output tok/s; batch-1 decode tok/s against the bound of
  the bytes each GPU reads a token (its shard of the weights, its KV heads, and the replicated
  embedding row, norms and LM head) at its copy bandwidth, all GPUs reading at once (target:
  >= 0.6); and from a profile of rank 0's steady decode, the NCCL all-reduce time a step.

The all-reduce is NCCL's (``distributed/layers.py``); a custom all-reduce kernel is not written,
so the profile's NCCL share is what one would save. A shape that does not fit the GPUs at the
given TP is reported as skipped with the error. A table goes to stdout, JSON to
``DIR/gpu_tp.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from pathlib import Path

import torch

from stepserve.bench import gpu as G

log = logging.getLogger("stepserve")

RUNS = {  # name -> (shape, quantization)
    "8b": ("8b", "none"),
    "70b": ("70b", "none"),
    "70b-fp8": ("70b", "fp8"),
}
TARGETS = {"tp2_over_tp1_8b": 1.6, "batch1_of_bound_70b": 0.6}
ALL_REDUCE_KERNELS = ("nccl", "allreduce", "all_reduce")  # lower-cased substrings of the kernels' names


def tp_engine(model_dir: Path, tp: int, quantization: str):
    from stepserve.config import EngineConfig
    from stepserve.engine.builder import build_engine

    config = EngineConfig.from_kwargs(
        model=str(model_dir),
        load_format="dummy",
        tensor_parallel_size=tp,
        quantization=quantization,
        num_scheduler_steps=8,
        max_num_batched_tokens=8192,
        async_scheduling=True,
        gpu_memory_utilization=0.9,
        max_model_len=G.MAX_MODEL_LEN,
        max_num_seqs=256,
    )
    core, _, info = build_engine(config)
    return core, info


def close_ranks(core) -> None:
    """End the other ranks' processes (a one-rank engine has none)."""
    close = getattr(core.worker, "close", None)
    if close is not None:
        close()


def batch1_bound(weight_bytes: int, kv_bytes_per_token: int, context: float, copy_tb_s: float) -> dict:
    """The decode tok/s one GPU's bytes allow: rank 0 reads its shard of the weights and of the
    KV cache per token (every rank reads as much, all at once), at its copy bandwidth."""
    bytes_per_token = weight_bytes + kv_bytes_per_token * context
    return {"bytes_per_gpu": bytes_per_token, "bound_tok_s": round(copy_tb_s * 1e12 / bytes_per_token, 1)}


def all_reduce_ms(kernels: list, steps: int) -> float | None:
    """Milliseconds a decode step spends in the all-reduce kernels, from the profiler's averages."""
    if not steps:
        return None
    total_us = 0.0
    for event in kernels:
        name = event.key.lower()
        if any(part in name for part in ALL_REDUCE_KERNELS):
            total_us += getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))
    return round(total_us / 1e3 / steps, 4)


def run(root: Path, name: str, tp: int, prompts, copy_tb_s: float, with_batch1: bool) -> dict:
    shape, quantization = RUNS[name]
    model_dir = G.write_model_dir(root, shape)
    try:
        core, info = tp_engine(model_dir, tp, quantization)
    except Exception as exc:  # a shape that does not fit, or a rank that failed to start
        log.warning("%s at TP=%d skipped: %s", name, tp, exc)
        return {"tp": tp, "skipped": f"{type(exc).__name__}: {exc}"[:400]}
    try:
        result = {"tp": tp, "num_kv_blocks": info.num_kv_blocks, **G.stepserve_throughput(core, prompts)}
        if with_batch1:
            weight_bytes, kv_bytes = G.model_stream_bytes(core)
            b1 = G.batch1_decode(core, prompts[0], weight_bytes, kv_bytes)
            bound = batch1_bound(weight_bytes, kv_bytes, G.PROMPT_LEN + G.OUTPUT_LEN / 2, copy_tb_s)
            result["batch1"] = b1 | bound | {"of_bound": round(b1["tok_s"] / bound["bound_tok_s"], 3)}
            kernels: list = []
            busy = G.decode_busy_share(core, prompts, kernels=kernels)
            result["decode"] = busy | {"all_reduce_ms_per_step": all_reduce_ms(kernels, busy["steps"])}
        return result
    finally:
        close_ranks(core)
        core = None  # the last reference: the engine's memory goes back before the next run builds
        G.free_gpu()


def summary(results: dict) -> dict:
    runs = results["runs"]
    tp1, tp2 = runs.get("8b-tp1", {}).get("out_tok_s"), runs.get("8b-tp2", {}).get("out_tok_s")
    b1 = runs.get(f"70b-tp{results['tp']}", {}).get("batch1", {})
    s = {
        "tp2_over_tp1_8b": round(tp2 / tp1, 3) if tp1 and tp2 else None,
        "batch1_of_bound_70b": b1.get("of_bound"),
    }
    s["met"] = {name: None if s[name] is None else s[name] >= target for name, target in TARGETS.items()}
    return s


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=None, help="ranks for the 70B shape (default: the GPUs visible)")
    parser.add_argument("--only", default="8b,70b,70b-fp8", help="comma-separated: 8b, 70b, 70b-fp8")
    parser.add_argument("--num-requests", type=int, default=G.NUM_REQUESTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    gpus = torch.cuda.device_count()
    tp = args.tp or gpus
    if gpus < 2 or tp > gpus:
        parser.error(f"needs at least 2 GPUs and --tp <= {gpus}; {gpus} visible")
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = G.workload()[: args.num_requests]
    copy_tb_s = G.copy_bandwidth()
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "gpus": gpus,
        "tp": tp,
        "copy_tb_s_per_gpu": round(copy_tb_s, 3),
        "runs": {},
    }
    root = args.out / "models"
    for name in args.only.split(","):
        if name == "8b":
            for size in (1, 2):
                results["runs"][f"8b-tp{size}"] = run(root, "8b", size, prompts, copy_tb_s, with_batch1=False)
        else:
            results["runs"][f"{name}-tp{tp}"] = run(root, name, tp, prompts, copy_tb_s, with_batch1=True)
        (args.out / "gpu_tp.json").write_text(json.dumps(results | {"summary": summary(results)}, indent=1))
    print(json.dumps(results | {"summary": summary(results)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
