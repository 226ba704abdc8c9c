"""The LoRA kernels' tiles on the GPU: ``lora_delta`` (shrink and expand, the grouping shared as in a
forward) for the Llama-3.1-8B projections with 8 rank-16 adapters, at the batch sizes a decode step
and a prefill pass bring, under the tiles ``lora_config`` picks and a small grid around them
(``split_k``: the shrink's input ranges, whose partials every expand program sums again, so more
ranges cost the expand unless a kernel of its own sums them, ``sum_in_expand``; ``block_n``: the
expand's output columns a program; ``block_m``: tokens a tile, each adapter's group padded to it).
Prints microseconds a call and, per batch size, the step's LoRA time (32 layers of the four
projections) under the current tiles and under the best of the grid: the sweep ``lora_config`` is
chosen from. At one token it also times a step's adapted projections as the base projection then
``lora_delta`` against ``lora_gemv`` (the expand in the GEMV's epilogue). Every timed config is
first checked against ``lora_reference``. JSON to OUT.json if given. On a GPU, from the repository
root:

    PYTHONPATH=. python bench/lora_kernel.py [OUT.json]
    PYTHONPATH=. python bench/lora_kernel.py --one-row [OUT.json]    # the one-token paths alone
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/lora_kernel.py --smoke    # the CPU, tiny shapes
"""

import dataclasses
import sys

import torch
from triton.runtime.errors import OutOfResources

from stepserve.bench.kernel_timing import graph_us, save
from stepserve.kernels.triton import lora as K
from stepserve.models.lora import lora_reference

SLOTS, LAYERS = 8, 32
# (input features, output features, rank): q/k/v fused (3 slices of 16), o, gate/up fused, down
SHAPES = {"qkv": (4096, 6144, 48), "o": (4096, 4096, 16), "gate_up": (4096, 28672, 32), "down": (14336, 4096, 16)}
TOKENS = (1, 256, 8192, 16, 2048)  # the decode step and the prefill pass first: a cut sweep keeps them
SPLITS, BLOCK_NS, BLOCK_MS = (1, 4, 16), (32, 64, 128), (16, 32, 64)
SMOKE = {
    "shapes": {"qkv": (96, 80, 48), "down": (200, 64, 16)},
    "tokens": (1, 20),
    "splits": (1, 2),
    "block_ns": (32,),
    "block_ms": (16, 32),
}


def case(tokens: int, shape: tuple[int, int, int], device: str, dtype: torch.dtype):
    """Inputs of one call: request i of the batch on adapter i % 8 (batch 1: adapter 0)."""
    hidden, out, rank = shape
    gen = torch.Generator().manual_seed(tokens)
    lora_a = (torch.randn(SLOTS, rank, hidden, generator=gen) / hidden**0.5).to(dtype).to(device)
    lora_b = (torch.randn(SLOTS, out, rank, generator=gen) / rank**0.5).to(dtype).to(device)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
    y = torch.randn(tokens, out, generator=gen).to(dtype).to(device)
    slots = (torch.arange(tokens, dtype=torch.int32) % SLOTS).to(device)
    return y, x, lora_a, lora_b, slots


