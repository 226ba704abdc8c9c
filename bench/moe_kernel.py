"""The fused MoE layer's tiles on the GPU: ``fused_moe`` (grouping, gate/up, down, the weighted
sum) for one Qwen3-30B-A3B layer (128 experts, 8 a token, hidden 2048, expert width 768), bf16
and FP8 weights, at the decode batch sizes where a token's experts are read for few rows, under
the tiles ``moe_config`` picks and a grid around them (``block_n``, ``block_k``, ``num_warps``).
Prints microseconds a call against the time the distinct experts' bytes take at the measured copy
bandwidth: the sweep to choose ``moe_config``'s decode tiers from. Up to 4 tokens it also times the
GEMV path (``_experts_gemv``, taken up to ``GEMV_MAX_TOKENS`` tokens) against the grouped one's
current tiles, to choose that bound from. Every timed config is first checked against
``experts_reference``. JSON to OUT.json if given. On a GPU, from the repository
root:

    PYTHONPATH=. python bench/moe_kernel.py [OUT.json]
    PYTHONPATH=. python bench/moe_kernel.py --gemv [OUT.json]    # 1 and 2 tokens, the GEMVs' tiles only
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/moe_kernel.py --smoke    # the CPU, tiny shapes
"""

import dataclasses
import sys

import torch
from triton.runtime.errors import OutOfResources

from stepserve.bench.gpu import copy_bandwidth
from stepserve.bench.kernel_timing import graph_us, save
from stepserve.kernels.triton import moe as K
from stepserve.models.moe import experts_reference, route_reference

FULL = {"experts": 128, "top_k": 8, "hidden": 2048, "inner": 768, "tokens": (1, 2, 4, 16, 64, 256)}
SMOKE = {"experts": 8, "top_k": 2, "hidden": 64, "inner": 48, "tokens": (1, 2, 5)}
GEMV_UP_TO = 4  # tokens up to which the GEMV path is timed too
BLOCK_NS, BLOCK_KS, WARPS = (32, 64, 128), (64, 128, 256), (4, 8)
# The GEMVs' (BLOCK_N, BLOCK_K) grid, each kernel's tile varied with the other's held as it is
GEMV_GRID = ((2, 1024), (4, 256), (4, 512), (4, 1024), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512))


