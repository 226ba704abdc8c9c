"""The sampler against independent references, in float32: transformers' logits warpers
(TopK, TopP, MinP, Temperature), its generate(repetition_penalty=...), OpenAI's penalty formula
written out, and chi-square tests of draw frequencies (references.CHI2_ALPHA)."""

import pytest
import torch
import transformers
from references import CHI2_ALPHA, assert_logprobs_match, chi2_pvalue, hf_logits, reference_greedy, warped
from tiny_models import EOS_ID

from stepserve import LLM, SamplingParams
from stepserve.core.outputs import ScheduledRequest
from stepserve.worker import sampler as S

CONFIGS = [  # (temperature, top_k, top_p, min_p)
    (1.0, 5, 1.0, 0.0),
    (1.0, 0, 0.8, 0.0),
    (1.0, 0, 1.0, 0.1),
    (0.7, 0, 1.0, 0.0),
    (1.6, 0, 1.0, 0.0),
    (0.5, 20, 0.9, 0.0),
    (1.3, 50, 0.95, 0.05),
    (2.0, 10, 0.5, 0.2),
    (1.0, 1, 1.0, 0.0),
    (0.9, 0, 0.3, 0.3),
    (1.0, 3, 0.6, 0.02),
]
PROMPTS = ["Hello there", "zz", "The quick brown fox", "Once upon a time"]


def params(cfg, **kw) -> SamplingParams:
    t, k, p, m = cfg
    return SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, max_tokens=1, **kw)


def sampling_batch(params_list, vocab, prompt=(1, 2, 3), outputs=(), shared=None):
    ids = list(prompt) + list(outputs)
    requests = [
        ScheduledRequest(f"r{i}", ids, 0, len(ids), [], p, len(prompt), True, 1) for i, p in enumerate(params_list)
    ]
    return S.build_sampling_batch(requests, (), vocab, torch.device("cpu"), shared)


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama):
    return LLM(model=str(tiny_llama), num_blocks=1024, block_size=4, max_model_len=256)


def last_logits(llm, model, prompts) -> torch.Tensor:
    return torch.stack([hf_logits(model, llm.tokenizer.encode(p))[-1] for p in prompts])


@pytest.mark.parametrize("source", ["random", "tiny llama", "embedded"])
def test_allowed_tokens_equal_transformers_warpers(source, request):
    """Every config on every row, all in one batch: each row keeps its own parameters."""
    if source == "random":
        logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    elif source == "tiny llama":
        logits = last_logits(request.getfixturevalue("tiny_llm"), request.getfixturevalue("tiny_hf"), PROMPTS)
    else:
        logits = last_logits(
            request.getfixturevalue("embedded_f32"), request.getfixturevalue("embedded_hf"), PROMPTS[:2]
        )
    rows = [(row, cfg) for row in logits for cfg in CONFIGS]
    batch = sampling_batch([params(cfg) for _, cfg in rows], logits.shape[1])
    probs = S.sampling_probs(torch.stack([row for row, _ in rows]), batch)
    for (row, cfg), got in zip(rows, probs):
        ref = warped(row[None], *cfg)[0]
        assert torch.equal(got > 0, ref.softmax(-1) > 0), cfg  # what can be drawn at all
        # min-p leaves it unnormalized; rtol: float32 sums of a 49k vocabulary in another order (a
        # CPU's vector width) differ by about 1e-5 of the largest probability
        assert torch.allclose(got / got.sum(), ref.softmax(-1), rtol=1e-4, atol=1e-6), cfg


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[4], CONFIGS[10]])
def test_draw_frequencies_chi_square(cfg, tiny_llm, tiny_hf):
    """20,000 draws from the shared generator and 3,000 from per-row seeds, one logits row."""
    row = last_logits(tiny_llm, tiny_hf, ["The quick brown fox"])[0]
    ref = warped(row[None], *cfg)[0].softmax(-1)
    shared = torch.Generator().manual_seed(1)
    for count, seeded in ((20000, False), (3000, True)):
        batch = sampling_batch(
            [params(cfg, seed=i if seeded else None) for i in range(count)], row.numel(), shared=shared
        )
        tokens = S.sample(row.expand(count, -1).clone(), batch)
        p = chi2_pvalue(torch.bincount(tokens, minlength=row.numel()), ref)
        assert p > CHI2_ALPHA, (cfg, seeded, p)


