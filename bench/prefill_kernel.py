"""Times the varlen paged prefill kernel with a program per GQA group against its one-head twin
on the GPU benchmark's attention shapes: 16 whole 512-token prompts (as the 8B run's
8,192-token chunks) and 16 64-token chunks over a 448-token cached prefix. Prints ms per layer
call for each program, the speedup and the largest difference between their outputs (they
should agree); ``GROUPED_MAX_QUERY_LEN`` in ``stepserve/attention/triton_kernels.py`` is chosen
from it. JSON to OUT.json if given. Run on a GPU from the repository root:

    PYTHONPATH=.:tests python bench/prefill_kernel.py [OUT.json]
"""

import json
import sys

import torch

from attention_batches import make_batch
from stepserve.kernels.triton import attention as K

SHAPES = {"llama-8b": (32, 8, 128), "qwen3-8b": (32, 8, 128), "gemma3-12b": (16, 8, 256), "llama-1b": (32, 8, 64)}


def time_ms(fn, reps=50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    results = {}
    for name, (heads, kv_heads, head_dim) in SHAPES.items():
        if name == "qwen3-8b":
            continue  # the same attention shape as Llama-8B
        for q_len, ctx in ((512, 0), (64, 448)):  # whole prompts; a late chunk over a cached prefix
            q, k, v, cache, meta = make_batch(
                [q_len] * 16, [ctx] * 16, heads, kv_heads, head_dim, 16, torch.bfloat16, "cuda", 0
            )
            K.write_kv(k, v, cache, meta.slot_mapping)
            outs, row = {}, {}
            for grouped in (True, False):
                out = torch.empty_like(q)
                outs[grouped] = out

                def run(out=out, grouped=grouped):
                    K.paged_prefill(
                        q,
                        cache,
                        out,
                        meta.query_start_loc,
                        meta.seq_lens,
                        meta.block_tables,
                        head_dim**-0.5,
                        rows=meta.prefill_rows,
                        max_query_len=meta.max_query_len,
                        grouped=grouped,
                    )

                row["grouped_ms" if grouped else "one_head_ms"] = round(time_ms(run), 4)
            row["max_abs_diff"] = float((outs[True].float() - outs[False].float()).abs().max())
            row["speedup"] = round(row["one_head_ms"] / row["grouped_ms"], 3)
            results[f"{name} 16x{q_len} ctx {ctx}"] = row
            print(name, q_len, ctx, row, flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
