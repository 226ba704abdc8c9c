"""llguidance over a byte-level tokenizer (one token per byte, and EOS): whether a grammar
accepts a text exactly, independent of any model's tokenization."""

import llguidance

EOS = 256


class _Bytes:
    eos_token_id = EOS
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids = [EOS]

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))


def accepts(grammar: str, text: str) -> bool:
    """True when ``grammar`` (llguidance's text) takes ``text`` whole and may end there."""
    matcher = llguidance.LLMatcher(TOKENIZER, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(matcher.get_error())
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()
