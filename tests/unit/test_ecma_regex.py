"""Regexes and JSON Schema patterns mean what ECMA-262 says (docs/structured-output.md):
``\\d`` is [0-9] (a model once wrote U+1FBF8, a Unicode "segmented digit", for a phone number),
``\\w`` and ``\\s`` are ECMA's sets, ``.`` stops at line terminators; what ECMA or a regular
language cannot express is refused with its name. Checked through llguidance itself, on a
byte-level tokenizer, and against Python's ``re`` in ASCII mode on random patterns."""

import re

import pytest
from byte_grammar import accepts
from hypothesis import given, settings
from hypothesis import strategies as st

from stepserve.structured.compiler import grammar_text
from stepserve.structured.ecma_regex import UnsupportedRegex, to_rust

SEGMENTED_ONE = "\U0001fbf8"

CASES = [
    (r"\d{3}-\d{4}", "123-4567", True),
    (r"\d{3}-\d{4}", SEGMENTED_ONE * 3 + "-1234", False),
    (r"\d", "\u0663", False),  # Arabic-Indic three
    (r"\w+", "ab_9Z", True),
    (r"\w", "é", False),
    (r"\W", "é", True),
    (r"\s", "\ufeff", True),  # ECMA's white space has the BOM...
    (r"\s", "\x85", False),  # ...and not NEL, which Unicode's has
    (r"\s", "\u2028", True),
    (r"\S", "\xa0", False),
    (r"a.b", "a\nb", False),
    (r"a.b", "a\rb", False),
    (r"a.b", "a\u2029b", False),
    (r"a.b", "aéb", True),
    (r"(?s:a.b)", "a\nb", True),
    (r"(?s:(?-s:a.b))", "a\nb", False),
    (r"[\d-z]+", "1-z", True),
    (r"[^\d]", "5", False),
    (r"[^\D]", "5", True),
    (r"[\w.]+", "a.b", True),
    (r"[\b]", "\x08", True),
    (r"[-a]", "-", True),
    (r"[a-]", "-", True),
    (r"[[]", "[", True),
    (r"[a&&b]", "&", True),
    (r"[~~]", "~", True),
    (r"[^]", "\n", True),
    (r"a{", "a{", True),
    (r"a{,2}", "a{,2}", True),
    (r"a{2}", "aa", True),
    (r"a{2,}", "aaaa", True),
    (r"a{1,2}", "aaa", False),
    (r"]", "]", True),
    (r"}", "}", True),
    (r"#", "#", True),
    (r"a b", "a b", True),
    (r"\.", ".", True),
    (r"\.", "x", False),
    (r"\/", "/", True),
    (r"\u00e9", "é", True),
    (r"\uD83D\uDE00", "😀", True),
    (r"\u{1F600}", "😀", True),
    (r"\x41", "A", True),
    (r"\cJ", "\n", True),
    (r"\0", "\x00", True),
    (r"\t\n\v\f\r", "\t\n\x0b\x0c\r", True),
    (r"(?<year>\d{4})", "2024", True),
    (r"(?:ab)+", "abab", True),
    (r"(?i:abc)", "AbC", True),
    (r"^abc$", "abc", True),
    (r"\p{L}+", "héllo", True),
    (r"\P{L}", "1", True),
    (r"a|b", "b", True),
    (r"colou?r", "color", True),
]


@pytest.mark.parametrize(("pattern", "text", "expected"), CASES)
def test_regex_constraint_matches_as_ecma_says(pattern, text, expected):
    assert accepts(grammar_text("regex", pattern), text) is expected, to_rust(pattern)