def test_engine_draws_match_transformers_warpers(tiny_llm, tiny_hf):
    """Through the whole engine: 300 seeded choices of one token for each of three prompts,
    batched together; every token the warpers allow appears, no other, at the right rates."""
    cases = [
        ("zz", (2.0, 4, 1.0, 0.0)),
        ("The quick brown fox", (1.0, 0, 0.4, 0.0)),
        ("Hello there", (0.5, 0, 1.0, 0.15)),
    ]
    n = 300
    outs = tiny_llm.generate([p for p, _ in cases], [params(cfg, n=n, seed=5, ignore_eos=True) for _, cfg in cases])
    logits = last_logits(tiny_llm, tiny_hf, [p for p, _ in cases])
    for out, (prompt, cfg), row in zip(outs, cases, logits):
        ref = warped(row[None], *cfg)[0].softmax(-1)
        drawn = torch.tensor([c.token_ids[0] for c in out.outputs])
        counts = torch.bincount(drawn, minlength=row.numel())
        assert set(drawn.tolist()) == set(ref.nonzero().flatten().tolist()), (prompt, cfg)
        assert chi2_pvalue(counts, ref) > CHI2_ALPHA, (prompt, cfg)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_repetition_penalty_equals_transformers_generate(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    llm = LLM(model=str(model_dir), num_blocks=256, block_size=4, max_model_len=128)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, penalty in (("zz", 1.3), ("abcabcabc", 0.7), ("Once upon a time", 1.8)):
        ids = llm.tokenizer.encode(prompt)
        got = llm.generate(
            [ids], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=penalty)
        )
        want = model.generate(
            torch.tensor([ids]),
            max_new_tokens=30,
            min_new_tokens=30,
            do_sample=False,
            repetition_penalty=penalty,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
        assert got[0].outputs[0].token_ids == want, (prompt, penalty)


def test_repetition_penalty_on_the_embedded_model(embedded_f32, embedded_hf):
    ids = embedded_f32.tokenizer.encode("List the colours of the rainbow: red, orange,")
    got = embedded_f32.generate(
        [ids], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.25)
    )
    want = embedded_hf.generate(
        torch.tensor([ids]),
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        repetition_penalty=1.25,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(ids) :].tolist()
    assert got[0].outputs[0].token_ids == want


PENALTY_CASES = [
    dict(presence_penalty=1.5, frequency_penalty=0.5),
    dict(frequency_penalty=2.0),
    dict(presence_penalty=-1.0),
    dict(frequency_penalty=-0.4, presence_penalty=0.3),
    dict(logit_bias={65: 3.0, 66: -100.0, 97: 2.5}),
    dict(logit_bias={EOS_ID: 8.0}, min_tokens=6),  # EOS would win at once; forbidden for 6 tokens
    dict(
        logit_bias={EOS_ID: 8.0, 120: 9.0}, min_tokens=6, ignore_eos=True, stop_token_ids=[120]
    ),  # EOS is no stop here
    dict(logit_bias={120: 6.0, 65: 6.0}, min_tokens=4, ignore_eos=True, stop_token_ids=[120, 65]),
]


@pytest.mark.parametrize("case", PENALTY_CASES, ids=lambda c: ",".join(c))
def test_penalties_bias_min_tokens_equal_the_formula(case, tiny_llm, tiny_hf):
    stop_ids = case.get("stop_token_ids", [])
    for prompt in ("zz", "Hello there"):
        ids = tiny_llm.tokenizer.encode(prompt)
        out = tiny_llm.generate([ids], SamplingParams(temperature=0, max_tokens=24, **case))[0].outputs[0]
        want = reference_greedy(
            tiny_hf,
            ids,
            24,
            presence=case.get("presence_penalty", 0.0),
            frequency=case.get("frequency_penalty", 0.0),
            bias=case.get("logit_bias"),
            min_tokens=case.get("min_tokens", 0),
            stop_ids=stop_ids,
            eos=None if case.get("ignore_eos") else EOS_ID,
        )
        assert out.token_ids == want, (prompt, case)
        if "min_tokens" in case:
            assert len(want) > case["min_tokens"] and len(want) < 24  # it did stop, but not before min_tokens


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_offline_logprobs_equal_transformers_log_softmax(temperature, tiny_llm, tiny_hf):
    prompts = ["Hello there", "The quick brown fox"]
    sp = SamplingParams(temperature=temperature, top_k=20, seed=3, max_tokens=16, ignore_eos=True, logprobs=5)
    for prompt, out in zip(prompts, tiny_llm.generate(prompts, sp)):
        c = out.outputs[0]
        assert len(c.logprobs) == 16 and all(lp.token_id == t for lp, t in zip(c.logprobs, c.token_ids))
        assert_logprobs_match(
            tiny_hf, out.prompt_token_ids, c.token_ids, [lp.logprob for lp in c.logprobs], [lp.top for lp in c.logprobs]
        )
    chat = tiny_llm.chat([{"role": "user", "content": "Hi, who are you?"}], sp)[0]
    c = chat.outputs[0]
    assert_logprobs_match(
        tiny_hf, chat.prompt_token_ids, c.token_ids, [lp.logprob for lp in c.logprobs], [lp.top for lp in c.logprobs]
    )


def test_embedded_logprobs_and_chunked_prefill_equal_transformers(embedded_f32, embedded_hf):
    """A 136-token prompt goes through in 64-token chunks; tokens and logprobs match one pass."""
    llm = embedded_f32
    text = "The history of the city begins with a small fishing village on the river. " * 9
    ids = llm.tokenizer.encode(text)
    assert len(ids) > 2 * llm.config.scheduler.max_num_batched_tokens
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    out = llm.generate([ids], sp)[0].outputs[0]
    want = embedded_hf.generate(
        torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert out.token_ids == want[0, len(ids) :].tolist()
    assert_logprobs_match(
        embedded_hf, ids, out.token_ids, [lp.logprob for lp in out.logprobs], [lp.top for lp in out.logprobs]
    )
    chat = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], sp.replace(temperature=0.8, seed=11)
    )[0]
    c = chat.outputs[0]
    assert_logprobs_match(
        embedded_hf,
        chat.prompt_token_ids,
        c.token_ids,
        [lp.logprob for lp in c.logprobs],
        [lp.top for lp in c.logprobs],
    )
