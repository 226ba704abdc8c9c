"""Few-row FP8 projections on the GPU: ``fp8_gemv`` under several tile configs against the
``torch._scaled_mm`` path (with its activation quantization) and bf16 ``torch.matmul``, for the
Llama-3.1-8B projections at 1 and 2 rows (from 4 rows on ``_scaled_mm`` is the faster path, see
``GEMV_MAX_ROWS``). Prints GB/s of weight bytes read for each, and the best tile per shape: the
sweep that ``GEMV_CONFIGS`` in ``stepserve/models/fp8.py`` is chosen from. JSON to OUT.json if
given. Run on a GPU from the repository root:

    PYTHONPATH=. python bench/fp8_gemv.py [OUT.json]
"""

import json
import sys

import torch

from stepserve.bench.kernel_timing import graph_us
from stepserve.models import fp8 as F

ROWS = (1, 2)
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
CANDIDATES = [
    (4, 1024, 4),
    (4, 2048, 4),
    (4, 4096, 4),
    (8, 512, 4),
    (8, 1024, 4),
    (8, 1024, 8),
    (8, 2048, 4),
    (8, 2048, 8),
    (16, 1024, 8),
    (16, 2048, 8),
]


def seconds(fn) -> float:
    return graph_us(fn, reps=50) * 1e-6


def main() -> None:
    results = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q, scale = F.quantize_weight(w)
        scale = scale[None, :].contiguous()
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            gb = n * k / 1e9

            def scaled_mm():
                xq, xs = F.quantize_rows(x)
                return torch._scaled_mm(
                    xq, q.t(), scale_a=xs, scale_b=scale, out_dtype=torch.bfloat16, use_fast_accum=True
                )

            row = {
                "scaled_mm_gb_s": gb / seconds(scaled_mm),
                "bf16_gb_s": 2 * gb / seconds(lambda: x @ w.t()),
                "configs": {},
            }
            default = F.GEMV_CONFIGS[rows]
            for cfg in CANDIDATES:
                if not 2048 <= rows * cfg[0] * cfg[1] <= 32768:
                    continue
                F.GEMV_CONFIGS[rows] = cfg
                try:
                    row["configs"][str(cfg)] = round(gb / seconds(lambda: F.fp8_gemv(x, q, scale)), 1)
                except Exception as exc:  # a config that does not compile or fit
                    row["configs"][str(cfg)] = repr(exc)[:80]
            F.GEMV_CONFIGS[rows] = default
            row["default_gb_s"] = round(gb / seconds(lambda: F.fp8_gemv(x, q, scale)), 1)
            good = {c: v for c, v in row["configs"].items() if isinstance(v, float)}
            row["best"] = max(good, key=good.get) if good else None
            row["best_gb_s"] = good.get(row["best"]) if good else None
            results[f"{name}_m{rows}"] = row
            print(
                f"{name} m={rows}: scaled_mm {row['scaled_mm_gb_s']:.0f} GB/s, bf16 {row['bf16_gb_s']:.0f}, "
                f"gemv default {row['default_gb_s']}, best {row['best']} {row['best_gb_s']}",
                flush=True,
            )
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