REFUSED = [
    (r"a(?=b)", "lookahead"),
    (r"a(?!b)", "lookahead"),
    (r"(?<=a)b", "lookbehind"),
    (r"(?<!a)b", "lookbehind"),
    (r"(a)\1", "backreference"),
    (r"(?<x>a)\k<x>", "backreference"),
    (r"\bfoo", "word boundary"),
    (r"a\B", "word boundary"),
    (r"(?i)abc", "(?i:...)"),
    (r"(?P<n>a)", "(?<name>...)"),
    (r"\A", r"\A is not an escape"),
    (r"\z", r"\z is not an escape"),
    (r"\uD800", "lone surrogate"),
    (r"(a", "unbalanced"),
    (r"a)", "unbalanced"),
    (r"[a", "unterminated"),
    (r"[]", "empty class"),
    (r"\x4", r"\x"),
    (r"[z-a]", "out of order"),
    (r"\p", r"\p"),
    ("a\\", "backslash"),
]


@pytest.mark.parametrize(("pattern", "named"), REFUSED)
def test_what_cannot_be_honoured_is_refused_by_name(pattern, named):
    with pytest.raises(UnsupportedRegex) as err:
        to_rust(pattern)
    assert named in str(err.value)
    with pytest.raises(ValueError) as err:
        grammar_text("regex", pattern)
    assert named in str(err.value)


def test_schema_patterns_are_ecma_and_unanchored():
    """JSON Schema's ``pattern`` searches (is not anchored) and is ECMA-262 too."""
    schema = {"type": "string", "pattern": r"\d{2}"}
    grammar = grammar_text("json", schema)
    assert accepts(grammar, '"ab12cd"')
    assert not accepts(grammar, f'"{SEGMENTED_ONE * 2}"')
    anchored = grammar_text("json", {"type": "string", "pattern": r"^\d{2}$"})
    assert accepts(anchored, '"12"') and not accepts(anchored, '"123"')


def test_pattern_properties_keys_and_nested_patterns_are_rewritten():
    schema = {
        "type": "object",
        "patternProperties": {r"^x\d$": {"type": "string", "pattern": r"^\w+$"}},
        "additionalProperties": False,
    }
    grammar = grammar_text("json", schema)
    assert accepts(grammar, '{"x1":"ab"}')
    assert not accepts(grammar, f'{{"x{SEGMENTED_ONE}":"ab"}}')
    assert not accepts(grammar, '{"x1":"é"}')


def test_a_bad_schema_pattern_names_its_place():
    schema = {"type": "object", "properties": {"phone": {"type": "string", "pattern": r"(?=\d)"}}}
    with pytest.raises(ValueError, match="/properties/phone/pattern.*lookahead"):
        grammar_text("json", schema)


def test_values_are_data_not_patterns():
    """``const``/``enum``/``default`` values are never rewritten, even under a key named pattern."""
    schema = {"type": "object", "properties": {"pattern": {"const": r"\d"}}, "required": ["pattern"]}
    assert accepts(grammar_text("json", schema), r'{"pattern":"\\d"}')


# -- random patterns against Python's re in ASCII mode ------------------------------------
# On these atoms and texts (no \r, no Unicode spaces) Python's ASCII-mode ``re`` and ECMA-262 agree.

ATOMS = ["a", "b", "1", "-", "é", r"\d", r"\D", r"\w", r"\W", r"\s", r"\S", ".", "[a-c]", r"[^\d]", r"[\w-]", r"\."]
ALPHABET = ["a", "b", "c", "1", "9", "-", "_", " ", "\t", "\n", ".", "é", SEGMENTED_ONE, "\u0663"]


def _piece(draw_atom, quant):
    return draw_atom + quant


pieces = st.builds(_piece, st.sampled_from(ATOMS), st.sampled_from(["", "?", "*", "+", "{1,2}"]))
branches = st.lists(pieces, min_size=1, max_size=4).map("".join)
patterns = st.lists(branches, min_size=1, max_size=3).map("|".join)


@settings(max_examples=150, deadline=None)
@given(pattern=patterns, texts=st.lists(st.lists(st.sampled_from(ALPHABET), max_size=5).map("".join), max_size=6))
def test_random_patterns_agree_with_ascii_re(pattern, texts):
    grammar = grammar_text("regex", pattern)
    compiled = re.compile(pattern, re.ASCII)
    for text in texts:
        assert accepts(grammar, text) is bool(compiled.fullmatch(text)), (pattern, text, to_rust(pattern))
