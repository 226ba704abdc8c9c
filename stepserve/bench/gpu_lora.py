"""GPU benchmark of LoRA adapters: the 8B shape serving 8 adapters against the base model alone.

    python -m stepserve.bench.gpu_lora --out DIR [--num-requests N]

Random bf16 weights shaped like Llama-3.1-8B (``SHAPES["8b"]`` in ``gpu.py``; nothing is
downloaded) and 8 random rank-16 adapters on all seven projections of every layer (q, k, v, o,
gate, up, down; ``lora_alpha`` 32; A and B N(0, 0.01) in bf16, 84 MB each), written as PEFT
folders without ``peft``. Workload and engine settings are ``gpu.py``'s: 256 requests x 512
random prompt tokens / 256 output tokens, ``ignore_eos``, greedy, ``num_scheduler_steps`` 8,
asynchronous scheduling, CUDA graphs. The parts run in this order, each engine freed before the
next is built:

- ``base`` (about 1 min): the engine with ``enable_lora=False``: the workload's output tok/s, and
  batch-1 decode tok/s (``gpu.batch1_decode``: the first prompt, 256 output tokens).
- ``lora`` (about 2 min): the adapters are written, then the same engine configuration with
  ``enable_lora=True, max_loras=8, max_lora_rank=16``: the workload with request i on adapter
  i % 8 (the warm-up likewise, so that every adapter is read and resident before the timed run);
  the workload again with every request on the base (what having LoRA on costs); batch-1 decode
  with adapter 0, and on the base.

Both parts also profile batch-1 decode on the base (the CUDA kernels of 2 passes) into
``DIR/profile_batch1_base.txt`` and ``DIR/profile_batch1_lora_on_base.txt``: side by side they show
what LoRA costs a row that has no adapter (and ``DIR/profile_batch1_adapter.txt`` what an applied
adapter adds); and one prefill pass of 16 prompts into
``DIR/profile_prefill_base.txt`` and (request i on adapter i % 8) ``DIR/profile_prefill_adapters.txt``,
where the adapters' prefill cost shows (1.1x the base's pass on an H100, 2026-12-07); and
steady decode at 256 rows into ``DIR/profile_decode_base.txt`` and ``DIR/profile_decode_adapters.txt``.

In all about 3-4 minutes on an H100, inside one 10-minute call. Ratios against the base engine,
with targets: adapters / base throughput >= 0.8, batch 1 with an adapter / base >= 0.9. A table
goes to stdout, the figures, ratios and targets to ``DIR/gpu_lora.json`` (saved after each part).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import tempfile
import time
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
    decode_busy_share,
    free_gpu,
    model_stream_bytes,
    run_requests,
    stepserve_engine,
    stepserve_throughput,
    workload,
    write_model_dir,
)
from stepserve.checkpoint.lora import WEIGHTS_FILE, layer_shapes, read_adapter_config
from stepserve.core.outputs import LoraRef
from stepserve.models.config import DecoderConfig
from stepserve.models.registry import decoder_config

SHAPE = "8b"
PARTS = ("base", "lora")  # the order they run in
NUM_ADAPTERS, RANK, ALPHA = 8, 16, 32
ATTENTION = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
TARGETS = {"adapters_over_base": 0.8, "batch1_adapter_over_base": 0.9}


# -- adapters ------------------------------------------------------------------------------


def write_adapter(
    directory: Path,
    cfg: DecoderConfig,
    seed: int,
    rank: int = RANK,
    alpha: int = ALPHA,
    base_model: str = "random-8b",
    device: str = "cpu",
) -> Path:
    """A PEFT LoRA folder as ``peft``'s ``save_pretrained`` writes it, made without ``peft``:
    rank ``rank`` on every adaptable projection of every layer (``checkpoint.lora.layer_shapes``),
    ``lora_A`` [rank, in] and ``lora_B`` [out, rank] drawn N(0, 0.01) in bf16 (PEFT starts B at
    zero; a random B makes the adapter change the model's output). Drawn on ``device``: the 8B
    shape's 448 tensors take seconds each adapter on a few CPU cores, milliseconds on a GPU."""
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(seed)
    tensors, targets = {}, set()
    for layer, shapes in enumerate(layer_shapes(cfg)):
        targets.update(module.rsplit(".", 1)[-1] for module in shapes)
        for module, (inner, outer, experts) in shapes.items():
            if experts > 1:
                continue  # the benchmark's base is dense
            block = "self_attn" if module in ATTENTION else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = _normal((rank, inner), gen)
            tensors[f"{prefix}.lora_B.weight"] = _normal((outer, rank), gen)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "bias": "none",
        "base_model_name_or_path": base_model,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def _normal(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device=gen.device) * 0.01).to(torch.bfloat16).cpu()


