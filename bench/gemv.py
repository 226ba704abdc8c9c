"""Few-row projections on the GPU: ``gemv`` and ``gemv_silu_mul`` (stepserve/kernels/triton/gemv.py)
under a grid of tiles against the path each would replace, for the Llama-3.1-8B projections
and the Qwen3-30B-A3B attention projections at 1, 2 and 4 rows:

- bf16 weights: cuBLAS (``x @ w.T``; for gate/up, then ``silu_and_mul``);
- e4m3 weights: ``torch._scaled_mm`` with its activation quantization, and ``gemv`` followed by
  ``silu_and_mul`` for gate/up (today's path up to ``GEMV_MAX_ROWS`` rows).

Every config is first checked against the float64 product of the same weights. Prints GB/s of
weight bytes read (each call timed in a replayed CUDA graph, so launches count as they do in a
decode graph) and, per row count and precision, the microseconds a layer of the 8B spends in its
four projections by each path: the sweep that ``gemv.CONFIGS`` and the layers' choice of path are
taken from. JSON to OUT.json if given. On a GPU, from the repository root:

    PYTHONPATH=. python bench/gemv.py [OUT.json]
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/gemv.py --smoke     # the CPU, tiny shapes
"""

import sys

import torch

from stepserve.bench.kernel_timing import graph_us, save
from stepserve.kernels.triton import fp8 as Q
from stepserve.kernels.triton import fused
from stepserve.kernels.triton import gemv as G

SHAPES = {  # name: (N, K); gate_up's N counts gate and up
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "moe_qkv": (5120, 2048),
    "moe_o": (2048, 4096),
}
LAYER = ("qkv", "o", "gate_up", "down")  # one 8B decoder layer's projections
ROWS = (1, 2, 4)
TILES = [(4, 1024, 4), (8, 256, 4), (8, 512, 4), (8, 1024, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8)]
SMOKE = {"shapes": {"qkv": (96, 80), "gate_up": (64, 48)}, "rows": (1, 3), "tiles": [(8, 32, 4)]}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def paths(x, w, q, scale, gated: bool) -> dict:
    """The ways to compute the projection (or gate/up and its activation) for x."""
    if gated:
        return {
            "bf16_cublas": lambda: fused.silu_and_mul(x @ w.t()),
            "bf16_gemv": lambda: G.gemv_silu_mul(x, w),
            "fp8_scaled_mm": lambda: fused.silu_and_mul(scaled_mm(x, q, scale)),
            "fp8_gemv_then_act": lambda: fused.silu_and_mul(G.gemv(x, q, scale)),
            "fp8_gemv": lambda: G.gemv_silu_mul(x, q, scale),
        }
    return {
        "bf16_cublas": lambda: x @ w.t(),
        "bf16_gemv": lambda: G.gemv(x, w),
        "fp8_scaled_mm": lambda: scaled_mm(x, q, scale),
        "fp8_gemv": lambda: G.gemv(x, q, scale),
    }


def scaled_mm(x, q, scale):
    xq, xs = Q.quantize_rows(x)
    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale, out_dtype=x.dtype, use_fast_accum=True)


