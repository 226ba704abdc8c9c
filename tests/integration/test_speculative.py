"""Speculative decoding (docs/speculative-decoding.md): with n-gram proposals, a draft model or an EAGLE-3 head,
greedy and seeded output is the output without speculation, token for token, at batch 1 and in
mixed batches, with chunked prefill, preemption, asynchronous scheduling, logprobs, min_tokens,
penalties and stop tokens; unseeded sampling keeps the target's distribution (a two-sample
chi-square test, with a draft that is often wrong); constrained answers stay valid; the
embedded model accepts most proposals when it rewrites a given text."""

import json

import jsonschema
import pytest
from json_schemas import SCHEMAS
from tiny_models import write_eagle3_head, write_tiny_model

from stepserve import LLM, SamplingParams
from stepserve.config import ConfigError

PROMPTS = [
    list(b"abcabcabcabcabcabc"),
    list(b"the cat sat on the mat; the cat sat on the"),
    list(b"Hello there"),
    list(b"1 2 3 1 2 3 1 2 3 1"),
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
OPTIONS = dict(dtype="float32", max_model_len=256)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The target, a draft of the same tokenizer that disagrees with it (other weights, one
    layer), and an EAGLE-3 head for the target (random: it disagrees too)."""
    root = tmp_path_factory.mktemp("spec")
    target = write_tiny_model(root / "target", "llama", seed=3)
    other = write_tiny_model(root / "other", "llama", seed=9, num_hidden_layers=1)
    write_eagle3_head(root / "eagle3", target, seed=4, draft_vocab=200)
    return target, other


def _config(method: str, models) -> dict:
    target, other = models
    if method == "ngram":
        return dict(NGRAM)
    if method == "eagle3":
        return {"method": "eagle3", "model": str(target.parent / "eagle3"), "num_speculative_tokens": 3}
    draft = target if method == "draft-self" else other
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


METHODS = ["ngram", "draft-self", "draft-other", "eagle3"]


@pytest.mark.parametrize("method", METHODS)
def test_greedy_output_is_the_output_without_speculation(models, method):
    target, _ = models
    plain = LLM(model=str(target), **OPTIONS)
    spec = LLM(model=str(target), speculative_config=_config(method, models), **OPTIONS)  # a dict, as vLLM's LLM
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for prompt in PROMPTS:  # batch 1
        assert _tokens(spec, [prompt], greedy) == _tokens(plain, [prompt], greedy)
    # one mixed batch: lengths, stop tokens, min_tokens, penalties (which never propose) and logprobs
    params = [
        SamplingParams(temperature=0, max_tokens=5 + 7 * i, ignore_eos=True, logprobs=2, min_tokens=i)
        for i in range(len(PROMPTS))
    ]
    params[1] = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[ord(" "), ord("a")])
    params[2] = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, presence_penalty=0.5)
    params.append(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["5", "X"]))
    params.append(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["5", "X"]))
    prompts = PROMPTS + [PROMPTS[0], PROMPTS[3]]  # the last two end at a stop string
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    for a, b in zip(want, got):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason
        assert b.outputs[0].text == a.outputs[0].text
        if a.outputs[0].logprobs:
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
                assert abs(x.logprob - y.logprob) < 1e-4
    assert [o.outputs[0].finish_reason for o in want[-2:]] == ["stop", "stop"]  # the stop strings were met
    counters = spec.core.scheduler.spec_counters
    assert counters.num_drafts > 0 and counters.num_draft_tokens >= counters.num_drafts
    if method == "draft-self":  # the target drafting for itself: every greedy proposal is taken
        assert counters.num_accepted_tokens == counters.num_draft_tokens


@pytest.mark.parametrize("method", METHODS)
def test_preemption_chunked_prefill_and_async_keep_the_tokens(models, method):
    target, _ = models
    # Few blocks and a small token budget: prompts are chunked and requests preempted.
    tight = dict(num_blocks=40, block_size=4, max_num_batched_tokens=16, dtype="float32", max_model_len=128)
    prompts = [p * 2 for p in PROMPTS] * 2
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    want = _tokens(LLM(model=str(target), **OPTIONS), prompts, greedy)
    config = json.dumps(_config(method, models))
    spec = LLM(model=str(target), speculative_config=config, **tight)
    assert _tokens(spec, prompts, greedy) == want
    assert spec.core.scheduler.num_preemptions > 0
    assert spec.core.scheduler.spec_counters.num_drafts > 0
    overlapped = LLM(model=str(target), speculative_config=config, async_scheduling=True, **OPTIONS)
    assert _tokens(overlapped, prompts, greedy) == want
    assert overlapped.core.scheduler.blocks.num_free_blocks == overlapped.core.scheduler.blocks.num_usable_blocks


def test_seeded_sampling_is_unchanged(models):
    target, _ = models
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=24, ignore_eos=True, top_p=0.9, top_k=20)
        for s in range(len(PROMPTS))
    ]
    want = _tokens(LLM(model=str(target), **OPTIONS), PROMPTS, params)
    for method in ("ngram", "draft-other"):
        spec = LLM(model=str(target), speculative_config=json.dumps(_config(method, models)), **OPTIONS)
        assert _tokens(spec, PROMPTS, params) == want


def _chi_square(a: dict, b: dict) -> tuple[float, int]:
    """The two-sample chi-square statistic of two count tables (categories with counts in both
    merged into 'rare' below 5 expected), and its degrees of freedom."""
    n_a, n_b = sum(a.values()), sum(b.values())
    keys = sorted(set(a) | set(b), key=lambda k: -(a.get(k, 0) + b.get(k, 0)))
    merged_a, merged_b, rare_a, rare_b = [], [], 0, 0
    for k in keys:
        x, y = a.get(k, 0), b.get(k, 0)
        if x + y >= 10:
            merged_a.append(x)
            merged_b.append(y)
        else:
            rare_a, rare_b = rare_a + x, rare_b + y
    if rare_a + rare_b:
        merged_a.append(rare_a)
        merged_b.append(rare_b)
    stat = 0.0
    for x, y in zip(merged_a, merged_b):
        total = x + y
        for observed, n in ((x, n_a), (y, n_b)):
            expected = total * n / (n_a + n_b)
            stat += (observed - expected) ** 2 / expected
    return stat, len(merged_a) - 1


def _critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (z = 3.09): a false failure once in 1000 runs
    (Wilson-Hilferty's approximation, within 1% of the table from 5 degrees of freedom on)."""
    c = 2 / (9 * df)
    return df * (1 - c + z * c**0.5) ** 3


def test_unseeded_sampling_keeps_the_target_distribution(models):
    """Tokens 2 to 4 of 1,500 unseeded draws at temperature 1 (top-k 3: few categories), against
    1,500 draws without speculation. The draft is the target's own argmax, which the target's
    draws at temperature 1 often refuse."""
    target, _ = models
    prompt = list(b"abcab")
    params = SamplingParams(n=1500, temperature=1.0, top_k=3, max_tokens=4, ignore_eos=True)
    options = dict(max_num_seqs=64, **OPTIONS)

    def draws(llm) -> dict:
        counts: dict = {}
        for completion in llm.generate([prompt], params)[0].outputs:
            key = tuple(completion.token_ids[1:])
            counts[key] = counts.get(key, 0) + 1
        return counts

    config = _config("draft-self", models) | {"disable_by_batch_size": 64}
    spec = LLM(model=str(target), speculative_config=json.dumps(config), seed=1, **options)
    with_spec = draws(spec)
    counters = spec.core.scheduler.spec_counters
    assert counters.num_draft_tokens > 1000  # speculation really ran on these draws
    assert 0 < counters.num_accepted_tokens < counters.num_draft_tokens  # and was often wrong
    without = draws(LLM(model=str(target), seed=2, **options))
    stat, df = _chi_square(with_spec, without)
    assert df >= 5
    assert stat < _critical(df), (stat, df)


def test_structured_output_stays_valid_with_speculation(tiny_llama):
    spec = LLM(model=str(tiny_llama), speculative_config=json.dumps(NGRAM), max_model_len=256)
    plain = LLM(model=str(tiny_llama), max_model_len=256)
    schemas = SCHEMAS[:8]
    prompts = [f"request {i}: " + "lorem ipsum " * (1 + i % 3) for i in range(len(schemas))]

    def params(llm, temperature):
        return [
            SamplingParams(temperature=temperature, seed=i, max_tokens=100, structured=llm.grammar("json", s))
            for i, s in enumerate(schemas)
        ]

    for temperature in (0.0, 1.0):
        got = spec.generate(prompts, params(spec, temperature))
        want = plain.generate(prompts, params(plain, temperature))
        stopped = 0
        for a, b, schema in zip(want, got, schemas):
            assert b.outputs[0].token_ids == a.outputs[0].token_ids
            if b.outputs[0].finish_reason == "stop":
                jsonschema.validate(json.loads(b.outputs[0].text), schema)
                stopped += 1
        assert stopped >= len(schemas) // 2
    assert spec.core.scheduler.spec_counters.num_drafts > 0


def test_no_proposals_while_more_requests_run_than_disable_by_batch_size(models):
    target, _ = models
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [list(b"abcabcabcabc")] * 4  # equal: they run, and finish, together
    config = NGRAM | {"disable_by_batch_size": 3}
    spec = LLM(model=str(target), speculative_config=json.dumps(config), **OPTIONS)
    spec.generate(prompts, greedy)
    assert spec.core.scheduler.spec_counters.num_drafts == 0
    spec.generate(prompts[:3], greedy)
    assert spec.core.scheduler.spec_counters.num_drafts > 0


def test_the_embedded_model_takes_most_proposals_when_rewriting_a_text():
    text = (
        "The city council met on Tuesday to discuss the new budget. The mayor proposed spending more on parks, "
        "roads and schools, while several members asked for lower taxes."
    )
    messages = [[{"role": "user", "content": "Rewrite the following text exactly as it is:\n\n" + text}]]
    greedy = SamplingParams(temperature=0, max_tokens=64)
    want = LLM(max_model_len=1024).chat(messages, greedy)[0].outputs[0].token_ids
    config = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    spec = LLM(max_model_len=1024, speculative_config=json.dumps(config))
    assert spec.chat(messages, greedy)[0].outputs[0].token_ids == want
    counters = spec.core.scheduler.spec_counters
    assert counters.num_accepted_tokens > 0.6 * counters.num_draft_tokens
    assert counters.num_accepted_tokens > 0.4 * len(want)  # most tokens came from accepted proposals


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{", "not JSON"),
        ('{"method": "ngram", "num_speculative_tokens": 3, "lookahead": 2}', "unknown keys lookahead"),
        ('{"method": "eagle", "model": "x", "num_speculative_tokens": 3}', "'eagle' is not supported"),
        ('{"method": "ngram"}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2}', "above"),
        ('{"method": "draft_model", "num_speculative_tokens": 3}', "needs a model"),
        ('{"num_speculative_tokens": 3}', "give a method"),
        ('{"model": "/d", "num_speculative_tokens": 3, "prompt_lookup_max": 3}', "apply to method ngram"),
    ],
)
def test_bad_configs_are_refused_by_name(models, config, message):
    target, _ = models
    with pytest.raises(ConfigError, match=message):
        LLM(model=str(target), speculative_config=config, **OPTIONS)