def main() -> None:
    smoke = "--smoke" in sys.argv
    out_path = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter mishandles bf16
    shapes = SMOKE["shapes"] if smoke else SHAPES
    tokens_list = SMOKE["tokens"] if smoke else TOKENS
    splits, block_ns, block_ms = (
        (SMOKE["splits"], SMOKE["block_ns"], SMOKE["block_ms"]) if smoke else (SPLITS, BLOCK_NS, BLOCK_MS)
    )
    chosen = K.lora_config
    results: dict = {"device": torch.cuda.get_device_name() if not smoke else "cpu (interpreter)", "cases": {}}
    if "--one-row" in sys.argv:
        results["one_row"] = one_row(shapes, device, dtype)
        save(results, out_path)
        return
    for tokens in tokens_list:
        step_now = step_best = 0.0
        for name, shape in shapes.items():
            y, x, lora_a, lora_b, slots = case(tokens, shape, device, dtype)
            want = lora_reference(y.clone(), x, lora_a, lora_b, slots).float()
            now = chosen(tokens, shape[2], shape[0], shape[1], dtype)
            grid = (
                {now}
                | {
                    dataclasses.replace(now, split_k=s, block_n=n, sum_in_expand=fused)
                    for s in splits
                    for n in block_ns
                    for fused in ((True, False) if s > 1 else (True,))
                    if s <= -(-shape[0] // now.block_k)  # no range without a K-block
                }
                | {dataclasses.replace(now, block_m=m) for m in block_ms}
            )  # tokens a tile (the grouping's too)
            rows = []
            for cfg in sorted(grid, key=lambda c: (c.block_m, c.split_k, c.block_n, c.sum_in_expand)):
                K.lora_config = lambda *_, cfg=cfg: cfg
                config = {"block_m": cfg.block_m, "split_k": cfg.split_k, "block_n": cfg.block_n}
                config["sum_in_expand"] = cfg.sum_in_expand
                try:
                    cache: dict = {}
                    got = K.lora_delta(y.clone(), x, lora_a, lora_b, slots, cache).float()
                    err = ((got - want).norm() / (want - y.float()).norm()).item()
                    if not err <= 2e-2:
                        raise AssertionError(f"relative error {err:.2e}")
                    scratch = y.clone()
                    us = graph_us(lambda: K.lora_delta(scratch, x, lora_a, lora_b, slots, cache))  # grouping shared
                except OutOfResources as exc:  # a tile of the grid that does not fit the card (never the current one)
                    if cfg == now:
                        raise
                    print(f"{tokens:5d} tokens {name:8s} {config} skipped: {exc}", flush=True)
                    continue
                finally:
                    K.lora_config = chosen
                rows.append({**config, "us": round(us, 2), "current": cfg == now})
            best = min(rows, key=lambda r: r["us"])
            current = next(r for r in rows if r["current"])
            step_now += LAYERS * current["us"]
            step_best += LAYERS * best["us"]
            results["cases"][f"{tokens} tokens, {name}"] = {"configs": rows, "best": best}
            print(f"{tokens:5d} tokens {name:8s} current {current} best {best}", flush=True)
        results[f"step_ms_{tokens}"] = step = {"current": round(step_now / 1e3, 3), "best": round(step_best / 1e3, 3)}
        print(f"{tokens} tokens: LoRA per step {step['current']} ms with the current tiles, {step['best']} ms best")
        save(results, out_path)
        if tokens == 1:
            results["one_row"] = one_row(shapes, device, dtype)
            save(results, out_path)


def one_row(shapes: dict, device: str, dtype: torch.dtype) -> dict:
    """A batch-1 step's adapted projections both ways: the base projection (cuBLAS) then
    ``lora_delta``, against ``lora_gemv`` (shrink, projection and expand in one launch), and the
    base alone as the model runs it without adapters (cuBLAS; gate/up: ``gemv_silu_mul``, against
    ``lora_gemv(silu_mul=True)``), microseconds a call and a step's total (32 layers): the step's
    cost of an adapter is ``lora_gemv`` less ``base``. Each checked against the projection plus
    the reference."""
    from stepserve.kernels.triton.gemv import gemv_silu_mul

    out: dict = {}
    totals = {"base": 0.0, "cublas_then_lora_delta": 0.0, "lora_gemv": 0.0}
    for name, (hidden, width, rank) in shapes.items():
        y, x, lora_a, lora_b, slots = case(1, (hidden, width, rank), device, dtype)
        weight = (torch.randn(width, hidden, generator=torch.Generator().manual_seed(5)) / hidden**0.5).to(dtype)
        weight = weight.to(device)
        projected = x @ weight.T
        want = lora_reference(projected.clone(), x, lora_a, lora_b, slots).float()
        got = K.lora_gemv(x, weight, None, lora_a, lora_b, slots).float()
        err = ((got - want).norm() / (want - projected.float()).norm()).item()
        if not err <= 2e-2:
            raise AssertionError(f"lora_gemv {name}: relative error {err:.2e}")
        cache: dict = {}
        paths = {
            "base": lambda: x @ weight.T,
            "cublas_then_lora_delta": lambda: K.lora_delta(x @ weight.T, x, lora_a, lora_b, slots, cache),
            "lora_gemv": lambda: K.lora_gemv(x, weight, None, lora_a, lora_b, slots),
        }
        if name == "gate_up":  # the gated MLP's one-row path, with and without the adapter
            paths["base"] = lambda: gemv_silu_mul(x, weight)
            paths["lora_gemv"] = lambda: K.lora_gemv(x, weight, None, lora_a, lora_b, slots, silu_mul=True)
        out[name] = {path: round(graph_us(run), 2) for path, run in paths.items()}
        for path in totals:
            totals[path] += LAYERS * out[name][path]
        print(f"    1 row {name:8s} {out[name]}", flush=True)
    out["step_ms"] = {path: round(us / 1e3, 3) for path, us in totals.items()}
    out["adapter_ms_a_step"] = round((totals["lora_gemv"] - totals["base"]) / 1e3, 3)
    print(f"1 row: adapted projections per step {out['step_ms']} ms", flush=True)
    return out


if __name__ == "__main__":
    main()