def reference(x, w, gated: bool) -> torch.Tensor:
    y = x.double() @ w.double().t()
    if not gated:
        return y
    g, u = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def case(name, n, k, rows, device, dtype, tiles) -> dict:
    gen = torch.Generator().manual_seed(n + k + rows)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
    q, scale = Q.quantize_weight(w)
    scale = scale[None, :].contiguous()
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    gated = name == "gate_up"
    exact = {"bf16": reference(x, w, gated), "fp8": reference(x, q.to(torch.float32) * scale.t(), gated)}
    row = {"paths_us": {}, "tiles_us": {"bf16": {}, "fp8": {}}, "errors": {}}
    on_cpu = device == "cpu"
    for path, fn in paths(x, w, q, scale, gated).items():
        if on_cpu and "scaled_mm" in path:
            continue  # no _scaled_mm on the CPU
        row["errors"][path] = rel_err(fn(), exact[path.split("_")[0]])
        row["paths_us"][path] = round(graph_us(fn, reps=50), 2)
    default = dict(G.CONFIGS[1]), dict(G.CONFIGS[2])
    padded = 1 << max(0, (rows - 1).bit_length())
    for tile in tiles:
        for precision, weight, sc, width in (("bf16", w, None, 2), ("fp8", q, scale, 1)):
            G.CONFIGS[width][padded] = tile
            fn = (lambda: G.gemv_silu_mul(x, weight, sc)) if gated else (lambda: G.gemv(x, weight, sc))
            try:
                err = rel_err(fn(), exact[precision])
                timed = round(graph_us(fn, reps=50), 2) if err < 2e-2 else f"error {err:.3g}"
                row["tiles_us"][precision][str(tile)] = timed
            except Exception as exc:  # a tile that does not compile or fit
                row["tiles_us"][precision][str(tile)] = repr(exc)[:80]
            G.CONFIGS[1].update(default[0])
            G.CONFIGS[2].update(default[1])
    gb = n * k / 1e9
    for precision, bytes_per in (("bf16", 2), ("fp8", 1)):
        good = {t: v for t, v in row["tiles_us"][precision].items() if isinstance(v, float) and v > 0}
        best = min(good, key=good.get) if good else None
        row[f"{precision}_best_tile"] = best
        row[f"{precision}_best_us"] = good.get(best)
        if best and not on_cpu:
            row[f"{precision}_best_gb_s"] = round(bytes_per * gb / (good[best] * 1e-6))
    return row


def layer_summary(layer: dict) -> dict:
    """Microseconds of one 8B layer's projections (gate/up with its activation) by each path:
    fp8 today is ``gemv`` then ``silu_and_mul`` for gate/up; ``*_best_tiles`` take each shape's
    best tile."""

    def total(pick) -> float:
        return round(sum(pick(name, c) for name, c in layer.items()), 1)

    return {
        "bf16_cublas": total(lambda _, c: c["paths_us"]["bf16_cublas"]),
        "bf16_gemv": total(lambda _, c: c["paths_us"]["bf16_gemv"]),
        "bf16_gemv_best_tiles": total(lambda _, c: c["bf16_best_us"] or 0.0),
        "fp8_scaled_mm": total(lambda _, c: c["paths_us"].get("fp8_scaled_mm", 0.0)),
        "fp8_gemv_unfused": total(lambda n, c: c["paths_us"]["fp8_gemv_then_act" if n == "gate_up" else "fp8_gemv"]),
        "fp8_gemv_fused": total(lambda _, c: c["paths_us"]["fp8_gemv"]),
        "fp8_gemv_best_tiles": total(lambda _, c: c["fp8_best_us"] or 0.0),
    }


def main() -> None:
    smoke = "--smoke" in sys.argv
    out_path = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter mishandles bf16
    shapes, rows_list, tiles = (SMOKE["shapes"], SMOKE["rows"], SMOKE["tiles"]) if smoke else (SHAPES, ROWS, TILES)
    results: dict = {"device": "cpu (interpreter)" if smoke else torch.cuda.get_device_name(), "cases": {}}
    for rows in rows_list:
        for name, (n, k) in shapes.items():
            row = case(name, n, k, rows, device, dtype, tiles)
            results["cases"][f"{name}_m{rows}"] = row
            print(
                f"{name} m={rows}: paths {row['paths_us']} best bf16 {row['bf16_best_tile']} "
                f"{row['bf16_best_us']} us, fp8 {row['fp8_best_tile']} {row['fp8_best_us']} us",
                flush=True,
            )
        layer = {p: results["cases"].get(f"{p}_m{rows}") for p in LAYER}
        if all(layer.values()):
            results[f"layer_m{rows}_us"] = summary = layer_summary(layer)
            print(f"8B layer, {rows} rows, us: {summary}", flush=True)
        save(results, out_path)


if __name__ == "__main__":
    main()
