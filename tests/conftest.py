import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama-gqa", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2-bias", "qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    from tiny_models import write_tiny_model

    return write_tiny_model(
        tmp_path_factory.mktemp("tiny") / "llama-tied", "llama", seed=2, tie_word_embeddings=True, num_key_value_heads=4
    )


@pytest.fixture(scope="session")
def embedded_f32():
    """The embedded SmolLM2 in float32 without int4: the GGUF's weights dequantized, computed as
    transformers' float32 model of it does, on every machine. Prompts are chunked by 64 tokens.
    One load for the session."""
    from stepserve import LLM

    return LLM(max_model_len=512, max_num_batched_tokens=64, dtype="float32", quantization="none")


@pytest.fixture(scope="session")
def embedded_hf():
    """transformers' own float32 model of the embedded GGUF: the independent reference."""
    import torch
    import transformers

    from stepserve.checkpoint.source import resolve_source

    source = resolve_source(None)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(source.directory), gguf_file=source.gguf_file, dtype=torch.float32
    ).eval()
