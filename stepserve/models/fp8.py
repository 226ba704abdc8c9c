"""FP8 weights on Hopper (``--quantization fp8``): e4m3 weights with one scale per output
channel, quantized at load from the bf16 checkpoint; activations quantized per token at run
time; the product through ``torch._scaled_mm`` (row-wise scales, bf16 out). Calls of up to
``GEMV_MAX_ROWS`` rows (small decode batches) take ``gemv`` instead: the weights' bytes are
then the whole cost, and cuBLASLt's FP8 kernels, made for large tiles, read them far below the
copy bandwidth (docs/benchmarks.md). It keeps activations in
bf16 (no activation quantization) and reads each weight byte once for all rows.

Every projection of the decoder layers becomes an ``Fp8Linear`` (but one with a dimension that
is no multiple of 16, which ``_scaled_mm`` cannot take: it stays, and the load says so); the
embedding, the norms and the LM head stay in the model dtype (the head sets the logits that
sampling reads, and it is one matrix of 33: as vLLM does, it is left unquantized). A mixture of
experts' stacked weights become e4m3 with per-expert, per-channel scales, read by the fused MoE
kernel; its router stays in the model dtype, as vLLM leaves it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from stepserve.models.moe import SparseMoE
from stepserve.kernels.triton.fp8 import FP8, FP8_MAX, GEMV_MAX_ROWS, quantize_rows, quantize_weight  # noqa: F401 - FP8 and FP8_MAX for the layer's users
from stepserve.kernels.triton.gemv import gemv

log = logging.getLogger("stepserve")


class Fp8Linear(nn.Module):
    """``y = x @ W.T + b`` with W in e4m3 and per-output-channel scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_weight(linear.weight.data)
        self.weight = nn.Parameter(q, requires_grad=False)  # [N, K] e4m3: W.T is column-major, as _scaled_mm wants
        self.register_buffer("weight_scale", scale[None, :].contiguous())  # [1, N] float32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        self.out_dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if 0 < x.shape[0] <= GEMV_MAX_ROWS:
            return gemv(x, self.weight, self.weight_scale, self.bias).view(*lead, self.out_features)
        xq, x_scale = quantize_rows(x)
        y = torch._scaled_mm(
            xq,
            self.weight.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale,
            out_dtype=self.out_dtype,
            use_fast_accum=True,
        )
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


def quantize_experts(moe: SparseMoE) -> None:
    """A mixture's stacked expert weights in e4m3 with one scale per expert and output channel
    (the fused MoE kernel dequantizes them as it reads them)."""
    for name in ("w13", "w2"):
        w = getattr(moe, name)
        experts, rows, cols = w.shape
        q, scale = quantize_weight(w.data.reshape(experts * rows, cols))
        setattr(moe, name, nn.Parameter(q.view(experts, rows, cols), requires_grad=False))
        setattr(moe, f"{name}_scale", scale.view(experts, rows))
        del w


def fp8_shape_ok(linear: nn.Linear) -> bool:
    """``_scaled_mm`` needs both dimensions to be multiples of 16 (every projection of the
    families served has them; a checkpoint with an odd one keeps that projection in bf16)."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def quantize_fp8(model: nn.Module) -> list[str]:
    """Replace the decoder layers' projections with ``Fp8Linear``, one at a time (the bf16
    matrix is freed as soon as its fp8 twin exists). Returns the names of the projections kept
    in the model dtype (see ``fp8_shape_ok``), and logs them."""
    kept = []
    for i, layer in enumerate(model.layers):
        parents = [("self_attn", layer.self_attn), ("mlp", layer.mlp)]
        if isinstance(layer.mlp, SparseMoE):  # the experts as stacked e4m3; the router stays
            quantize_experts(layer.mlp)
            shared = layer.mlp.shared_expert
            parents[1:] = [("mlp.shared_expert", shared)] if shared is not None else []
        for part, parent in parents:
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if not fp8_shape_ok(child):
                    kept.append(f"layers.{i}.{part}.{name}")
                    continue
                setattr(parent, name, Fp8Linear(child))
                del child
    if kept:
        log.warning(
            "fp8: %d projections have a dimension that is no multiple of 16 and stay in %s, e.g. %s",
            len(kept),
            next(model.parameters()).dtype,
            kept[0],
        )
    torch.cuda.empty_cache()
    return kept
