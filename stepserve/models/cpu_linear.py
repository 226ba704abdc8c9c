"""CPU matmuls for the model's linear layers, chosen once after the weights are loaded.

Decode on a CPU is bound by the bytes of weights read per step, and at small sizes by the
per-call work of the kernel. Two kernels, both PyTorch's own:

- oneDNN with the weight reordered once into its blocked layout (``_reorder_linear_weight``):
  ``F.linear`` in bfloat16 re-lays the weight out on every call; prepacked, the embedded model's
  bf16 projections take about two thirds of the time (docs/benchmarks.md). oneDNN prepacks 16-bit
  weights only on a CPU with 16-bit instructions (``onednn_prepacks``); on an AVX2-only CPU a
  bf16/fp16 layer keeps its weight for ``F.linear``. float32 projections (int4 on a CPU without
  native bfloat16) keep theirs too: ``F.linear`` runs them as fast as the prepacked kernel at 1 to
  128 rows on the embedded model's shapes, with no kernel to make per row count (the warm-up
  below took 6.7 s there). A float32 head (49,152 outputs) is prepacked where the native kernels
  do not run it: 8.7 against 12.5 ms a row (2-core AVX2).
- weight-only int4 (``--quantization int4``): groups of ``GROUP`` weights along the input
  dimension share a scale and a zero, the layout of GGUF's Q4_1 blocks, so those round-trip
  exactly (see ``quantize_int4``). A decode row reads a quarter of the bf16 bytes. PyTorch's
  CPU int4 kernel beats oneDNN's bf16 one only for a few rows, so above ``INT4_MAX_ROWS`` rows
  a bf16 copy of the *same* dequantized weights runs: both paths compute with one set of
  weight values.
- with ``native`` (stepserve's own kernels built, ``cpu_native``), the GGUF's Q4_1 blocks are
  also kept exactly as ``q4``, for the one-call decode step ``ss_decode``, which multiplies them
  with 8-bit activations. These layers' own calls (prefill chunks, mixed passes, families the
  one-call step does not cover) keep bf16 activations: 8-bit activations moved the embedded
  model's first-token logits enough to flip its greedy answer to "What is the capital of
  France?" (docs/benchmarks.md), and the first token sets an answer's course.

oneDNN builds and caches a kernel for every row count it is called with (PyTorch keeps one
too), about half a MiB each for the embedded model's projections, and a server sees every row
count up to ``max_num_batched_tokens``: the engine core's memory grew with each new pass size
until the caches filled (1024 kernels), then fragmented as they evicted. Rows are therefore
padded to one of a few sizes (``onednn_rows``: at most 1/8 more rows, eight sizes per octave),
so the caches hold a bounded set, and ``warm_up`` fills them at start-up, so that no request
pays for a kernel's creation and the caches do not grow under load. Making them leaves most of
the memory it touched free but held by malloc (on the embedded model 410 MiB more RSS, 327 MiB of
it handed back by ``malloc_trim``), so the warm-up ends with ``release_free_memory``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch
from torch import nn

GROUP = 32  # weights per int4 scale/zero pair: GGUF's Q4_0/Q4_1 block size
INT4_MAX_ROWS = 4  # rows up to which the int4 kernel beats oneDNN bf16 (2-core AVX512-BF16, docs/benchmarks.md)


def onednn_rows(rows: int) -> int:
    """The row count a oneDNN call of ``rows`` rows is padded to: exact below 16, else rounded
    up to a multiple of 1/16 of the octave's power of two (at most 1/8 more rows)."""
    step = 1 << max(rows.bit_length() - 4, 0)
    return -(-rows // step) * step


def int4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit blocks of ``weight`` [N, K], ``GROUP`` weights each along K: codes [N, K]
    (float, 0..15), scale and min [N, K/GROUP] with ``w = scale * code + min``. A group's scale is
    (max - min) / 15 and its min maps to code 0: a GGUF Q4_1 block (``w = d * q + m``, with q = 0
    and 15 reached by its min and max) comes back as its own codes, scale d and min m."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    codes = torch.round((groups - low[..., None]) / safe[..., None]).clamp_(0, 15)
    return codes.reshape(n, k), scale, low


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``int4_blocks`` in PyTorch's int4 convention: (codes [N, K] int32 in 0..15,
    scales_and_zeros [K/GROUP, N, 2], dequantized [N, K]), where ``w = (code - 8) * scale + zero``."""
    n, k = weight.shape
    codes, scale, low = int4_blocks(weight)
    zero = low + 8 * scale
    dequantized = ((codes.reshape(n, k // GROUP, GROUP) - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()
    return codes.to(torch.int32), scales_and_zeros, dequantized


class CpuLinear(nn.Module):
    """A linear layer on prepacked oneDNN weights, with an int4 twin for calls of at most
    ``INT4_MAX_ROWS`` rows when ``int4``, and with ``native`` the exact Q4_1 blocks (``q4``) that
    ``ss_decode`` reads.

    The packed tensors are plain attributes, not parameters or buffers: ``Module.to`` must not
    cast them and the state dict does not hold them.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        int4: bool,
        native: bool = False,
        prepack: bool = True,
    ) -> None:
        super().__init__()
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.int4 = self.scales_and_zeros = self.q4 = None
        weight = weight.detach()
        self.in_features = weight.shape[1]
        if int4 and native:
            from stepserve.kernels.cpu.native import BlockWeight

            self.q4 = BlockWeight.q4_1(*int4_blocks(weight))
        if int4:
            codes, scales_and_zeros, weight = quantize_int4(weight)
            self.int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            self.scales_and_zeros = scales_and_zeros.to(dtype)
        # oneDNN prepacks 16-bit weights only where the CPU has 16-bit instructions (AVX512 or
        # AVX-NE-CONVERT); elsewhere (an AVX2 laptop) the weight stays as it is, for F.linear.
        self.prepacked = prepack and onednn_prepacks(dtype)
        weight = weight.to(dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16) if self.prepacked else weight.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.int4 is None or rows > INT4_MAX_ROWS:
            if not self.prepacked:
                return torch.nn.functional.linear(x, self.packed, self.bias)
            padded = onednn_rows(rows)  # a bounded set of shapes: see the module's docstring
            if padded != rows:
                x = torch.nn.functional.pad(x, (0, 0, 0, padded - rows))
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")[:rows]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.int4, GROUP, self.scales_and_zeros)
        return out if self.bias is None else out + self.bias


