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

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama-tied", "llama", seed=2, tie_word_embeddings=True, num_key_value_heads=4)