def test_a_draft_model_of_another_vocabulary_is_refused(models, tmp_path):
    target, _ = models
    other = write_tiny_model(tmp_path / "other-vocab", "llama", vocab_size=300)
    config = {"method": "draft_model", "model": str(other), "num_speculative_tokens": 2}
    with pytest.raises(ConfigError, match="vocabulary"):
        LLM(model=str(target), speculative_config=json.dumps(config), **OPTIONS)


def test_adapters_speculate_with_their_own_tokens(models, tmp_path):
    """Requests of two LoRA adapters and the base in one batch: each gets the tokens it gets
    without speculation (the verify pass runs each position with its row's adapter)."""
    from lora_adapters import write_adapter

    from stepserve import LoRARequest

    target, _ = models
    adapters = [
        LoRARequest(name, i + 1, str(write_adapter(target, tmp_path / name, name, seed=i)))
        for i, name in enumerate(("attn-r8", "all-r16-rslora"))
    ]
    options = dict(enable_lora=True, max_loras=2, max_lora_rank=16, **OPTIONS)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    loras = [adapters[0], None, adapters[1], adapters[0]]
    plain = LLM(model=str(target), **options)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, greedy, lora_request=loras)]
    base = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, greedy)]
    spec = LLM(model=str(target), speculative_config=json.dumps(NGRAM), **options)
    got = [o.outputs[0].token_ids for o in spec.generate(PROMPTS, greedy, lora_request=loras)]
    assert got == want
    assert want[0] != base[0] and want[2] != base[2]  # the adapters really change the answers
    assert spec.core.scheduler.spec_counters.num_drafts > 0


