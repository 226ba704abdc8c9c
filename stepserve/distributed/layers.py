"""The one collective inside the model: row-parallel projections sum their partial products."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class AllReduced(nn.Module):
    """A row-parallel projection (o_proj, down_proj): this rank's slice of the input times its
    slice of the weight, summed over the ranks. Wraps whatever the loader left there (``nn.Linear``,
    ``CpuLinear``, ``Fp8Linear``), so packing and quantization need not know about ranks."""

    def __init__(self, inner: nn.Module, group) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x).contiguous()  # gloo and NCCL reduce dense buffers
        dist.all_reduce(out, group=self.group)
        return out


def join_ranks(model: nn.Module, group) -> None:
    """Make every decoder layer's o_proj and down_proj (a mixture of experts: its whole output)
    sum over the group (in place)."""
    if getattr(model, "native", None) is not None:
        model.native = None  # the one-call native CPU decode step (cpu_native) has no all-reduce
    for layer in model.layers:
        layer.self_attn.o_proj = AllReduced(layer.self_attn.o_proj, group)
        if hasattr(layer.mlp, "down_proj"):
            layer.mlp.down_proj = AllReduced(layer.mlp.down_proj, group)
        else:  # a mixture of experts: every expert's (and the shared expert's) down is row-parallel
            layer.mlp = AllReduced(layer.mlp, group)