def write_adapters(root: Path, cfg: DecoderConfig, count: int = NUM_ADAPTERS, device: str = "cpu") -> list[LoraRef]:
    """``count`` adapters under ``root``, each checked as the server checks one at start."""
    refs = []
    for i in range(count):
        path = write_adapter(root / f"adapter-{i}", cfg, seed=i, device=device)
        read_adapter_config(path, RANK, layer_shapes(cfg))
        refs.append(LoraRef(i + 1, f"adapter-{i}", str(path)))
    return refs


# -- the parts -----------------------------------------------------------------------------


def engine(root: Path, **lora):
    return stepserve_engine(write_model_dir(root, SHAPE), SHAPE, 8, compilation_cache_dir=str(root / "compile"), **lora)


def throughput(core, info, prompts, loras: list | None = None) -> dict:
    """``gpu.stepserve_throughput`` (its warm-up on the same adapters), with the KV cache's size and
    the preemptions of the timed run."""
    before = core.scheduler.num_preemptions
    result = stepserve_throughput(core, prompts, loras=loras)
    return {
        **result,
        "kv_blocks": info.num_kv_blocks,
        "preemptions": core.scheduler.num_preemptions - before,
        "load_s": round(info.load_seconds, 1),
        "async_scheduling": core.async_scheduling,
    }


def batch1(core, prompt: list[int], lora: LoraRef | None = None) -> dict:
    """``gpu.batch1_decode``; the bytes a token reads count the adapter's slot (every adapted
    projection's ``A`` and ``B`` of one slot, padding included) when there is one."""
    weight_bytes, kv_bytes = model_stream_bytes(core)
    if lora is not None:
        buffers = core.worker.model.named_buffers()
        weight_bytes += sum(b[0].nbytes for name, b in buffers if name.endswith(("lora_a", "lora_b")))
    return batch1_decode(core, prompt, weight_bytes, kv_bytes, lora)


def profile_batch1(core, prompt: list[int], out: Path, name: str, lora: LoraRef | None = None) -> dict:
    """The CUDA kernels of batch-1 decode (``gpu.decode_busy_share`` on one row; on ``lora`` where
    given, else on the base), the table in ``out / name``: beside the base alone's, it shows what
    LoRA costs a row without an adapter, and what an applied adapter adds."""
    kernels: list = []
    trace = out / name.replace(".txt", "_trace.json.gz")
    loras = [lora] if lora is not None else None
    busy = decode_busy_share(core, [prompt], passes=2, kernels=kernels, trace=trace, loras=loras)
    top = top_kernels(kernels, max(1, busy["steps"]))
    (out / name).write_text(kernel_table(top, busy, len(prompt)))
    return {**busy, "top_kernels": top[:10]}


PREFILL_PROFILE_PROMPTS = 16  # one pass of 16 x 512 tokens: most of the workload's prefill passes