@torch.inference_mode()
def warm_up(model: nn.Module, max_rows: int) -> int:
    """Call each distinct projection shape once with every padded row count up to ``max_rows``
    (a pass's token budget) that reaches oneDNN, so that its kernels (and PyTorch's) are made now;
    returns the calls made. A kernel's cache key is the shapes, not the weights: one layer per
    shape is enough."""
    layers: dict[tuple, CpuLinear] = {}
    for module in model.modules():
        if isinstance(module, CpuLinear):
            key = (tuple(module.packed.shape), module.packed.dtype, module.bias is not None, module.int4 is None)
            layers.setdefault(key, module)
    calls = 0
    for layer in layers.values():
        if not layer.prepacked:  # F.linear: no per-shape kernel to make
            continue
        first = 1 if layer.int4 is None else INT4_MAX_ROWS + 1
        sizes = sorted({onednn_rows(rows) for rows in range(first, max_rows + 1)})
        if not sizes:
            continue
        x = torch.zeros(sizes[-1], layer.in_features, dtype=layer.packed.dtype)
        for rows in sizes:
            layer(x[:rows])
            calls += 1
    return calls


def release_free_memory() -> None:
    """Hand the memory malloc holds free back to the system (glibc's ``malloc_trim``; a no-op
    elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def onednn_prepacks(dtype: torch.dtype) -> bool:
    """Whether oneDNN can prepack weights of ``dtype`` on this CPU: float32 everywhere, bfloat16
    and float16 only with the instructions its 16-bit kernels need."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX512-BF16 or AMX): int4 in bfloat16 needs it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(model: nn.Module, dtype: torch.dtype, int4: bool, native: bool = False) -> None:
    """Replace every ``nn.Linear`` in ``model`` by a ``CpuLinear`` (in place). A module's
    ``ROUTERS`` (a mixture's router and shared-expert gate) are never int4: their few outputs
    pick the experts. Nor is a projection whose shape int4 packing cannot take (outputs in
    sixteens, inputs in whole groups): it stays in ``dtype``. float32 projections are not
    prepacked (the module's docstring says why)."""
    prepack = dtype != torch.float32
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                fits = child.out_features % 16 == 0 and child.in_features % GROUP == 0
                quantized = int4 and fits and name not in getattr(parent, "ROUTERS", ())
                layer = CpuLinear(child.weight, child.bias, dtype, quantized, native and quantized, prepack)
                setattr(parent, name, layer)
