"""GGUF files of each GGUF-capable family, written with the ``gguf`` package's writer as
llama.cpp's converter lays them out, give the same greedy tokens as the safetensors checkpoint
they were written from (which test_architectures holds equal to transformers). GGUF rope
metadata is implemented (linear scaling, dimension_count) or refused, naming the key."""

import dataclasses
import json

import pytest
import torch

from stepserve import LLM, SamplingParams
from stepserve.config import ConfigError
from tiny_gguf import write_gguf
from tiny_models import write_tiny_family, write_tiny_model

# Token ids (byte values), not text: transformers reads a Gemma GGUF's vocabulary as a
# sentencepiece one, which the tiny byte-level vocabulary is not; the weights are under test here.
PROMPTS = [
    list(p.encode())
    for p in ["Hello", "The quick brown fox jumps over", "Once upon a time, in a land far away", "xyz" * 20]
]
PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """The converted-GGUF cache goes to the test's own folder; one thread for tiny matrices."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def greedy(model: str, **options) -> list[list[int]]:
    llm = LLM(model=model, num_blocks=160, block_size=4, dtype="float32", max_model_len=128, **options)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "phi3", "qwen3-moe", "qwen2-moe", "mixtral"])
def test_gguf_equals_safetensors(family, tmp_path):
    model_dir = write_tiny_family(tmp_path / family, family, seed=5)
    path = write_gguf(model_dir, tmp_path / f"{family}.gguf")
    assert greedy(str(path)) == greedy(str(model_dir))


TEXTS = ["Hello", "The quick brown fox jumps over", "1 2 3 4 5 and 678", "héllo wörld 日本 🙂", "  two  spaces\n\nend"]


def test_granite_gguf_equals_transformers_on_its_checkpoint(tmp_path):
    """transformers reads no Granite GGUF config, so its AutoTokenizer refuses the file; stepserve
    builds the tokenizer from the file's metadata with transformers' GGUF tokenizer builder. Text
    in: the same token ids as transformers' tokenizer of the checkpoint the file was written
    from, and the same greedy tokens and text as transformers' model on it. The config and the
    weights read back as the checkpoint's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepserve.models.gguf import GgufFile
    from stepserve.models.registry import decoder_config

    model_dir = write_tiny_family(tmp_path / "granite", "granite", seed=5)
    path = write_gguf(model_dir, tmp_path / "granite.gguf")
    gguf = GgufFile(path)
    config = gguf.config()
    want = decoder_config(json.loads((model_dir / "config.json").read_text()), 128)
    got = decoder_config(config, 128)
    for field in dataclasses.fields(want):  # GGUF stores floats in 32 bits
        mine, theirs = getattr(got, field.name), getattr(want, field.name)
        assert mine == (pytest.approx(theirs, rel=1e-6) if isinstance(theirs, float) else theirs), field.name
    weights = dict(gguf.weights(config))
    expected = load_file(model_dir / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name

    llm = LLM(model=str(path), num_blocks=160, block_size=4, dtype="float32", max_model_len=128)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi 42"}], tokenize=False, add_generation_prompt=True
    )
    for text in [*TEXTS, chat]:  # the chat turn holds the control tokens, each one id
        assert llm.tokenizer.encode(text) == tokenizer.encode(text), text
    assert llm.tokenizer.chat_template == tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = [o.outputs[0] for o in llm.generate(TEXTS, PARAMS)]
    for text, out in zip(TEXTS, outs):
        ids = torch.tensor([tokenizer.encode(text)])
        reference = model.generate(
            ids,
            max_new_tokens=PARAMS.max_tokens,
            min_new_tokens=PARAMS.max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert out.token_ids == reference[0, ids.shape[1] :].tolist(), text
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["granite", "qwen3"])  # AutoTokenizer refuses Granite files, reads Qwen3 ones
def test_gguf_tokenizer_of_an_unknown_model_is_refused_by_name(family, tmp_path):
    model_dir = write_tiny_family(tmp_path / family, family, seed=5)
    path = write_gguf(model_dir, tmp_path / f"{family}.gguf", tokenizer_model="rwkv")
    with pytest.raises(ConfigError) as info:
        LLM(model=str(path), num_blocks=160, block_size=4, max_model_len=128)
    assert f"the tokenizer of {family}.gguf cannot be read" in str(info.value) and "'rwkv'" in str(info.value)


def test_gguf_linear_rope_scaling_and_partial_dims(tmp_path):
    """rope.scaling.type=linear becomes linear scaling; a Llama GGUF whose q/k were permuted
    by the converter comes back unpermuted."""
    scaled = write_tiny_model(tmp_path / "scaled", "llama", seed=6, rope_scaling={"rope_type": "linear", "factor": 4.0})
    path = write_gguf(scaled, tmp_path / "scaled.gguf", {"rope_scaling_type": _linear(), "rope_scaling_factor": 4.0})
    assert greedy(str(path)) == greedy(str(scaled))


def _linear():
    import gguf

    return gguf.RopeScalingType.LINEAR


@pytest.mark.parametrize(
    ("metadata", "needle"),
    [
        ({"rope_scaling_type": "yarn", "rope_scaling_factor": 4.0}, "llama.rope.scaling.type='yarn'"),
    ],
)
def test_gguf_rope_metadata_refused(metadata, needle, tmp_path):
    import gguf

    plain = write_tiny_model(tmp_path / "plain", "llama", seed=7)
    metadata = {k: (gguf.RopeScalingType.YARN if v == "yarn" else v) for k, v in metadata.items()}
    path = write_gguf(plain, tmp_path / "plain.gguf", metadata)
    with pytest.raises(ConfigError) as info:
        LLM(model=str(path), num_blocks=160, block_size=4, max_model_len=128)
    assert needle in str(info.value)
