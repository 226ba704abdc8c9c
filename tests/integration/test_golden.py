"""Greedy tokens equal transformers' on tiny random models and on the embedded GGUF."""

import pytest
import torch
import transformers

from stepserve import LLM, SamplingParams

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over",
    "a",
    "Once upon a time, in a land far away, there lived",
    "1 2 3 4 5",
    "héllo wörld 日本",
    "What is the capital of France? The capital of France is",
    "xyz" * 20,
]
NEW_TOKENS = 40


def reference_greedy(model_dir, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in prompt_ids:
        gen = model.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        out.append(gen[0, len(ids) :].tolist())
    return out


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_tied"])
def test_greedy_equals_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    llm = LLM(model=str(model_dir), num_blocks=256, block_size=4)
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) >= 6  # prompts of different lengths
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params)]
    assert ours == reference_greedy(model_dir, prompt_ids, NEW_TOKENS)


def test_sharded_checkpoint_with_index(tmp_path):
    from tiny_models import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "sharded", "llama", seed=3, num_hidden_layers=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(model_dir, max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").exists()
    llm = LLM(model=str(model_dir), num_blocks=128, block_size=8)
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS[:4]]
    ours = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))]
    assert ours == reference_greedy(model_dir, prompt_ids, 32)


@pytest.mark.slow
def test_embedded_gguf_equals_transformers():
    llm = LLM(max_model_len=512, dtype="float32", quantization="none")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    prompt_ids = [llm.tokenizer.encode(p) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params)]
    source = llm_source()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source.directory), gguf_file=source.gguf_file, dtype=torch.float32)
    for ids, got in zip(prompt_ids, ours):
        gen = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == gen[0, len(ids) :].tolist()


def llm_source():
    from stepserve.models.source import resolve_source

    return resolve_source(None)
