"""What computes: the model runner (inputs, multi-step, KV cache) and the sampler. Torch, no asyncio."""