def fp8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weights with one scale per expert and output channel, as ``--quantization fp8``."""
    scale = w.float().abs().amax(dim=-1).clamp(min=1e-12) / torch.finfo(K.FP8).max
    return (w.float() / scale.unsqueeze(-1)).to(K.FP8), scale


def main() -> None:
    smoke = "--smoke" in sys.argv
    out_path = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    shape = SMOKE if smoke else FULL
    gemv_only = "--gemv" in sys.argv  # the grouped path at its current tiles only, at 1 and 2 tokens
    if gemv_only:
        shape = {**shape, "tokens": (1, 2)}
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)  # interpreter: no bf16
    experts, top_k, hidden, inner = shape["experts"], shape["top_k"], shape["hidden"], shape["inner"]
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(experts, 2 * inner, hidden, generator=gen) / hidden**0.5).to(dtype).to(device)
    w2 = (torch.randn(experts, hidden, inner, generator=gen) / inner**0.5).to(dtype).to(device)
    bandwidth = 0.0 if smoke else copy_bandwidth()
    chosen, gemv_max = K.moe_config, K.GEMV_MAX_TOKENS
    K.GEMV_MAX_TOKENS = 0  # the sweep's grid is the grouped path's; the GEMVs are timed apart below
    results: dict = {"device": "cpu (interpreter)" if smoke else torch.cuda.get_device_name(), "copy_tb_s": bandwidth}
    precisions = {"bf16": (w13, w2, None, None)}
    if not smoke:
        (w13_q, s13), (w2_q, s2) = fp8_weights(w13), fp8_weights(w2)
        precisions["fp8"] = (w13_q, w2_q, s13, s2)
    for precision, (a, b, sa, sb) in precisions.items():
        for tokens in shape["tokens"]:
            x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
            logits = torch.randn(tokens, experts, generator=gen).to(dtype).to(device)
            weights, ids = route_reference(logits, top_k, True)
            want = experts_reference(x, a, b, weights, ids, sa, sb).float()
            used = ids.unique().numel()
            bytes_read = used * (a[0].numel() * a.element_size() + b[0].numel() * b.element_size())
            bound_us = bytes_read / (bandwidth * 1e12) * 1e6 if bandwidth else 0.0
            now = chosen(tokens, top_k, experts, hidden, inner, dtype)
            fit = max(16, 1 << (min(hidden, inner) - 1).bit_length())  # moe_config's bound on the tiles
            grid = {now} | {
                dataclasses.replace(now, block_n=n, block_k=k, num_warps=w)
                for n in BLOCK_NS
                for k in BLOCK_KS
                for w in WARPS
                if n <= fit and k <= fit and not gemv_only
            }
            rows = []
            for cfg in sorted(grid, key=lambda c: (c.block_n, c.block_k, c.num_warps)):
                K.moe_config = lambda *_, cfg=cfg: cfg
                config = {"block_n": cfg.block_n, "block_k": cfg.block_k, "num_warps": cfg.num_warps}
                try:
                    got = K.fused_moe(x, a, b, weights, ids, w13_scale=sa, w2_scale=sb).float()
                    err = ((got - want).norm() / want.norm()).item()
                    if not err <= 2e-2:
                        raise AssertionError(f"{cfg}: relative error {err:.2e}")
                    us = graph_us(lambda: K.fused_moe(x, a, b, weights, ids, w13_scale=sa, w2_scale=sb))
                except OutOfResources as exc:  # a tile of the grid that does not fit the card (never the current one)
                    if cfg == now:
                        raise
                    print(f"{precision} {tokens} tokens {config} skipped: {exc}", flush=True)
                    continue
                finally:
                    K.moe_config = chosen
                rows.append({**config, "us": round(us, 2), "current": cfg == now})
            best = min(rows, key=lambda r: r["us"])
            current = next(r for r in rows if r["current"])
            results[f"{precision} {tokens} tokens"] = case = {
                "experts_used": used,
                "bound_us": round(bound_us, 2),
                "current": current,
                "best": best,
                "configs": rows,
            }
            gemv = ""
            if tokens <= GEMV_UP_TO:
                got = K._experts_gemv(x, a, b, weights, ids, sa, sb).float()
                err = ((got - want).norm() / want.norm()).item()
                if not err <= 2e-2:
                    raise AssertionError(f"the GEMV path: relative error {err:.2e}")
                case["gemv_us"] = round(graph_us(lambda: K._experts_gemv(x, a, b, weights, ids, sa, sb)), 2)
                routing = (logits, top_k, True)
                routed = lambda: K._experts_gemv(x, a, b, None, None, sa, sb, routing=routing)  # noqa: E731
                case["routed_gemv_us"] = round(graph_us(routed), 2)  # fused_route's launch saved
                grouped = lambda: K.fused_moe(x, a, b, *K.fused_route(logits, top_k, True), w13_scale=sa, w2_scale=sb)  # noqa: E731
                case["route_then_grouped_us"] = round(graph_us(grouped), 2)
                case["gemv_taken"] = tokens <= gemv_max
                case["gemv_tiles"] = gemv_tiles(x, a, b, sa, sb, routing, want)
                taken = "taken" if case["gemv_taken"] else "not taken"
                gemv = (
                    f" gemv path {case['gemv_us']} us, routing in it {case['routed_gemv_us']} us against "
                    f"route then grouped {case['route_then_grouped_us']} us ({taken})"
                )
            print(
                f"{precision} {tokens:4d} tokens ({used} experts, bound {bound_us:.1f} us): "
                f"current {current} best {best}{gemv}",
                flush=True,
            )
            save(results, out_path)


def gemv_tiles(x, a, b, sa, sb, routing, want) -> dict:
    """The routed GEMVs' microseconds under ``GEMV_GRID``: gate/up's tile varied with down's as
    it is, then down's with gate/up's as it is (their times add, so the best of each is the best
    pair). Each checked against the reference first."""
    key = 1 if a.element_size() == 1 else 2
    tiles = K.GEMV_TILES[key]
    out: dict = {"current": {kernel: list(tile) for kernel, tile in tiles.items()}}
    for kernel in ("gate_up", "down"):
        rows = []
        for tile in GEMV_GRID:
            K.GEMV_TILES[key] = {**tiles, kernel: tile}
            try:
                got = K._experts_gemv(x, a, b, None, None, sa, sb, routing=routing).float()
                err = ((got - want).norm() / want.norm()).item()
                if not err <= 2e-2:
                    raise AssertionError(f"GEMV {kernel} {tile}: relative error {err:.2e}")
                us = graph_us(lambda: K._experts_gemv(x, a, b, None, None, sa, sb, routing=routing))
            except OutOfResources:
                continue
            finally:
                K.GEMV_TILES[key] = tiles
            rows.append({"block_n": tile[0], "block_k": tile[1], "us": round(us, 2), "current": tile == tiles[kernel]})
        out[kernel] = {"best": min(rows, key=lambda r: r["us"]), "tiles": rows}
        print(f"    GEMV {kernel}: best {out[kernel]['best']} (current {list(tiles[kernel])})", flush=True)
    return out


if __name__ == "__main__":
    main()
