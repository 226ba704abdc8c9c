"""EAGLE-3 heads (speculative decoding's method eagle3, models/eagle3.py): every proposal the
engine makes is the one a reference EAGLE-3 computes from scratch over the request's tokens
(transformers' Llama attention, MLP and norms; the target's hidden states from transformers'
``output_hidden_states``), in both file layouts and with the config's variants; the head's
cache stays whole while speculation pauses under load; bad heads are refused by name.

Greedy output with a head equals the output without one in test_speculative.py."""

import json

import pytest
import torch
from eagle3_reference import Reference, record_proposals
from safetensors.torch import load_file, save_file
from tiny_models import write_eagle3_head, write_tiny_model

from stepserve import LLM, SamplingParams
from stepserve.config import ConfigError

OPTIONS = dict(dtype="float32", max_model_len=256)
PROMPTS = [list(b"the cat sat on the mat; the cat"), list(b"abcabcabcab"), list(b"1 2 3 4 5 6 7 8 9 1")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("eagle3") / "target", "llama", seed=3, num_hidden_layers=3)


@pytest.mark.parametrize(
    ("layout", "draft_vocab", "flags"),
    [
        ("eagle", None, {}),
        ("eagle", 200, {}),  # a proposal vocabulary smaller than the target's, mapped by d2t
        ("speculators", 200, {}),
        ("eagle", None, {"norm_before_fc": True, "norm_output": True}),
        ("speculators", None, {"fc_norm": True}),
        ("eagle", None, {"aux_layers": (1, 2, 3)}),  # 3: the stream leaving the last layer, before the final norm
    ],
)
def test_every_proposal_is_the_reference_heads(target, tmp_path, layout, draft_vocab, flags):
    head = write_eagle3_head(tmp_path / "head", target, seed=7, layout=layout, draft_vocab=draft_vocab, **flags)
    config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 3}
    llm = LLM(model=str(target), speculative_config=config, **OPTIONS)
    seen = record_proposals(llm)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm.generate(PROMPTS, greedy)
    reference = Reference(target, head)
    assert len(seen) > 10
    for tokens, proposals in seen:
        assert proposals == reference.proposals(tokens, len(proposals)), tokens


def test_the_head_keeps_up_while_speculation_pauses(target, tmp_path):
    """Two requests run with disable_by_batch_size=1: nothing is proposed until the short one
    ends; the head computed its cache over every pass meanwhile, so the long one's first
    proposals after that are the reference's (a head that skipped those passes proposes from a
    cache with holes)."""
    head = write_eagle3_head(tmp_path / "head", target, seed=11)
    config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 3, "disable_by_batch_size": 1}
    llm = LLM(model=str(target), speculative_config=config, **OPTIONS)
    seen = record_proposals(llm)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 40)]
    llm.generate(PROMPTS[:2], params)
    reference = Reference(target, head)
    long = [len(t) - len(PROMPTS[1]) for t, _ in seen if t[: len(PROMPTS[1])] == PROMPTS[1]]
    # proposed after its prompt (both were prefilled in one pass), then only once the short one ended
    assert 1 in long and any(n > 12 for n in long) and not any(1 < n < 12 for n in long), long
    for tokens, proposals in seen:
        assert proposals == reference.proposals(tokens, len(proposals))


def test_a_draft_model_keeps_up_while_speculation_pauses(target):
    """The same for a draft model: the target drafting for itself has every proposal accepted,
    which it has only if its cache covers the passes without speculation."""
    config = {"method": "draft_model", "model": str(target), "num_speculative_tokens": 3, "disable_by_batch_size": 1}
    llm = LLM(model=str(target), speculative_config=config, **OPTIONS)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 40)]
    llm.generate(PROMPTS[:2], params)
    counters = llm.core.scheduler.spec_counters
    assert counters.num_draft_tokens > 0
    assert counters.num_accepted_tokens == counters.num_draft_tokens


def _edit(head, config=None, tensors=None):
    if config is not None:
        path = head / "config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if tensors is not None:
        save_file(tensors(load_file(head / "model.safetensors")), head / "model.safetensors")


BAD_HEADS = [
    (dict(config=lambda c: c | {"architectures": ["LlamaForCausalLM"]}), "name no EAGLE-3 head"),
    (dict(config=lambda c: c | {"hidden_size": 32}), "hidden size"),
    (dict(config=lambda c: c | {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 9]}}), "target layers"),
    (dict(config=lambda c: c | {"vocab_size": 300}), "vocabulary"),
    (dict(config=lambda c: c | {"num_hidden_layers": 2}), "one-layer heads"),
    (dict(tensors=lambda t: {k: v for k, v in t.items() if k != "fc.weight"}), "lacks fc.weight"),
    (dict(tensors=lambda t: t | {"extra.weight": torch.zeros(2)}), "'extra.weight'"),
    (dict(tensors=lambda t: {k: v for k, v in t.items() if k != "d2t"}), "no d2t"),
    (
        dict(tensors=lambda t: t | {"fc.weight": t["fc.weight"][:, :64].contiguous()}),
        r"'fc.weight' has shape \[64, 64\]",
    ),
    (dict(tensors=lambda t: t | {"embed_tokens.weight": torch.zeros(300, 64)}), "'embed_tokens.weight' has shape"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_HEADS)
def test_bad_heads_are_refused_by_name(target, tmp_path, edit, message):
    head = write_eagle3_head(tmp_path / "head", target, draft_vocab=200)
    _edit(head, **edit)
    config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 2}
    with pytest.raises(ConfigError, match=message):
        LLM(model=str(target), speculative_config=config, **OPTIONS)


def test_a_gguf_or_missing_head_is_refused(target, tmp_path):
    from stepserve.checkpoint.source import embedded_model_path

    for model, message in (
        (str(embedded_model_path()), "not a GGUF"),
        (str(tmp_path), "nor a directory with config.json"),
    ):
        config = {"method": "eagle3", "model": model, "num_speculative_tokens": 2}
        with pytest.raises(ConfigError, match=message):
            LLM(model=str(target), speculative_config=config, **OPTIONS)
    config = {"method": "eagle3", "num_speculative_tokens": 2}
    with pytest.raises(ConfigError, match="needs a model"):
        LLM(model=str(target), speculative_config=config, **OPTIONS)