def profile_prefill(core, out: Path, name: str, loras: list | None = None) -> dict:
    """The CUDA kernels of one prefill pass of ``PREFILL_PROFILE_PROMPTS`` new prompts (request i
    on ``loras[i % len(loras)]`` where given), one output token each, after a warm-up on as many
    others (no prefix-cache hits), the table in ``out / name``: beside the base's, it shows what
    adapters cost a prefill pass."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fresh = workload(seed=7)
    batch, warm = fresh[:PREFILL_PROFILE_PROMPTS], fresh[PREFILL_PROFILE_PROMPTS : 2 * PREFILL_PROFILE_PROMPTS]
    every = [loras[i % len(loras)] for i in range(len(batch))] if loras else None
    run_requests(core, warm, 1, "prefill-warm", loras=every)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall, _ = run_requests(core, batch, 1, "prefill-profile", loras=every)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    kernel_s = sum(k.self_device_time_total for k in averages) / 1e6
    busy = {"passes": 1, "steps": 1, "batch": len(batch), "wall_s": round(wall, 4), "kernel_s": round(kernel_s, 4)}
    busy |= {"busy_share": round(kernel_s / wall, 3), "ms_per_step": round(1e3 * wall, 3)}
    top = top_kernels(averages, 1)
    table = kernel_table(top, busy, len(batch[0])).replace(
        "CUDA kernels of steady decode", "CUDA kernels of a prefill pass"
    )
    (out / name).write_text(table)
    return {**busy, "top_kernels": top[:10]}


DECODE_PROFILE_ROWS = 256  # the workload's concurrency


def profile_decode(core, out: Path, name: str, loras: list | None = None) -> dict:
    """The CUDA kernels of steady decode at ``DECODE_PROFILE_ROWS`` rows (request i on
    ``loras[i % len(loras)]`` where given; 2 passes, 16 steps), the table in ``out / name``."""
    kernels: list = []
    prompts = workload(seed=11)[:DECODE_PROFILE_ROWS]
    busy = decode_busy_share(core, prompts, passes=2, kernels=kernels, loras=loras)
    top = top_kernels(kernels, max(1, busy["steps"]))
    (out / name).write_text(kernel_table(top, busy, len(prompts[0])))
    return {**busy, "top_kernels": top[:10]}


def bench_base(root: Path, out: Path, prompts, results: dict) -> None:
    core, info = engine(root, enable_lora=False)
    results["base"] = throughput(core, info, prompts)
    print(f"8b base: {results['base']}", flush=True)
    results["batch1_base"] = batch1(core, prompts[0])
    print(f"8b base batch-1: {results['batch1_base']}", flush=True)
    if not results["skip_profiles"]:
        results["profile_batch1_base"] = profile_batch1(core, prompts[0], out, "profile_batch1_base.txt")
        results["profile_prefill_base"] = profile_prefill(core, out, "profile_prefill_base.txt")
        results["profile_decode_base"] = profile_decode(core, out, "profile_decode_base.txt")


def bench_lora(root: Path, out: Path, prompts, results: dict) -> None:
    start = time.perf_counter()
    adapters = write_adapters(root / "adapters", decoder_config(SHAPES[SHAPE], MAX_MODEL_LEN), device="cuda")
    results["adapters_written_s"] = round(time.perf_counter() - start, 1)
    core, info = engine(root, enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=RANK)
    results["adapters"] = throughput(core, info, prompts, adapters)
    print(f"8b, {NUM_ADAPTERS} adapters (request i on adapter i % {NUM_ADAPTERS}): {results['adapters']}", flush=True)
    results["lora_on_base"] = throughput(core, info, prompts)
    print(f"8b, LoRA on, every request on the base: {results['lora_on_base']}", flush=True)
    results["batch1_adapter"] = batch1(core, prompts[0], adapters[0])
    print(f"8b batch-1 with an adapter: {results['batch1_adapter']}", flush=True)
    results["batch1_lora_on_base"] = batch1(core, prompts[0])
    print(f"8b batch-1, LoRA on, on the base: {results['batch1_lora_on_base']}", flush=True)
    if not results["skip_profiles"]:
        results["profile_batch1_lora_on_base"] = profile_batch1(
            core, prompts[0], out, "profile_batch1_lora_on_base.txt"
        )
        results["profile_batch1_adapter"] = profile_batch1(
            core, prompts[0], out, "profile_batch1_adapter.txt", adapters[0]
        )
        results["profile_prefill_adapters"] = profile_prefill(core, out, "profile_prefill_adapters.txt", adapters)
        results["profile_decode_adapters"] = profile_decode(core, out, "profile_decode_adapters.txt", adapters)
    results["adapter_loads"] = core.worker.lora.loads  # 8: each adapter copied into a slot once, no swaps


# -- the report ----------------------------------------------------------------------------


def summary(results: dict) -> dict:
    get = lambda key, field="out_tok_s": results.get(key, {}).get(field)  # noqa: E731
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    base, b1 = get("base"), get("batch1_base", "tok_s")
    s = {
        "device": torch.cuda.get_device_name(),
        "date": results["date"],
        "workload": results["workload"],
        "adapters": f"{NUM_ADAPTERS} x rank {RANK} on q, k, v, o, gate, up, down; request i on i % {NUM_ADAPTERS}",
        "base_out_tok_s": base,
        "adapters_out_tok_s": get("adapters"),
        "lora_on_base_out_tok_s": get("lora_on_base"),
        "adapters_over_base": ratio(get("adapters"), base),
        "lora_on_base_over_base": ratio(get("lora_on_base"), base),
        "batch1_base_tok_s": b1,
        "batch1_adapter_tok_s": get("batch1_adapter", "tok_s"),
        "batch1_lora_on_base_tok_s": get("batch1_lora_on_base", "tok_s"),
        "batch1_adapter_over_base": ratio(get("batch1_adapter", "tok_s"), b1),
        "batch1_lora_on_base_over_base": ratio(get("batch1_lora_on_base", "tok_s"), b1),
        "targets": TARGETS,
    }
    s["met"] = {name: None if s[name] is None else s[name] >= target for name, target in TARGETS.items()}
    return s


def table(s: dict) -> str:
    x = lambda r: "-" if r is None else f"{r}x"  # noqa: E731
    rows = [
        ("8B base alone (enable_lora=False), output tok/s", s["base_out_tok_s"], "-"),
        (
            f"{NUM_ADAPTERS} rank-{RANK} adapters, requests spread over them, output tok/s",
            s["adapters_out_tok_s"],
            f"{x(s['adapters_over_base'])} of base (target >= {TARGETS['adapters_over_base']})",
        ),
        (
            "LoRA on, every request on the base, output tok/s",
            s["lora_on_base_out_tok_s"],
            x(s["lora_on_base_over_base"]),
        ),
        ("batch-1 decode tok/s, base alone", s["batch1_base_tok_s"], "-"),
        (
            "batch-1 decode tok/s, one adapter",
            s["batch1_adapter_tok_s"],
            f"{x(s['batch1_adapter_over_base'])} of base (target >= {TARGETS['batch1_adapter_over_base']})",
        ),
        (
            "batch-1 decode tok/s, LoRA on, on the base",
            s["batch1_lora_on_base_tok_s"],
            x(s["batch1_lora_on_base_over_base"]),
        ),
    ]
    lines = [f"{s['workload']}; {s['device']}", "", "| measure | stepserve | ratio / note |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_lora.json")
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS, help="fewer requests for a smoke run")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--skip-profiles", action="store_true", help="only the timed runs (no kernel profiles)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_parts(args, out)
    s = summary(results)
    print(table(s))
    print(json.dumps(s, indent=2))


def run_parts(args, out: Path) -> dict:
    """Each part in turn; after each, its seconds and the GPU memory still allocated (an engine
    not freed would show there), and the JSON saved so far."""
    results: dict = {
        "date": args.date,
        "workload": f"{args.num_requests} x {PROMPT_LEN} in / {OUTPUT_LEN} out, ignore_eos, greedy",
        "seconds": {},
        "memory_left_gib": {},
        "skip_profiles": args.skip_profiles,
    }
    prompts = workload()[: args.num_requests]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = {
            "base": lambda: bench_base(root, out, prompts, results),
            "lora": lambda: bench_lora(root, out, prompts, results),
        }
        for part in PARTS:
            start = time.perf_counter()
            try:
                runs[part]()
            except Exception as exc:
                logging.exception("the %s part failed", part)
                results[f"error_{part}"] = repr(exc)
            free_gpu()  # outside the handler: the traceback, and the engine its frames held, are gone
            results["seconds"][part] = round(time.perf_counter() - start, 1)
            results["memory_left_gib"][part] = round(torch.cuda.memory_allocated() / 2**30, 2)
            (out / "gpu_lora.json").write_text(json.dumps({**summary(results), "details": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