def test_metrics_carry_vllms_spec_decode_counters(models):
    from stepserve.server.metrics import ServerMetrics

    target, _ = models
    spec = LLM(model=str(target), speculative_config=json.dumps(NGRAM), **OPTIONS)
    spec.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    counters = spec.core.scheduler.spec_counters
    text = ServerMetrics("m", spec.core.stats, compat="vllm").render().decode()
    for prefix in ("stepserve:", "vllm:"):
        assert f'{prefix}spec_decode_num_drafts_total{{model_name="m"}} {float(counters.num_drafts)}' in text
        assert (
            f'{prefix}spec_decode_num_draft_tokens_total{{model_name="m"}} {float(counters.num_draft_tokens)}' in text
        )
        accepted = float(counters.num_accepted_tokens)
        assert f'{prefix}spec_decode_num_accepted_tokens_total{{model_name="m"}} {accepted}' in text
        for position, count in enumerate(counters.accepted_per_pos):
            line = f'{prefix}spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="{position}"}}'
            assert f"{line} {float(count)}" in text
    assert counters.num_drafts > 0
    plain = ServerMetrics("m", LLM(model=str(target), **OPTIONS).core.stats).render().decode()
    assert "spec_decode" not in plain


@pytest.mark.parametrize("family", ["mistral", "gemma2", "qwen3-moe"])
def test_other_families_keep_their_tokens(family, tmp_path):
    """A model whose every layer has a sliding window (its blocks behind the window go back as it
    advances), one that mixes windowed and full layers, and a mixture of experts."""
    from tiny_models import write_tiny_family

    model = write_tiny_family(tmp_path / family, family, seed=5)
    prompts = [p * 2 for p in PROMPTS]  # longer than the window
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    options = dict(num_blocks=96, block_size=4, **OPTIONS)
    want = _tokens(LLM(model=str(model), **options), prompts, greedy)
    spec = LLM(model=str(model), speculative_config=NGRAM, **options)
    assert _tokens(spec, prompts, greedy) == want
    assert spec.core.scheduler.spec_counters.num_drafts > 0
    assert spec.core.scheduler.blocks.num_free_blocks == spec.core.scheduler.blocks.num_usable_blocks


