"""The KServe incident on the embedded model: multi-step N=8 and no max_tokens."""

import pytest

from stepserve import LLM, SamplingParams

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def llm():
    # float32: its greedy answer to the question below is the same on every CPU; in bfloat16 its
    # first token is a near tie (0.08 nats) that AMX's rounding turns to a rambling answer.
    return LLM(num_scheduler_steps=8, max_model_len=MAX_MODEL_LEN, dtype="float32")


def test_chat_without_max_tokens_ends_at_eos_and_others_are_unaffected(llm):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    long_run = [{"role": "user", "content": "Write a long story about a dragon."}]
    outs = llm.chat(
        [question, long_run], [SamplingParams(temperature=0), SamplingParams(temperature=0, ignore_eos=True)]
    )
    answer, forced = outs[0].outputs[0], outs[1].outputs[0]
    assert answer.finish_reason == "stop" and "Paris" in answer.text
    assert answer.token_ids[-1] in llm.info.eos_token_ids and "<|im_end|>" not in answer.text
    assert forced.finish_reason == "length"
    assert len(forced.token_ids) == MAX_MODEL_LEN - len(outs[1].prompt_token_ids)
    alone = llm.chat(question, SamplingParams(temperature=0))[0].outputs[0]
    assert alone.token_ids == answer.token_ids
    assert llm.core.stats().kv_cache_usage == 0.0


def test_generate_cli_style_prompt(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert out.finish_reason in ("length", "stop") and len(out.token_ids) <= 8 and out.text.strip()
