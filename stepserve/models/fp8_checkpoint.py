"""FP8 checkpoints, in the two formats vLLM reads: ``compressed-tensors`` (llm-compressor's
``float-quantized``, e4m3 weights with ``weight_scale`` per tensor, per output channel or per
block) and ``fp8`` (AutoFP8's per-tensor ``weight_scale``, and the block-wise
``weight_scale_inv`` of DeepSeek's and Qwen's FP8 releases, ``weight_block_size``).

The weights are dequantized as they stream in, ``w = q * scale`` with the scale broadcast over
its tensor, channel or block, in float32 on the load device, then rounded to the model dtype; the
engine then runs them as it runs any checkpoint, and with ``--quantization fp8`` (the default for
such a checkpoint on an FP8 GPU) quantizes them again to e4m3 with per-channel scales. That gives
a per-channel checkpoint back its own codes (both scales are the channel's largest magnitude over
448) except where the model dtype's rounding moves a weight across half a code step; a per-tensor
or per-block checkpoint's weights are then held to finer scales than their own.

What is not read: static activation scales (``input_scale``: activations are quantized per token
at run time, as vLLM's dynamic scheme does) and KV cache scales (``k_scale``, ``v_scale``); both
are dropped with a warning. Anything else in ``quantization_config`` is refused by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from stepserve.config import ConfigError
from stepserve.models.config import DROPPED_SUFFIXES, Fp8Format

log = logging.getLogger("stepserve")


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """``q * scale`` in float32, the scale per tensor ([] or [1]), per output channel ([N] or
    [N, 1]) or per block ([ceil(N / rows), ceil(K / cols)])."""
    w = q.to(torch.float32)
    scale = scale.to(device=w.device, dtype=torch.float32)
    if block is not None and scale.dim() == 2 and scale.numel() > 1:
        rows, cols = block
        expanded = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[: w.shape[0], : w.shape[1]]
        if expanded.shape != w.shape:
            raise ConfigError(
                f"a block scale of shape {tuple(scale.shape)} does not cover a weight of shape {tuple(w.shape)}"
            )
        return w * expanded
    if scale.numel() == 1:
        return w * scale.reshape(())
    if scale.numel() == w.shape[0]:
        return w * scale.reshape(-1, 1)
    raise ConfigError(f"a scale of shape {tuple(scale.shape)} does not fit a weight of shape {tuple(w.shape)}")


def dequantized_weights(
    weights: Iterator[tuple[str, torch.Tensor]],
    fmt: Fp8Format,
    dtype: torch.dtype,
    device: torch.device,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's stream with every FP8 weight dequantized (paired with its scale in
    whichever order they come) and the scales dropped; other tensors pass as they are."""
    pending_weights: dict[str, torch.Tensor] = {}
    pending_scales: dict[str, torch.Tensor] = {}
    dropped: set[str] = set()
    suffix = "." + fmt.scale_suffix
    for name, tensor in weights:
        if name.endswith(DROPPED_SUFFIXES):
            dropped.add(name.rsplit(".", 1)[1])
            continue
        if name.endswith(suffix):
            prefix = name[: -len(suffix)]
            if prefix in pending_weights:
                yield (
                    f"{prefix}.weight",
                    dequantize(pending_weights.pop(prefix).to(device), tensor, fmt.block).to(dtype),
                )
            else:
                pending_scales[prefix] = tensor
        elif name.endswith(".weight") and tensor.dtype == torch.float8_e4m3fn:
            prefix = name[: -len(".weight")]
            if prefix in pending_scales:
                yield name, dequantize(tensor.to(device), pending_scales.pop(prefix), fmt.block).to(dtype)
            else:
                pending_weights[prefix] = tensor
        elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ConfigError(
                f"checkpoint tensor {name} is {tensor.dtype}, and only e4m3 '.weight' tensors with a scale are read"
            )
        else:
            yield name, tensor
    if pending_weights or pending_scales:
        lone = sorted(pending_weights)[:3] + sorted(pending_scales)[:3]
        raise ConfigError(f"FP8 weights and their {fmt.scale_suffix} tensors do not pair up, e.g. {lone}")
    if dropped:
        log.warning(
            "FP8 checkpoint: %s tensors are not read (activations are "
            "quantized per token at run time; KV cache scales are 1.0)",
            ", ".join(sorted(dropped)),
        )
