"""The GPU benchmark's greedy check on made-up logprobs: stepserve passes within bf16 noise of a
float32 reference, fails past it, and tells near-ties from real differences."""

import pytest
import torch

from stepserve.bench.gpu import NOISE_FACTOR, greedy_verdict

T, V = 12, 50
NOISE = 0.02  # how far "transformers bf16" moves each chosen token's logprob


def reference() -> torch.Tensor:
    """float32 logprobs whose argmax leads the next token by 4 nats everywhere."""
    logits = torch.randn(T, V, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    logits[torch.arange(T), torch.arange(T) % V] = 5.0
    return logits.log_softmax(dim=-1)


def bf16_like(ref: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A bf16 run: each chosen token's logprob off by NOISE, alternating in sign."""
    hf = ref.clone()
    signs = torch.tensor([(-1.0) ** t for t in range(T)])
    hf[torch.arange(T), tokens] += NOISE * signs
    return hf


def argmax_tokens(ref: torch.Tensor) -> torch.Tensor:
    return ref.argmax(dim=-1)


def test_within_noise_passes():
    ref = reference()
    tokens = argmax_tokens(ref)
    ours = ref[torch.arange(T), tokens] + 0.75 * NOISE
    verdict = greedy_verdict(ref, bf16_like(ref, tokens), tokens, ours)
    assert verdict["passed"] and verdict["within_noise"]
    assert verdict["ties"] == verdict["real_differences"] == 0
    assert verdict["exact_vs_fp32_share"] == verdict["exact_argmax_share"] == 1.0
    assert verdict["noise_max"] == pytest.approx(NOISE, rel=1e-4)
    assert verdict["err_max"] == pytest.approx(0.75 * NOISE, rel=1e-4)
    assert verdict["err_max_bound"] == pytest.approx(NOISE_FACTOR * NOISE + 1e-3, rel=1e-4)


def test_logprob_far_past_bf16_noise_fails_closeness():
    ref = reference()
    tokens = argmax_tokens(ref)
    ours = ref[torch.arange(T), tokens].clone()
    ours[3] -= 0.5  # one position 25 times bf16's noise away: the same token, the wrong number
    verdict = greedy_verdict(ref, bf16_like(ref, tokens), tokens, ours)
    assert not verdict["passed"] and not verdict["within_noise"]
    assert verdict["err_max"] == pytest.approx(0.5, rel=1e-4) and verdict["err_max"] > verdict["err_max_bound"]
    assert verdict["real_differences"] == 0  # every token is still float32's argmax


def test_near_tie_choice_is_a_tie_and_passes():
    ref = reference()
    tokens = argmax_tokens(ref)
    runner_up = (tokens[5] + 1) % V
    ref[5, runner_up] = ref[5, tokens[5]] - NOISE  # within 2 x bf16 noise of the argmax
    tokens[5] = runner_up
    ours = ref[torch.arange(T), tokens]
    verdict = greedy_verdict(ref, bf16_like(ref, tokens), tokens, ours)
    assert verdict["passed"]
    assert (verdict["ties"], verdict["real_differences"]) == (1, 0)
    assert verdict["exact_vs_fp32_share"] == round((T - 1) / T, 4)
    assert verdict["first_real_difference"] is None


def test_far_from_argmax_choice_is_a_real_difference_and_fails():
    ref = reference()
    tokens = argmax_tokens(ref)
    row = 7  # request 1's position 3, with requests of 4 rows
    tokens[row] = (tokens[row] + 1) % V  # about 4 nats below the argmax
    ours = ref[torch.arange(T), tokens]  # its logprob is exact: closeness alone would not catch it
    verdict = greedy_verdict(ref, bf16_like(ref, tokens), tokens, ours, lengths=[4, 4, 4])
    assert verdict["within_noise"] and not verdict["passed"]
    assert (verdict["ties"], verdict["real_differences"]) == (0, 1)
    first = verdict["first_real_difference"]
    assert (first["request"], first["position"], first["token"]) == (1, 3, int(tokens[row]))
    assert first["gap"] > 3.0 and verdict["max_gap"] == first["gap"]


def test_bf16_flip_rate_is_reported():
    ref = reference()
    tokens = argmax_tokens(ref)
    hf = bf16_like(ref, tokens)
    hf[0, (tokens[0] + 1) % V] = hf[0, tokens[0]] + 0.01  # bf16 alone picks another token here
    verdict = greedy_verdict(ref, hf, tokens, ref[torch.arange(T), tokens])
    assert verdict["hf_bf16_vs_fp32_share"] == round((T - 1) / T, 4)
    assert verdict["exact_argmax_share"] == round((T - 1) / T, 4) and verdict["exact_vs_fp32_share"] == 1.0


def test_rows_that_disagree_are_refused():
    ref = reference()
    tokens = argmax_tokens(ref)
    with pytest.raises(ValueError, match="agree on the rows"):
        greedy_verdict(ref, ref, tokens, ref[torch.arange(T), tokens], lengths=[T - 1])
