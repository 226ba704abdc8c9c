"""Incremental detokenization: multi-byte characters, spacing, special tokens and stop strings
held back, against one ``decode`` of the same tokens where that is the reference."""

import pytest
from transformers import AutoTokenizer

from stepserve.engine.detokenizer import IncrementalDetokenizer
from tiny_models import save_byte_tokenizer


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """The tiny models' byte-level tokenizer alone (no weights to write)."""
    directory = tmp_path_factory.mktemp("byte-tokenizer")
    save_byte_tokenizer(directory)
    return directory


def stream(tokenizer, ids, stop=(), chunk=1):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt: "), stop)
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.add([], finished=True))
    return deltas, detok


def test_multibyte_characters_come_out_whole(byte_tokenizer):
    tok = AutoTokenizer.from_pretrained(byte_tokenizer)
    text = "héllo wörld 日本語 🙂 done"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # byte-level: characters span several tokens
    for chunk in (1, 3, 8):
        deltas, _ = stream(tok, ids, chunk=chunk)
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def test_stop_string_is_held_back_and_not_returned(byte_tokenizer):
    tok = AutoTokenizer.from_pretrained(byte_tokenizer)
    ids = tok.encode("alpha beta ### gamma")
    deltas, detok = stream(tok, ids, stop=["###", "zzz"])
    assert "".join(deltas) == "alpha beta "
    assert detok.matched_stop == "###"
    assert all("#" not in d for d in deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_complete(byte_tokenizer):
    tok = AutoTokenizer.from_pretrained(byte_tokenizer)
    ids = tok.encode("a ## b")
    deltas, detok = stream(tok, ids, stop=["###"])
    assert "".join(deltas) == "a ## b" and detok.matched_stop is None
    # each "#" was held until the next character showed it does not begin "###"
    assert deltas == ["a", " ", "", "", "## ", "b", ""]


def deltas_of(tokenizer, prompt, outputs, **options):
    """Feed ``outputs`` (lists of token ids, one call each), then finish; the deltas in order."""
    detok = IncrementalDetokenizer(tokenizer, prompt, **options)
    deltas = [detok.add(ids) for ids in outputs]
    deltas.append(detok.add([], finished=True))
    return deltas, detok


def sentencepiece_style():
    """A word-level vocabulary with SentencePiece's ``▁`` for spaces (Llama 2, Mistral, Gemma):
    decoding drops the first token's leading space, so the first output token needs context."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "▁hello", "▁world", "▁again", "▁x##y##z", "##", "▁stop"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_first_token_keeps_its_space_after_a_one_token_prompt():
    tok = sentencepiece_style()
    prompt, out = tok.encode("again", add_special_tokens=False), tok.encode("hello world", add_special_tokens=False)
    assert len(prompt) == 1 and tok.decode(out[:1]) == "hello"  # alone, the space is gone
    deltas, _ = deltas_of(tok, prompt, [[t] for t in out])
    assert deltas == [" hello", " world", ""]


def test_a_skipped_special_token_keeps_the_context_of_the_next_one():
    tok = sentencepiece_style()
    hello, eos, world = tok.convert_tokens_to_ids(["▁hello", "</s>", "▁world"])
    deltas, _ = deltas_of(tok, tok.encode("again", add_special_tokens=False), [[hello], [eos], [world]])
    assert "".join(deltas) == " hello world" and deltas[1] == ""
    kept, _ = deltas_of(tok, [], [[hello, eos, world]], skip_special_tokens=False)
    assert "".join(kept) == "hello</s> world"


def test_special_tokens_are_left_out_by_default(byte_tokenizer):
    tok = AutoTokenizer.from_pretrained(byte_tokenizer)
    ids = tok.encode("ok") + [tok.convert_tokens_to_ids("<|im_end|>")] + tok.encode("!")
    assert "".join(deltas_of(tok, [], [ids])[0]) == "ok!"
    assert "".join(deltas_of(tok, [], [ids], skip_special_tokens=False)[0]) == "ok<|im_end|>!"


def test_a_stop_token_id_passed_with_skip_last_is_not_text(byte_tokenizer):
    tok = AutoTokenizer.from_pretrained(byte_tokenizer)
    ids = tok.encode("abc;")  # ";" plays a stop token id: a plain token, not a special one
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids[:1]) == "a"
    assert detok.add(ids[1:], skip_last=True) == "bc"
    assert detok.add([], finished=True) == "" and detok.text == "abc"
    assert IncrementalDetokenizer(tok, []).add([], skip_last=True) == ""


def test_finishing_flushes_what_was_held_and_equals_one_decode(byte_tokenizer):
    """At the end, the deltas add up to one decode of every output token: an incomplete last
    character (a length cut) comes out as U+FFFD, a held partial stop string comes out."""
    tok = AutoTokenizer.from_pretrained(byte_tokenizer)
    cut = tok.encode("hi é")[:-1]  # the last character's first byte only
    deltas, detok = deltas_of(tok, tok.encode("x"), [[t] for t in cut])
    assert deltas[-1] == "\ufffd" and "".join(deltas) == tok.decode(cut) == "hi \ufffd"
    held = tok.encode("a ##")
    deltas, detok = deltas_of(tok, [], [[t] for t in held], stop=["###"])
    assert deltas[-1] == "##" and "".join(deltas) == "a ##" and detok.matched_stop is None


def test_stop_string_at_the_very_start_and_twice_in_one_token(byte_tokenizer):
    tok = AutoTokenizer.from_pretrained(byte_tokenizer)
    deltas, detok = deltas_of(tok, [], [[t] for t in tok.encode("### gamma")], stop=["###"])
    assert "".join(deltas) == "" and detok.matched_stop == "###" and detok.text == ""
    sp = sentencepiece_style()
    deltas, detok = deltas_of(sp, [], [sp.encode("x##y##z stop", add_special_tokens=False)], stop=["##"])
    assert "".join(deltas) == "x" and detok.matched_stop == "##"  # cut at the first of two


def test_a_character_split_between_prompt_and_output_is_no_replacement_char(byte_tokenizer):
    """The prompt ends with a character's first byte and the output starts with the rest: that
    character belongs to the prompt; the output's text starts after it, with no U+FFFD."""
    tok = AutoTokenizer.from_pretrained(byte_tokenizer)
    ids = tok.encode("éx")
    deltas, _ = deltas_of(tok, ids[:1], [[t] for t in ids[1:]])
    assert "".join(deltas) == "x"
