"""Sampler edges that mutation testing (`make mutate`) found untested: the penalties on explicit
logits against transformers' processor and the formula, the min_tokens mask at the edges of the
vocabulary and across steps, exact top-p and min-p ties, and where each draw's noise comes from."""

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from stepserve.core.outputs import ScheduledRequest
from stepserve.sampling import SamplingParams
from stepserve.worker import sampler as S

V = 8


def batch_of(params, prompt=(1, 2), outputs=(), eos=(7,), shared=None):
    ids = list(prompt) + list(outputs)
    requests = [ScheduledRequest(f"r{i}", ids, 0, len(ids), [], p, len(prompt), True, 1) for i, p in enumerate(params)]
    return S.build_sampling_batch(requests, eos, V, torch.device("cpu"), shared)


def test_penalties_on_explicit_logits():
    logits = torch.tensor([[2.5, 0.5, -1.5, 0.0, 3.0, -0.5, 1.0, 0.25]])
    prompt, outputs = (1, 2), (3, 5, 5, 6)
    sp = SamplingParams(
        repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2, logit_bias={4: -1.0, 0: 2.0}
    )
    got = S.apply_logits_processors(logits, batch_of([sp], prompt, outputs))
    biased = logits + torch.tensor([[2.0, 0, 0, 0, -1.0, 0, 0, 0]])
    want = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([list(prompt) + list(outputs)]), biased.clone())
    for token, count in {3: 1, 5: 2, 6: 1}.items():  # OpenAI's formula over the generated tokens
        want[0, token] -= count * 0.2 + 0.3
    assert torch.allclose(got, want, atol=1e-6)


def test_min_tokens_mask_edges_and_steps():
    sp = SamplingParams(min_tokens=2, stop_token_ids=[0, V, 3])  # V is past the vocabulary: ignored
    batch = batch_of([sp, sp.replace(ignore_eos=True)], outputs=())
    logits = torch.zeros(2, V)
    masked = torch.isinf(S.apply_logits_processors(logits, batch))
    assert masked[0].nonzero().flatten().tolist() == [0, 3, 7]  # stop ids and EOS
    assert masked[1].nonzero().flatten().tolist() == [0, 3]  # EOS is no stop with ignore_eos
    S.advance(batch, torch.tensor([1, 1]))
    assert torch.isinf(S.apply_logits_processors(logits, batch)).any()  # 1 output of 2 so far
    S.advance(batch, torch.tensor([1, 1]))
    assert not torch.isinf(S.apply_logits_processors(logits, batch)).any()
    late = batch_of([sp], outputs=(4, 4))  # a pass that starts after min_tokens outputs
    assert not torch.isinf(S.apply_logits_processors(logits[:1], late)).any()


def test_exact_top_p_and_min_p_ties():
    uniform = torch.zeros(1, 4)  # p = 0.25 each, exactly
    probs = S.sampling_probs(uniform, batch_of([SamplingParams(top_p=0.5)]))
    assert (probs > 0).sum() == 2  # as transformers' TopPLogitsWarper(0.5): two tokens reach 0.5
    peaked = torch.tensor([[1.0, 3.0, 2.0, 3.0]])
    probs = S.sampling_probs(peaked, batch_of([SamplingParams(min_p=1.0)]))
    assert (probs > 0).nonzero()[:, 1].tolist() == [1, 3]  # min_p = 1 keeps the most likely only


def test_noise_sources():
    logits = torch.zeros(64, 16)  # uniform: the noise alone picks the token
    params = [SamplingParams(temperature=1.0)] * 64
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the engine's own generator must decide, not torch's global one
        runs.append(S.sample(logits, batch_of(params, shared=torch.Generator().manual_seed(5))))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], S.sample(logits, batch_of(params, shared=torch.Generator().manual_seed(6))))
    seeded = batch_of([SamplingParams(temperature=1.0, seed=11)], outputs=(1,) * 3)
    steps = []
    for _ in range(12):
        steps.append(int(S.sample(logits[:1], seeded)))
        S.advance(seeded, torch.tensor([steps[-1]]))
    assert len(set(steps)) > 3  # each output token gets its own noise
    again = batch_of([SamplingParams(temperature=1.0, seed=11)], outputs=(1,) * 8)  # starts at output 5
    assert int(S.sample(logits[:1], again)) == steps[5]


def test_options_that_one_request_alone_turns_on():
    logits = torch.tensor([[0.5, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert (S.sampling_probs(logits, batch_of([SamplingParams(top_k=1)])) > 0).nonzero()[:, 1].tolist() == [7]
    assert torch.isinf(S.apply_logits_processors(logits, batch_of([SamplingParams(min_tokens=1)])))[0, 7]  # EOS
    sp = SamplingParams(logit_bias=[(5, 1.0), (5, 2.0), (V, 50.0)])  # repeated ids add up; V is past the vocabulary
    assert S.apply_logits_processors(logits, batch_of([sp]))[0].tolist() == [0.5, 2.0, 1.0, 0.0, 0.0, 3.0, 0.0, 3.0]


M64 = (1 << 64) - 1


GOLDEN = 0x9E3779B97F4A7C15


def mix64(z: int) -> int:
    """splitmix64's finalizer in Python integers (the reference)."""
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_seeded_noise_is_splitmix64_of_the_seed_and_output_index():
    from stepserve.sampling import mix_seed

    key = mix_seed(99, -1)
    token_key = mix64(key + mix64(3 * GOLDEN))  # output index 2
    words = [mix64(token_key + (i + 1) * GOLDEN) for i in range(V)]  # splitmix64's outputs 1..V
    batch = batch_of([SamplingParams(temperature=1.0, seed=99)], outputs=(3, 3))  # samples output 2
    got = S.noise_words(batch.noise_keys, batch.noise_index, V)
    assert [w & M64 for w in got[0].tolist()] == words
    uniforms = torch.tensor([((w >> 41) + 0.5) / 2**23 for w in words], dtype=torch.float64)
    noise = S.exponential_noise(batch.noise_keys, batch.noise_index, V)[0]
    assert torch.allclose(noise.double(), -uniforms.log(), rtol=1e-6)
    logits = torch.zeros(1, V)
    assert int(S.sample(logits, batch)) == int((1 / -uniforms.log()).argmax())


def test_noise_is_uniform_and_independent_across_entries_rows_and_steps():
    """Kolmogorov-Smirnov of 2**20 uniforms against U(0, 1), and no correlation between
    neighbouring vocabulary entries, neighbouring seeds or consecutive output tokens."""
    keys = torch.tensor([S.noise_key(s) for s in range(64)])
    words = S.noise_words(keys, torch.zeros(64, dtype=torch.long), 1 << 14)
    u = (S._shr(words, 64 - S.NOISE_BITS).double() + 0.5) / 2**S.NOISE_BITS
    flat = u.flatten().sort().values
    n = flat.numel()
    ks = (flat - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max()
    assert ks < 1.63 / n**0.5  # the 1% critical value
    later = S.noise_words(keys, torch.ones(64, dtype=torch.long), 1 << 14)
    u_later = (S._shr(later, 64 - S.NOISE_BITS).double() + 0.5) / 2**S.NOISE_BITS
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:]), (u, u_later)):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(r) < 4 / a.numel() ** 0.5, r
