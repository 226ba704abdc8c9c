"""Every hand-written kernel, one folder per device kind: ``triton/`` for NVIDIA GPUs (paged
attention, the fused norm/rotary/activation ops, FP8 quantization and the few-row FP8 GEMV, the
sort-free sampler) and ``cpu/`` (block-quantized matmuls and the one-call decode step in C,
compiled once per machine). Each has a slow, obviously correct PyTorch twin in the layer that
calls it, and is tested against it."""

NOISE_BITS = 23  # uniform bits per sampling draw: (v + 0.5) / 2**23 is exact in float32, strictly inside (0, 1)
