"""Incremental detokenization: multi-byte characters and stop strings held back."""

from transformers import AutoTokenizer

from stepserve.engine.detokenizer import IncrementalDetokenizer


def stream(tokenizer, ids, stop=(), chunk=1):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt: "), stop)
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.add([], finished=True))
    return deltas, detok


def test_multibyte_characters_come_out_whole(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = "héllo wörld 日本語 🙂 done"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # byte-level: characters span several tokens
    for chunk in (1, 3, 8):
        deltas, _ = stream(tok, ids, chunk=chunk)
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def test_stop_string_is_held_back_and_not_returned(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok.encode("alpha beta ### gamma")
    deltas, detok = stream(tok, ids, stop=["###", "zzz"])
    assert "".join(deltas) == "alpha beta "
    assert detok.matched_stop == "###"
    assert all("#" not in d for d in deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok.encode("a ## b")
    deltas, detok = stream(tok, ids, stop=["###"])
    assert "".join(deltas) == "a ## b" and detok.matched_stop is None
    # each "#" was held until the next character showed it does not begin "###"
    assert deltas == ["a", " ", "", "", "## ", "b", ""]
