"""Constrained decoding in the engine: every answer that ends with "stop" follows its grammar,
with continuous batching, chunked prefill, preemption, n > 1, seeds, every sampling parameter
and multi-step passes; a tiny random model writes garbage unless constrained, so these test the
constraint, not the model. The embedded SmolLM2 checks that real answers follow schemas too."""

import json
import re

import jsonschema
import pytest
from json_schemas import SCHEMAS

from stepserve import LLM, SamplingParams

SAMPLING_VARIANTS = [  # every sampling parameter, spread over the constrained requests
    dict(temperature=0.0),
    dict(temperature=1.0, seed=3),
    dict(temperature=0.8, top_p=0.9, top_k=50),
    dict(temperature=1.2, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5),
    dict(temperature=0.7, repetition_penalty=1.3, logit_bias={"34": 5.0, "44": -5.0}, logprobs=2),
    dict(temperature=1.0, seed=11, min_tokens=3, stop=["zz"]),
]


@pytest.fixture(scope="module")
def engines(tiny_llama):
    # Few KV blocks and a small token budget: prompts are chunked and requests preempted.
    options = dict(num_blocks=48, block_size=8, max_model_len=256, max_num_batched_tokens=24)
    return {n: LLM(model=str(tiny_llama), num_scheduler_steps=n, **options) for n in (1, 8)}


def _prompt(i: int) -> str:
    return f"request {i}: " + "lorem ipsum " * (1 + i % 3)


def test_every_schema_answer_validates_in_a_mixed_multistep_batch(engines):
    llm = engines[8]
    before = llm.core.stats().num_preemptions
    prompts, params = [], []
    for i, schema in enumerate(SCHEMAS):
        prompts.append(_prompt(i))
        params.append(
            SamplingParams(
                n=2,
                max_tokens=100,
                structured=llm.grammar("json", schema),
                **SAMPLING_VARIANTS[i % len(SAMPLING_VARIANTS)],
            )
        )
        prompts.append(_prompt(100 + i))  # a free request beside each constrained one
        params.append(SamplingParams(max_tokens=24, temperature=1.0))
    outputs = llm.generate(prompts, params)
    stopped = 0
    for i, schema in enumerate(SCHEMAS):
        for completion in outputs[2 * i].outputs:
            if completion.finish_reason == "stop":
                jsonschema.validate(json.loads(completion.text), schema)
                stopped += 1
    assert stopped >= len(SCHEMAS)  # most constrained answers finish: the test is not vacuous
    assert llm.core.stats().num_preemptions > before  # preemption rebuilt matchers on the way


def test_regex_and_choice_outputs_match_at_multistep(engines):
    llm = engines[8]
    regex = r"[0-9]{3}-[a-z]{2,4}( [A-Z][a-z]?)?"
    choices = ["yes", "no way", 'say "hi"', "ünïcode ✓"]
    params = [
        SamplingParams(n=3, max_tokens=40, temperature=1.0, seed=5, structured=llm.grammar("regex", regex)),
        SamplingParams(n=4, max_tokens=40, temperature=1.5, structured=llm.grammar("choice", choices)),
        SamplingParams(max_tokens=30, temperature=0.9, structured=llm.grammar("grammar", 'root ::= "(" [a-c]+ ")"')),
    ]
    regex_out, choice_out, gbnf_out = llm.generate(["a", "b", "c"], params)
    assert all(re.fullmatch(regex, c.text) and c.finish_reason == "stop" for c in regex_out.outputs)
    assert all(c.text in choices and c.finish_reason == "stop" for c in choice_out.outputs)
    assert all(re.fullmatch(r"\([a-c]+\)", c.text) for c in gbnf_out.outputs if c.finish_reason == "stop")


def test_constrained_multistep_equals_single_step(engines):
    """The per-step masks inside a multi-step pass give the tokens single steps give."""

    def run(llm):
        params = [
            SamplingParams(temperature=0.0, max_tokens=40, structured=llm.grammar("json", s)) for s in SCHEMAS[:6]
        ]
        params += [SamplingParams(temperature=0.0, max_tokens=20)] * 2
        return [o.outputs[0].token_ids for o in llm.generate([_prompt(i) for i in range(len(params))], params)]

    assert run(engines[8]) == run(engines[1])


def test_the_grammar_end_ends_the_request_whatever_ignore_eos_and_min_tokens_say(engines):
    llm = engines[8]
    spec = llm.grammar("choice", ["red", "blue"])
    for extra in (dict(ignore_eos=True), dict(min_tokens=20)):
        out = llm.generate("x", SamplingParams(n=2, max_tokens=50, temperature=1.0, structured=spec, **extra))[0]
        assert all(c.text in ("red", "blue") and c.finish_reason == "stop" for c in out.outputs)


@pytest.mark.slow
def test_embedded_model_answers_follow_their_schemas():
    llm = LLM(max_model_len=512)
    schemas = [SCHEMAS[1], SCHEMAS[19]]
    messages = [
        [{"role": "user", "content": f"Answer in JSON. {q}"}]
        for q in ("Who are you and how old?", "Rate this: great film!")
    ]
    params = [SamplingParams(temperature=0.0, max_tokens=60, structured=llm.grammar("json", s)) for s in schemas]
    outputs = llm.chat(messages, params)
    for out, schema in zip(outputs, schemas):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)


def test_prompt_logprobs_match_transformers_under_chunked_prefill_and_prefix_caching(tiny_llama):
    import torch
    import transformers

    llm = LLM(
        model=str(tiny_llama),
        dtype="float32",
        max_num_batched_tokens=8,
        block_size=4,
        num_blocks=128,
        max_model_len=256,
    )
    prompt = "the quick brown fox jumps over the lazy dog"
    # The same prompt twice: the second would hit the prefix cache, which prompt logprobs bypass.
    first, second = llm.generate(
        [prompt, prompt],
        [
            SamplingParams(max_tokens=2, prompt_logprobs=3, n=2, temperature=1.0),
            SamplingParams(max_tokens=2, prompt_logprobs=0),
        ],
    )
    ids = first.prompt_token_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(dim=-1)
    for out, k in ((first, 3), (second, 0)):
        entries = out.prompt_logprobs
        assert entries[0] is None and len(entries) == len(ids)
        for i in range(1, len(ids)):
            assert entries[i].token_id == ids[i] and abs(entries[i].logprob - ref[i - 1, ids[i]].item()) < 1e-3
            assert entries[i].rank == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
            assert (
                [t for t, _ in entries[i].top] == ref[i - 1].topk(k).indices.tolist()[:k] if k else entries[i].top == ()
            )
