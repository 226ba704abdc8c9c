"""``kv_cache_dtype="fp8"`` through the engine on the CPU reference path (float32 activations,
e4m3 pages): prompt logprobs read back from FP8 pages of earlier chunks stay within stated
bounds of the float32 cache, with unit and with power-of-two per-tensor scales, and the same
memory holds four times the blocks. The Triton kernels' FP8 reads are tested on the GPU
(tests/gpu/test_triton_attention.py)."""

import statistics

import pytest
import torch

from stepserve import LLM, SamplingParams

PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(20 + 17 * i)] for i in range(6)]
# Measured on the tiny model (initializer_range 0.2: peaked attention, more sensitive than real
# models): mean 0.14, largest 1.19 against a logprob spread (std) of 1.65.
MEAN_BOUND, MAX_BOUND = 0.3, 2.5


def prompt_logprobs(model_dir, kv_scale=None, **options):
    llm = LLM(
        model=str(model_dir),
        max_model_len=256,
        max_num_batched_tokens=16,
        block_size=4,
        cpu_kv_cache_gib=0.005,
        **options,
    )
    if kv_scale is not None:
        for layer in llm.core.worker.model.layers:
            layer.self_attn.kv_scale = kv_scale
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    return llm, [t.logprob for o in out for t in o.prompt_logprobs[1:]]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return prompt_logprobs(tiny_llama)


@pytest.mark.parametrize("kv_scale", [None, (0.25, 4.0)], ids=["scale 1", "scales 1/4 and 4"])
def test_fp8_cache_logprobs_within_bounds(tiny_llama, reference, kv_scale):
    ref_llm, want = reference
    llm, got = prompt_logprobs(tiny_llama, kv_scale, kv_cache_dtype="fp8")
    assert llm.core.worker.kv_caches[0].dtype == torch.float8_e4m3fn
    assert (
        abs(llm.info.num_kv_blocks - 4 * ref_llm.info.num_kv_blocks) <= 4
    )  # float32 pages on the CPU otherwise (rounded down)
    errors = [abs(a - b) for a, b in zip(got, want)]
    assert len(errors) == len(want) > 300
    assert statistics.mean(errors) < MEAN_BOUND and max(errors) < MAX_BOUND
    assert max(errors) > 0  # the pages really are quantized


def test_fp8_cache_ignoring_the_scale_would_fail(tiny_llama, reference, monkeypatch):
    """The bounds above catch a backend that forgot a scale: read pages without it."""
    from stepserve.attention import sdpa

    real = sdpa._gather
    monkeypatch.setattr(sdpa, "_gather", lambda cache, tables, dtype, kv_scale: real(cache, tables, dtype, (1.0, 1.0)))
    _, want = reference
    _, got = prompt_logprobs(tiny_llama, (0.25, 4.0), kv_cache_dtype="fp8")
    errors = [abs(a - b) for a, b in zip(got, want)]
    assert statistics.mean(errors) > MEAN_BOUND
