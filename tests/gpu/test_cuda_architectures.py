"""Every family on the CUDA path (Triton kernels, CUDA graphs, fused ops) against the CPU
reference path, which tests/integration/test_architectures.py holds equal to transformers:
float32 greedy tokens equal with 1 and 8 scheduler steps. Skipped without CUDA."""

import gc

import pytest
import torch

from stepserve import LLM, SamplingParams
from tiny_models import write_tiny_family

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FAMILIES = ["mistral", "qwen2-window", "qwen3", "gemma2", "gemma3", "gemma3-hd256", "phi3", "granite"]
FAMILIES += ["qwen3-moe", "qwen3-moe-top8", "qwen2-moe", "mixtral"]  # the fused MoE kernel, in graphs too
PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(5 + 13 * i)] for i in range(8)]  # 5..96 tokens


def greedy(model_dir, device, **options):
    llm = LLM(
        model=str(model_dir),
        device=device,
        dtype="float32",
        max_model_len=128,
        num_blocks=512,
        block_size=16,
        **options,
    )
    out = [
        o.outputs[0].token_ids
        for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    ]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_equals_cpu(family, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = write_tiny_family(tmp_path / family, family, seed=9)
    want = greedy(model_dir, "cpu")
    assert greedy(model_dir, "cuda", num_scheduler_steps=1) == want
    assert greedy(model_dir, "cuda", num_scheduler_steps=8) == want


@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
def test_lora_adapters_on_cuda_equal_cpu(family, tmp_path):
    """Adapters and the base mixed in one batch on the CUDA path (the Triton LoRA kernels, in the
    decode graphs too; on Qwen3-MoE the stacked experts' adapters inside the fused MoE kernel)
    give the CPU reference's tokens, single- and multi-step."""
    from lora_adapters import base_and_requests

    torch.backends.cuda.matmul.allow_tf32 = False
    base, requests = base_and_requests(tmp_path, family)
    loras = [None, *requests] * 2
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(loras))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def run(device, **options):
        llm = LLM(
            model=str(base), device=device, dtype="float32", max_model_len=128, num_blocks=512, enable_lora=True,
            max_loras=4, **options,
        )  # fmt: skip
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=loras)]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return out

    want = run("cpu")
    assert run("cuda", num_scheduler_steps=1) == want
    assert run("cuda", num_scheduler_steps=8) == want