def test_a_served_model_speculates_through_the_openai_client(tmp_path):
    """`stepserve serve --speculative-config` with the embedded model drafting for itself (a
    GGUF draft): the openai client's greedy chat answer is the unspeculated engine's, and the
    spec_decode counters on /metrics count every proposal as accepted."""
    import httpx
    import openai
    from live_server import read_metric, start_server

    from stepserve.checkpoint.source import embedded_model_path

    config = {"method": "draft_model", "model": str(embedded_model_path()), "num_speculative_tokens": 3}
    server = start_server(["--max-model-len", "1024", "--speculative-config", json.dumps(config)], tmp_path / "log")
    try:
        messages = [{"role": "user", "content": "Name three colours."}]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        answer = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=messages, temperature=0, max_tokens=24
        )
        want = LLM(max_model_len=1024).chat([messages], SamplingParams(temperature=0, max_tokens=24))
        assert answer.choices[0].message.content == want[0].outputs[0].text
        with httpx.Client(base_url=server.url) as http:
            drafted = read_metric(http, "stepserve:spec_decode_num_draft_tokens_total", model_name=answer.model)
            accepted = read_metric(http, "stepserve:spec_decode_num_accepted_tokens_total", model_name=answer.model)
        assert drafted > 0 and accepted == drafted
    finally:
        server.stop()
