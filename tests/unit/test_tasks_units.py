"""Pure parts of the tasks package: the dynamic batcher, task inference, the sentence-transformers
pooling config."""

import json

import pytest

from stepserve.config import ConfigError
from stepserve.tasks.batcher import Batcher
from stepserve.tasks.messages import EncoderRequest
from stepserve.tasks.spec import matryoshka, native_max_len, read_pooling
from stepserve.tasks.task import resolve_task


def req(i: int, n: int = 4) -> EncoderRequest:
    return EncoderRequest(f"r{i}", tuple(range(1, n + 1)))


def test_batcher_waits_then_cuts_by_time():
    b = Batcher(max_count=8, max_padded_tokens=1000, wait_s=0.01)
    b.add(req(0), now=0.0)
    b.add(req(1), now=0.005)
    assert b.cut(now=0.005) == [] and b.wait_left(0.005) == pytest.approx(0.005)
    assert [r.request_id for r in b.cut(now=0.0101)] == ["r0", "r1"]
    assert len(b) == 0 and b.cut(now=1.0) == []


def test_batcher_cuts_full_batches_at_once_by_count_and_by_padded_tokens():
    b = Batcher(max_count=3, max_padded_tokens=40, wait_s=10.0)
    for i in range(4):
        b.add(req(i), now=0.0)
    assert [r.request_id for r in b.cut(now=0.0)] == ["r0", "r1", "r2"]  # full by count, no waiting
    assert b.cut(now=0.0) == []  # r3 alone waits
    b.add(req(4, n=30), now=0.0)  # 2 rows x 30 > 40 padded tokens: r3 goes alone
    assert [r.request_id for r in b.cut(now=0.0)] == ["r3"]
    assert [r.request_id for r in b.cut(now=20.0)] == ["r4"]
    b.add(req(5, n=100), now=0.0)  # one row longer than the budget still runs
    assert [r.request_id for r in b.cut(now=20.0)] == ["r5"]


def test_batcher_remove_drops_aborted_requests():
    b = Batcher(max_count=8, max_padded_tokens=1000, wait_s=0.0)
    for i in range(3):
        b.add(req(i), now=0.0)
    b.remove(["r1", "missing"])
    assert [r.request_id for r in b.cut(now=0.0)] == ["r0", "r2"]


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
    modules = [{"type": "sentence_transformers.models.Transformer", "path": ""}, {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    pooling = read_pooling(tmp_path)
    assert pooling.mode == "cls" and not pooling.normalize
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(ConfigError, match="weightedmean"):
        read_pooling(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps(modules + [{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]))
    with pytest.raises(ConfigError, match="Dense"):
        read_pooling(tmp_path)
    assert read_pooling(tmp_path / "missing").mode == "mean"  # KServe's default: mean, normalised


def test_model_limits(tmp_path):
    assert native_max_len({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}, tmp_path) == 512
    assert native_max_len({"model_type": "bert", "max_position_embeddings": 512}, tmp_path) == 512
    assert native_max_len({"model_type": "t5", "n_positions": 512}, tmp_path) == 512
    assert matryoshka({"matryoshka_dimensions": [64, 128]}) == (64, 128)
    assert matryoshka({"is_matryoshka": True}) == () and matryoshka({}) is None
