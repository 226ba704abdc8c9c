"""Pure parts of the tasks package: task inference, the sentence-transformers pooling config."""

import json

import pytest

from stepserve.config import ConfigError
from stepserve.tasks.spec import matryoshka, native_max_len, read_pooling
from stepserve.tasks.task import resolve_task


def test_task_inference_follows_kserve():
    arch = lambda a: {"architectures": [a]}  # noqa: E731
    assert resolve_task(None, arch("BertForSequenceClassification"), False) == "sequence_classification"
    assert resolve_task(None, arch("XLMRobertaForTokenClassification"), False) == "token_classification"
    assert resolve_task(None, arch("ModernBertForMaskedLM"), False) == "fill_mask"
    assert resolve_task(None, arch("BartForConditionalGeneration"), False) == "text2text_generation"
    assert resolve_task(None, arch("MarianMTModel"), False) == "text2text_generation"
    assert resolve_task(None, arch("Qwen2ForCausalLM"), False) == "text_generation"
    assert resolve_task(None, arch("BertModel"), True) == "text_embedding"  # a sentence-transformers directory
    assert resolve_task("text_embedding", arch("BertForMaskedLM"), False) == "text_embedding"
    with pytest.raises(ConfigError, match="no task can be inferred"):
        resolve_task(None, arch("BertModel"), False)


def test_sentence_transformers_pooling_config(tmp_path):
    modules = [
        {"type": "sentence_transformers.models.Transformer", "path": ""},
        {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    pooling = read_pooling(tmp_path)
    assert pooling.mode == "cls" and not pooling.normalize
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(ConfigError, match="weightedmean"):
        read_pooling(tmp_path)
    (tmp_path / "modules.json").write_text(
        json.dumps(modules + [{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}])
    )
    with pytest.raises(ConfigError, match="Dense"):
        read_pooling(tmp_path)
    assert read_pooling(tmp_path / "missing").mode == "mean"  # KServe's default: mean, normalised


def test_model_limits(tmp_path):
    assert native_max_len({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}, tmp_path) == 512
    assert native_max_len({"model_type": "bert", "max_position_embeddings": 512}, tmp_path) == 512
    assert native_max_len({"model_type": "t5", "n_positions": 512}, tmp_path) == 512
    assert matryoshka({"matryoshka_dimensions": [64, 128]}) == (64, 128)
    assert matryoshka({"is_matryoshka": True}) == () and matryoshka({}) is None
