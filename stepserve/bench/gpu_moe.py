"""GPU benchmark of a mixture of experts: the Qwen3-30B-A3B shape against the dense 8B and transformers.

    python -m stepserve.bench.gpu_moe --out DIR [--skip-cb] [--only moe,dense,fp8,cb]

Random bf16 weights shaped like Qwen/Qwen3-30B-A3B (``SHAPES["qwen3-30b-a3b"]`` in ``gpu.py``:
48 layers, 128 experts of width 768, 8 a token; 30.5B parameters, 61 GB) are made on the GPU
from ``gpu.random_weights`` (transformers 5's stacked expert tensors; nothing is downloaded).
Workload and engine settings are ``gpu.py``'s: 256 requests x 512 random prompt tokens / 256
output tokens, ``ignore_eos``, greedy, ``num_scheduler_steps`` 8, asynchronous scheduling, CUDA
graphs. The parts run in this order, each engine freed before the next is built:

- ``moe`` (about 2-2.5 min): stepserve bf16 at ``gpu_memory_utilization`` 0.92: the workload's
  output tok/s; the ``cb`` part's requests again (so that transformers is compared on the same
  requests); batch-1 decode tok/s (a 32-token prompt, 256 output tokens) against its bandwidth
  bound, ``decode_bytes`` over the measured device copy bandwidth; then a profile of steady decode
  at 256 rows (CUDA kernels over 16 steps) in ``DIR/profile_moe.txt``, and at one row in
  ``DIR/profile_moe_batch1.txt``. Building the engine (61 GB of weights, the MoE kernel's
  compiles, the graphs) takes most of it.
- ``dense`` (about 40 s): the Llama-3.1-8B shape, same workload (``gpu.bench_family``), for the
  ratio MoE / dense 8B (target >= 1.5).
- ``fp8`` (about 1.5-2 min): ``quantization="fp8"`` from the same bf16 stream (loaded in bf16,
  then quantized: expert weights e4m3 with per-expert, per-channel scales, the attention
  projections e4m3 per channel; router, norms, embedding and LM head stay bf16): the workload,
  batch 1, and a profile at one row in ``DIR/profile_moe_fp8_batch1.txt``.
- ``cb`` (about 2-3 min, ``--skip-cb`` leaves it out): transformers ``generate_batch``
  (``paged|sdpa``, its default experts implementation) on the same weights. Its 8B run took
  two minutes for the full workload on an H100, and this model has 61 GB of weights to load, so
  it runs ``--cb-requests`` (64) requests of the workload (a fresh draw, run by stepserve in the
  ``moe`` part too): the ratio stepserve / transformers (target >= 10) is on those same
  requests; stepserve's 256-request figure over it is given beside, as the per-token comparison.

In all about 7-8 minutes on an H100 (less on an H200), inside one 10-minute call; where a call's
time is short, split it as ``--only moe,dense,cb`` then ``--only fp8`` (a ratio needs both of
its parts in one run). Memory: on an 80 GB H100 the bf16 engine keeps about 11 GiB for the KV
cache (about 120k tokens, so about 160 of the 256 requests at full length: the scheduler admits
fewer and preempts; the JSON gives ``kv_tokens`` and ``preemptions``); on an H200 all fit. FP8
leaves about 36 GiB more for the cache, so on an H100 its gain is partly a larger batch. Random
routers spread tokens evenly over the experts, more than a trained router does. A table goes to
stdout, the figures, ratios and targets to ``DIR/gpu_moe.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stepserve.bench.gpu import (
    kernel_table,
    top_kernels,
    MAX_MODEL_LEN,
    NUM_REQUESTS,
    OUTPUT_LEN,
    PROMPT_LEN,
    SHAPES,
    batch1_decode,
    bench_family,
    copy_bandwidth,
    decode_busy_share,
    free_gpu,
    stepserve_engine,
    stepserve_throughput,
    transformers_cb,
    workload,
    write_model_dir,
)
from stepserve.models.config import DecoderConfig
from stepserve.models.registry import decoder_config

MOE, DENSE = "qwen3-30b-a3b", "8b"
PARTS = ("moe", "dense", "fp8", "cb")  # the order they run in
GPU_MEMORY_UTILIZATION = 0.92  # 61 GB of bf16 weights on an 80 GB card: what is left is the KV cache
CB_REQUESTS = 64
BATCH1_PROMPT_LEN = 32
PROFILE_ROWS, PROFILE_PASSES = 256, 2  # steady decode at the full batch, 2 passes of 8 steps
TARGETS = {"moe_over_dense_8b": 1.5, "stepserve_over_transformers": 10.0}
BF16 = 2  # bytes


# -- the bandwidth bound -------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeBytes:
    """What one token of a batch-1 decode step must read from device memory."""

    weights: int  # weight bytes (see decode_bytes)
    kv_per_context_token: int  # KV cache bytes per token of context (bf16 pages, every layer)


def decode_bytes(cfg: DecoderConfig, fp8: bool = False) -> DecodeBytes:
    """Every layer's attention projections and norms; in a sparse layer the router and ``top_k``
    experts' w13 [2I, H] and w2 [H, I] (plus a shared expert and its gate), in a dense one its
    MLP; the final norm, the LM head (or the tied embedding, read whole as the head) and one
    embedding row. Weights in bf16, or with ``fp8`` as ``quantization="fp8"`` leaves them
    (``models/fp8.py``): each projection of the layers, experts included, one byte a weight plus
    a float32 scale per output channel; router, norms, embedding and LM head bf16."""
    layers = sum(_layer_bytes(cfg, i, fp8) for i in range(cfg.num_layers))
    head = cfg.vocab_size * cfg.hidden_size * BF16
    final_norm_and_row = 2 * cfg.hidden_size * BF16
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * BF16
    return DecodeBytes(layers + head + final_norm_and_row, kv)


def _projection(out_features: int, in_features: int, fp8: bool) -> int:
    if fp8:
        return out_features * in_features + out_features * 4  # e4m3, and a float32 scale a row
    return out_features * in_features * BF16


def _gated_mlp(inner: int, hidden: int, fp8: bool) -> int:
    return _projection(2 * inner, hidden, fp8) + _projection(hidden, inner, fp8)


def _layer_bytes(cfg: DecoderConfig, layer: int, fp8: bool) -> int:
    hidden, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attention = _projection(q + 2 * kv, hidden, fp8) + _projection(hidden, q, fp8)
    biases = (q + 2 * kv) * cfg.qkv_bias + hidden * cfg.o_bias
    norms = (4 if cfg.sandwich_norms else 2) * hidden + (2 * cfg.head_dim if cfg.qk_norm else 0)
    return attention + (biases + norms) * BF16 + _mlp_bytes(cfg, layer, fp8)


def _mlp_bytes(cfg: DecoderConfig, layer: int, fp8: bool) -> int:
    hidden, moe = cfg.hidden_size, cfg.moe
    if moe is None or not moe.sparse_layers[layer]:
        return _gated_mlp(cfg.intermediate_size, hidden, fp8)
    router = moe.num_experts * hidden * BF16
    experts = moe.top_k * _gated_mlp(moe.intermediate_size, hidden, fp8)
    shared = 0
    if moe.shared_intermediate_size:  # Qwen2-MoE: the shared expert, and its [1, H] gate in bf16
        shared = _gated_mlp(moe.shared_intermediate_size, hidden, fp8) + hidden * BF16
    return router + experts + shared


# -- the parts -----------------------------------------------------------------------------


def moe_engine(root: Path, utilization: float, **options):
    return stepserve_engine(
        write_model_dir(root, MOE),
        MOE,
        8,
        gpu_memory_utilization=utilization,
        compilation_cache_dir=str(root / "compile"),
        **options,
    )


def throughput(core, info, prompts) -> dict:
    """``gpu.stepserve_throughput`` with what bounds the batch: the KV cache and preemptions."""
    sched = core.scheduler
    before = sched.num_preemptions
    result = stepserve_throughput(core, prompts)
    return {
        **result,
        "kv_blocks": info.num_kv_blocks,
        "kv_tokens": (info.num_kv_blocks - 1) * sched.blocks.block_size,  # block 0 is the null block
        "preemptions": sched.num_preemptions - before,
        "load_s": round(info.load_seconds, 1),
    }


def batch1(core, copy_tb_s: float, fp8: bool) -> dict:
    """``gpu.batch1_decode`` on a short prompt, against the bound: copy bandwidth over the bytes a
    token reads (at the mean context of the run)."""
    need = decode_bytes(decoder_config(SHAPES[MOE], MAX_MODEL_LEN), fp8)
    prompt = workload(seed=6)[0][:BATCH1_PROMPT_LEN]
    result = batch1_decode(core, prompt, need.weights, need.kv_per_context_token)
    bound = copy_tb_s * 1e12 / result["bytes_per_token"]
    return {
        **result,
        "prompt_tokens": len(prompt),
        "weight_bytes": need.weights,
        "bound_tok_s": round(bound, 1),
        "achieved_over_bound": round(result["tok_s"] / bound, 3),
    }


def profile_decode(core, info, out: Path, rows: int = PROFILE_ROWS, name: str = "profile_moe.txt") -> dict:
    """Steady decode at ``rows`` rows under the profiler (``gpu.decode_busy_share``), the kernel
    table in ``out / name``; prompts are cut where the KV cache could not hold every row at full
    length (an H100)."""
    block = core.scheduler.blocks.block_size
    per_row = (info.num_kv_blocks - 1) // rows * block
    prompt_len = min(PROMPT_LEN, per_row - 8 * (PROFILE_PASSES + 6))  # its decode tokens, a pass spare
    if prompt_len < 16:
        return {"skipped": f"the KV cache holds {per_row} tokens a row at {rows} rows"}
    prompts = [p[:prompt_len] for p in workload(seed=3)[:rows]]
    kernels: list = []
    trace = out / name.replace(".txt", "_trace.json.gz")
    busy = decode_busy_share(core, prompts, passes=PROFILE_PASSES, kernels=kernels, trace=trace)
    top = top_kernels(kernels, max(1, busy["steps"]))
    (out / name).write_text(kernel_table(top, busy, prompt_len))
    return {**busy, "prompt_tokens": prompt_len, "top_kernels": top[:10]}


def bench_moe(root: Path, out: Path, prompts, cb_prompts, results: dict, utilization: float) -> None:
    core, info = moe_engine(root, utilization)
    results["moe"] = throughput(core, info, prompts)
    print(f"{MOE} bf16: {results['moe']}", flush=True)
    if cb_prompts:
        results["moe_cb_requests"] = stepserve_throughput(core, cb_prompts, warm=False)
        print(f"{MOE} bf16, the {len(cb_prompts)} requests of the cb part: {results['moe_cb_requests']}", flush=True)
    results["batch1_moe"] = batch1(core, results["copy_tb_s"], fp8=False)
    print(f"{MOE} bf16 batch-1: {results['batch1_moe']}", flush=True)
    results["profile_moe"] = profile_decode(core, info, out)
    print(f"{MOE} bf16 steady decode: {results['profile_moe']}", flush=True)
    results["profile_moe_batch1"] = profile_decode(core, info, out, rows=1, name="profile_moe_batch1.txt")
    print(f"{MOE} bf16 batch-1 decode: {results['profile_moe_batch1']}", flush=True)


def bench_moe_fp8(root: Path, out: Path, prompts, results: dict, utilization: float) -> None:
    core, info = moe_engine(root, utilization, quantization="fp8")
    results["moe_fp8"] = throughput(core, info, prompts)
    print(f"{MOE} fp8: {results['moe_fp8']}", flush=True)
    results["batch1_moe_fp8"] = batch1(core, results["copy_tb_s"], fp8=True)
    print(f"{MOE} fp8 batch-1: {results['batch1_moe_fp8']}", flush=True)
    results["profile_moe_fp8_batch1"] = profile_decode(core, info, out, rows=1, name="profile_moe_fp8_batch1.txt")
    print(f"{MOE} fp8 batch-1 decode: {results['profile_moe_fp8_batch1']}", flush=True)


def bench_cb(root: Path, cb_prompts, results: dict) -> None:
    results["transformers_moe"] = transformers_cb(write_model_dir(root, MOE), MOE, cb_prompts)
    print(f"{MOE} transformers CB, {len(cb_prompts)} requests: {results['transformers_moe']}", flush=True)


# -- the report ----------------------------------------------------------------------------


def summary(results: dict) -> dict:
    get = lambda key, field="out_tok_s": results.get(key, {}).get(field)  # noqa: E731
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    moe, cb = get("moe"), get("transformers_moe")
    s = {
        "device": torch.cuda.get_device_name(),
        "date": results["date"],
        "workload": results["workload"],
        "moe_out_tok_s": moe,
        "dense_8b_out_tok_s": get("stepserve_8b"),
        "moe_over_dense_8b": ratio(moe, get("stepserve_8b")),
        "moe_fp8_out_tok_s": get("moe_fp8"),
        "moe_fp8_over_bf16": ratio(get("moe_fp8"), moe),
        "cb_requests": results["cb_requests"],
        "moe_out_tok_s_cb_requests": get("moe_cb_requests"),
        "transformers_moe_out_tok_s": cb,
        "stepserve_over_transformers": ratio(get("moe_cb_requests"), cb),
        "stepserve_256_over_transformers": ratio(moe, cb),
        "copy_tb_s": results.get("copy_tb_s"),
        "decode_ms_per_step_full_batch": get("profile_moe", "ms_per_step"),
        "targets": TARGETS,
    }
    for key in ("batch1_moe", "batch1_moe_fp8"):
        s[f"{key}_tok_s"], s[f"{key}_bound_tok_s"] = get(key, "tok_s"), get(key, "bound_tok_s")
        s[f"{key}_achieved_over_bound"] = get(key, "achieved_over_bound")
    s["met"] = {name: None if s[name] is None else s[name] >= target for name, target in TARGETS.items()}
    return s


def table(s: dict, results: dict) -> str:
    busy = results.get("profile_moe", {})
    top = (busy.get("top_kernels") or [{}])[0]
    x = lambda r: "-" if r is None else f"{r}x"  # noqa: E731
    rows = [
        (
            f"Qwen3-30B-A3B shape bf16, {s['workload']}, output tok/s",
            s["moe_out_tok_s"],
            f"dense 8B: {s['dense_8b_out_tok_s']}",
            f"{x(s['moe_over_dense_8b'])} (target >= {TARGETS['moe_over_dense_8b']})",
        ),
        ("same, FP8 weights, output tok/s", s["moe_fp8_out_tok_s"], "-", f"{x(s['moe_fp8_over_bf16'])} of bf16"),
        (
            f"{s['cb_requests']} requests of the workload, output tok/s",
            s["moe_out_tok_s_cb_requests"],
            f"transformers CB: {s['transformers_moe_out_tok_s']}",
            f"{x(s['stepserve_over_transformers'])} (target >= {TARGETS['stepserve_over_transformers']}); "
            f"the full workload's figure over it: {x(s['stepserve_256_over_transformers'])}",
        ),
        (
            "batch-1 decode tok/s, bf16",
            s["batch1_moe_tok_s"],
            f"bound {s['batch1_moe_bound_tok_s']}",
            f"{s['batch1_moe_achieved_over_bound']} of the bound",
        ),
        (
            "batch-1 decode tok/s, FP8",
            s["batch1_moe_fp8_tok_s"],
            f"bound {s['batch1_moe_fp8_bound_tok_s']}",
            f"{s['batch1_moe_fp8_achieved_over_bound']} of the bound",
        ),
        (
            f"steady decode at batch {busy.get('batch')}, ms a step",
            s["decode_ms_per_step_full_batch"],
            f"GPU busy {busy.get('busy_share')}",
            f"top kernel {top.get('share')} of kernel time: {str(top.get('kernel'))[:60]}",
        ),
        ("device copy bandwidth, TB/s", s["copy_tb_s"], "-", s["device"]),
    ]
    lines = ["| measure | stepserve | baseline | ratio / note |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_moe.json and profile_moe.txt")
    parser.add_argument("--only", help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--skip-cb", action="store_true", help="leave out transformers' continuous batching")
    parser.add_argument("--cb-requests", type=int, default=CB_REQUESTS, help="requests transformers runs")
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS, help="fewer requests for a smoke run")
    parser.add_argument("--gpu-memory-utilization", type=float, default=GPU_MEMORY_UTILIZATION, help="MoE engines")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args(argv)
    parts = args.only.split(",") if args.only else list(PARTS)
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(set(parts) - set(PARTS)))}; choose from {', '.join(PARTS)}")
    parts = [p for p in PARTS if p in parts and not (p == "cb" and args.skip_cb)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_parts(parts, args, out)
    s = summary(results)
    print(table(s, results))
    print(json.dumps(s, indent=2))


def run_parts(parts: list[str], args, out: Path) -> dict:
    """Each part in turn; after each, its seconds and the GPU memory still allocated (an engine
    not freed would show there), and the JSON saved so far."""
    results: dict = {
        "date": args.date,
        "workload": f"{args.num_requests} x {PROMPT_LEN} in / {OUTPUT_LEN} out, ignore_eos, greedy",
        "cb_requests": args.cb_requests if "cb" in parts else None,
        "seconds": {},
        "memory_left_gib": {},
    }
    results["copy_tb_s"] = round(copy_bandwidth(), 3)
    prompts = workload()[: args.num_requests]
    cb_prompts = workload(seed=5)[: args.cb_requests] if "cb" in parts else []
    util = args.gpu_memory_utilization
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = {
            "moe": lambda: bench_moe(root, out, prompts, cb_prompts, results, util),
            "dense": lambda: bench_family(root, DENSE, prompts, results, {}),
            "fp8": lambda: bench_moe_fp8(root, out, prompts, results, util),
            "cb": lambda: bench_cb(root, cb_prompts, results),
        }
        for part in parts:
            start = time.perf_counter()
            try:
                runs[part]()
            except Exception as exc:
                logging.exception("the %s part failed", part)
                results[f"error_{part}"] = repr(exc)
            free_gpu()  # outside the handler: the traceback, and the engine its frames held, are gone
            results["seconds"][part] = round(time.perf_counter() - start, 1)
            results["memory_left_gib"][part] = round(torch.cuda.memory_allocated() / 2**30, 2)
            (out / "gpu_moe.json").write_text(json.dumps({**summary(results), "details": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
