"""GrammarPass.mask (the byte-table bias) against a token-by-token reading of the bitmask."""

import math

import pytest
import torch

from stepserve.structured.bitmask import GrammarMatchers, GrammarPass

VOCAB = 77  # not a multiple of 32: the last word is partly past the vocabulary
EOS = (3, 63)  # 63: bit 31 of a word, the sign bit of int32


class _Matchers(GrammarMatchers):
    """The real owner with its masks given: ``fill`` returns the bitmask the test chose."""

    def __init__(self, bits: torch.Tensor) -> None:
        super().__init__(lambda: None, VOCAB, EOS, torch.device("cpu"))
        self.bits = bits

    def fill(self, matchers):
        return self.bits.clone()


def _allowed(bits: torch.Tensor, row: int) -> list[bool]:
    words = bits[row].tolist()
    return [bool((words[t // 32] >> (t % 32)) & 1) for t in range(VOCAB)]


def _random_bits(rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (rows, math.ceil(VOCAB / 32)), generator=gen, dtype=torch.int64).to(
        torch.int32
    )
    bits[:, -1] &= (1 << (VOCAB % 32)) - 1  # llguidance sets no bit past the vocabulary
    return bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_mask_matches_the_bitmask_token_by_token(seed, dtype):
    batch, rows = 6, [0, 2, 3, 5]
    bits = _random_bits(len(rows), seed)
    bits[1] = 0  # a matcher that allows nothing: EOS only
    gen = torch.Generator().manual_seed(100 + seed)
    raw = torch.randn(batch, VOCAB, generator=gen).to(dtype)
    logits = raw.clone()
    logits[rows[2]] = float("-inf")  # processors left this row nothing: the grammar wins over them
    owner = _Matchers(bits)
    out = GrammarPass(owner, rows, [None] * len(rows), [1] * len(rows)).mask(logits, raw)
    assert out.dtype == dtype
    for i in range(batch):
        if i not in rows:
            assert torch.equal(out[i], logits[i])  # unconstrained rows are untouched
            continue
        k = rows.index(i)
        allowed = [t in EOS for t in range(VOCAB)] if k == 1 else _allowed(bits, k)
        source = raw[i] if k == 2 else logits[i]
        for t in range(VOCAB):
            assert out[i, t].item() == (source[t].item() if allowed[t] else float("-inf")), (i, t)


def test_the_sign_bit_of_a_word_allows_its_token():
    bits = torch.zeros(1, math.ceil(VOCAB / 32), dtype=torch.int32)
    bits[0, 0] = -(2**31)  # only bit 31: token 31
    out = GrammarPass(_Matchers(bits), [0], [None], [1]).mask(torch.zeros(1, VOCAB), torch.zeros(1, VOCAB))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [31]
