"""The official openai client against a live stepserve on loopback (tiny random Llama)."""

import openai
import pytest
from live_server import start_server

MODEL = "tiny"
MAX_MODEL_LEN = 256
FORCE = {"ignore_eos": True}  # a random model may sample EOS; counts below need every token


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    args = [
        "--model",
        str(tiny_llama),
        "--model_name",
        MODEL,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--num-blocks",
        "256",
    ]
    live = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy_completion(client, prompt="hello", max_tokens=12, **kw):
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=FORCE, **kw
    )


def test_completion_counts_tokens(client):
    out = greedy_completion(client, "hello", max_tokens=5)
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 5  # the byte-level tokenizer: one token per byte
    assert out.usage.completion_tokens == 5 and out.usage.total_tokens == 10
    assert out.model == MODEL and out.id.startswith("cmpl-")


def test_completion_default_max_tokens_is_16_and_chat_default_is_the_rest(client):
    out = client.completions.create(model=MODEL, prompt="hi", temperature=0, extra_body=FORCE)
    assert out.usage.completion_tokens == 16
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0, extra_body=FORCE
    )
    assert chat.usage.completion_tokens == MAX_MODEL_LEN - chat.usage.prompt_tokens
    assert chat.choices[0].finish_reason == "length"


def test_streamed_completion_equals_the_whole_one(client):
    whole = greedy_completion(client).choices[0]
    stream = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=12, temperature=0, stream=True, extra_body=FORCE
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_n_2_with_seed_gives_two_reproducible_choices(client):
    def run():
        return client.completions.create(
            model=MODEL, prompt="abc", max_tokens=6, n=2, temperature=1.0, seed=7, extra_body=FORCE
        )

    first, second = run(), run()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == 12


def test_seeded_chat_is_reproducible(client):
    def run(seed):
        messages = [{"role": "user", "content": "tell me"}]
        return client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=1.0, seed=seed, logprobs=True
        )

    a, b = run(3), run(3)
    tokens = lambda r: [t.token for t in r.choices[0].logprobs.content]  # noqa: E731
    assert a.choices[0].message.content == b.choices[0].message.content and tokens(a) == tokens(b)


def test_stop_string_cuts_the_text(client):
    text = greedy_completion(client, "stop here", max_tokens=24).choices[0].text
    stop = next(ch for ch in text[1:] if ch.isascii() and ch.isprintable())
    out = greedy_completion(client, "stop here", max_tokens=24, stop=[stop]).choices[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]


def test_completion_logprobs_format(client):
    out = greedy_completion(client, "log", max_tokens=6, logprobs=3).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen is the best
        assert chosen == pytest.approx(max(top.values()))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_returns_the_prompt_first(client):
    out = greedy_completion(client, "echo me", max_tokens=3, echo=True).choices[0]
    assert out.text.startswith("echo me") and len(out.text) > len("echo me")


def test_prompt_forms(client, tiny_llama):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_llama)).encode("hello")
    for prompt, choices in (("hello", 1), (["hello", "world"], 2), (ids, 1), ([ids, ids[:2]], 2)):
        out = greedy_completion(client, prompt, max_tokens=2)
        assert [c.index for c in out.choices] == list(range(choices))
    assert (
        greedy_completion(client, ids, max_tokens=4).choices[0].text
        == greedy_completion(client, "hello", max_tokens=4).choices[0].text
    )


def test_chat_logprobs_format(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=FORCE,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=7,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FORCE,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=7,
        temperature=0,
        extra_body=FORCE,
    )
    assert text == whole.choices[0].message.content


def test_chat_n_2_streams_both_choices(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "two"}],
        max_tokens=4,
        n=2,
        seed=1,
        stream=True,
        extra_body=FORCE,
    )
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_roles_and_max_completion_tokens(client):
    messages = [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "call it"},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": [{"type": "text", "text": "and?"}]},
    ]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=9, max_completion_tokens=3, extra_body=FORCE
    )
    assert out.usage.completion_tokens == 3


def test_kserve_openai_prefix_and_model_list(server):
    prefixed = openai.OpenAI(base_url=server.url + "/openai/v1", api_key="unused", max_retries=0)
    assert [m.id for m in prefixed.models.list()] == [MODEL]
    out = prefixed.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=FORCE)
    assert out.usage.completion_tokens == 2


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
