"""Mixture-of-experts layers (Qwen3-MoE, Qwen2-MoE, Mixtral): a router picks ``top_k`` of
``num_experts`` gated MLPs per token and sums their outputs, weighted.

The experts of a layer are two stacked tensors, filled at load from the checkpoint's per-expert
matrices: ``w13`` [E, 2I, H] (each expert's gate rows, then its up rows) and ``w2`` [E, H, I].
The expert computation is one operation behind one interface, ``experts(x, w13, w2, weights,
ids)``: ``experts_reference`` (PyTorch: tokens sorted by expert, one matmul pair per expert in
use) on the CPU, and as the GPU tests' twin; the fused Triton kernel
(``kernels.triton.moe.fused_moe``) on CUDA. With ``--quantization fp8`` the stacked weights are
e4m3 with one scale per expert and output channel (``w13_scale`` [E, 2I], ``w2_scale`` [E, H]).
The router is split the same way: ``route_reference`` on the CPU and as the twin,
``kernels.triton.moe.fused_route`` on CUDA; ``routed_experts`` is the pair, and on CUDA, for a
token or two, one operation (the experts' GEMVs route for themselves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.models.layers import GatedMLP
from stepserve.models.lora import ExpertLoraInputs, lora_reference

if TYPE_CHECKING:
    from stepserve.models.config import DecoderConfig


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int32) of ``router_logits`` [T, E]: the fused
    Triton kernel on CUDA (one launch instead of about five), ``route_reference`` elsewhere."""
    if router_logits.is_cuda:
        from stepserve.kernels.triton.moe import fused_route

        return fused_route(router_logits, top_k, renormalize)
    return route_reference(router_logits, top_k, renormalize)


def route_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int32): softmax over the experts in float32,
    the ``top_k`` largest in descending order, renormalised to sum to 1 when the config says so
    (as transformers)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def experts_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    lora: ExpertLoraInputs | None = None,
) -> torch.Tensor:
    """``sum_k weights[t, k] * expert[ids[t, k]](x[t])`` with ``expert(x) = w2 @ (silu(g) * u)``,
    ``[g; u] = w13 @ x``: token copies sorted by expert, one matmul pair per expert in use, each
    expert's output rounded to ``x``'s dtype, weighted in float32 and summed. FP8 weights
    (``w13_scale``/``w2_scale`` given) are dequantized per expert as they are used; adapters
    (``lora``) add their deltas to ``[g; u]`` and to the expert's output."""
    tokens, top_k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    src = order // top_k  # the token of each sorted copy
    out = torch.zeros(tokens * top_k, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start : start + count]
        xe = x.index_select(0, src[start : start + count])
        gate_up = F.linear(xe, _dequantized(w13[expert], w13_scale, expert, x.dtype))
        pairs = lora.pairs(src[start : start + count], expert, w13.shape[0]) if lora is not None else None
        if pairs is not None:
            gate_up = lora_reference(gate_up, xe, lora.a13, lora.b13, pairs)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        y = F.linear(act, _dequantized(w2[expert], w2_scale, expert, x.dtype))
        if pairs is not None:
            y = lora_reference(y, act, lora.a2, lora.b2, pairs)
        out.index_copy_(0, rows, y.float())
        start += count
    out = out.view(tokens, top_k, -1) * weights.float().unsqueeze(-1)
    return out.sum(dim=1).to(x.dtype)


def _dequantized(w: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return w
    return (w.to(torch.float32) * scale[expert].unsqueeze(-1)).to(dtype)


def experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    lora: ExpertLoraInputs | None = None,
) -> torch.Tensor:
    """The expert computation: the fused Triton kernel on CUDA, the reference elsewhere."""
    if x.is_cuda:
        from stepserve.kernels.triton.moe import fused_moe

        return fused_moe(x, w13, w2, weights, ids, w13_scale=w13_scale, w2_scale=w2_scale, lora=lora)
    return experts_reference(x, w13, w2, weights, ids, w13_scale, w2_scale, lora)


def routed_experts(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    lora: ExpertLoraInputs | None = None,
) -> torch.Tensor:
    """``experts(x, ..., *route(router_logits, top_k, renormalize))``: on CUDA
    ``kernels.triton.moe.routed_moe`` (for a decode step of a token or two, the experts' GEMVs
    route for themselves: no launch of its own), the references elsewhere."""
    if x.is_cuda:
        from stepserve.kernels.triton.moe import routed_moe

        return routed_moe(
            x, router_logits, top_k, renormalize, w13, w2, w13_scale=w13_scale, w2_scale=w2_scale, lora=lora
        )
    weights, ids = route_reference(router_logits, top_k, renormalize)
    return experts_reference(x, w13, w2, weights, ids, w13_scale, w2_scale, lora)


class SparseMoE(nn.Module):
    """The MoE block that stands in a decoder layer for the dense MLP: router, experts and (for
    Qwen2-MoE) a shared expert scaled by its own sigmoid gate."""

    ROUTERS = ("gate", "shared_expert_gate")  # linears that stay in the model dtype (cpu_linear.pack_linears)

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        moe = cfg.moe
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)
        inner = moe.intermediate_size
        self.w13 = nn.Parameter(torch.empty(moe.num_experts, 2 * inner, cfg.hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(moe.num_experts, cfg.hidden_size, inner), requires_grad=False)
        self.register_buffer("w13_scale", None)  # [E, 2I] float32, set by fp8 quantization
        self.register_buffer("w2_scale", None)  # [E, H]
        self.shared_expert = None
        self.shared_expert_gate = None
        if moe.shared_intermediate_size:
            self.shared_expert = GatedMLP(cfg, intermediate_size=moe.shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.all_reduce = None  # set under tensor parallelism: sums the ranks' partial outputs
        self.expert_lora = None  # set by models.lora.attach_lora: adapters of the stacked experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.expert_lora.inputs() if self.expert_lora is not None else None
        routing = (self.gate(x), self.top_k, self.renormalize)
        out = routed_experts(x, *routing, self.w13, self.w2, self.w13_scale, self.w2_scale, lora)
        if self.shared_expert is not None:
            shared = self.shared_expert(x) * torch.sigmoid(self.shared_expert_gate(x))
            out = out + shared
        return out
