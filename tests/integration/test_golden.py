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
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
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
    ours = [
        o.outputs[0].token_ids
        for o in llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    ]
    assert ours == reference_greedy(model_dir, prompt_ids, 32)


@pytest.mark.slow
def test_embedded_gguf_equals_transformers(embedded_f32, embedded_hf):
    """The embedded GGUF in float32 without int4 (conftest): the same weights as transformers'
    float32 model of it, computed the same way."""
    llm = embedded_f32
    assert (llm.info.dtype, llm.info.quantization) == ("float32", "none")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    prompt_ids = [llm.tokenizer.encode(p) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params)]
    for ids, got in zip(prompt_ids, ours):
        gen = embedded_hf.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert got == gen[0, len(ids) :].tolist()


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scaling_equals_transformers(kind, tmp_path):
    """Prompts past llama3's original 64 positions; head_dim 16 spans its low, mid and high bands."""
    from tiny_models import write_tiny_model

    model_dir = write_tiny_model(
        tmp_path / kind, "llama", seed=4, rope_scaling=ROPE_SCALINGS[kind], rope_theta=500000.0
    )
    llm = LLM(model=str(model_dir), num_blocks=256, block_size=8, max_model_len=256)
    assert llm.core.worker.model.cfg.rope.kind == kind  # the scaling was read, not dropped
    prompt_ids = [llm.tokenizer.encode(p) for p in (PROMPTS[3] * 2, PROMPTS[7] * 3, PROMPTS[0])]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params)]
    assert ours == reference_greedy(model_dir, prompt_ids, NEW_TOKENS)


def test_auto_dtype_and_quantization_with_and_without_native_bf16(monkeypatch):
    from stepserve.config import ConfigError
    from stepserve.executor import builder

    cpu = torch.device("cpu")
    gguf = {"gguf_linear_type": "Q4_1"}
    for has_bf16, dtype, quant in ((True, torch.bfloat16, "int4"), (False, torch.float32, "int4")):
        monkeypatch.setattr(builder, "cpu_has_bf16", lambda: has_bf16)
        assert builder.pick_dtype("auto", cpu, gguf) == dtype
        assert builder.pick_quantization("auto", cpu, dtype, gguf) == quant
        assert builder.pick_dtype("auto", cpu, {"torch_dtype": "float32"}) == torch.float32
        assert builder.pick_quantization("auto", cpu, torch.float16, gguf) == "none"
        assert builder.pick_quantization("auto", cpu, dtype, {"torch_dtype": "float32"}) == "none"
    with pytest.raises(ConfigError, match="AVX512-BF16"):
        builder.pick_quantization("int4", cpu, torch.bfloat16, gguf)
    with pytest.raises(ConfigError, match="needs float32 activations"):
        builder.pick_quantization("int4", cpu, torch.float16, gguf)
    assert builder.pick_quantization("int4", cpu, torch.float32, gguf) == "int4"
