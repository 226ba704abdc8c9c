"""Reasoning parsers (docs/responses-and-messages.md): a reasoning model's thinking split from
its answer, whole and streamed at every cut (markers split across pieces), for both parsers and
every place the prompt may leave the thinking; then tool calls read from the answer after it,
streamed pieces reassembling into the whole answer."""

import json

import pytest

from stepserve.server.answer import AnswerStream, CallArguments, CallStart, ContentPiece, ReasoningPiece, Thinking
from stepserve.server.answer import final_answer, reasoning_tokens
from stepserve.server.tool_calls import ToolMode
from stepserve.structured.reasoning import PARSERS, ReasoningSplitter, prompt_state, split

CASES = [
    # parser, prompt state, text, (reasoning, content)
    ("qwen3", "none", "<think>\nLet me see.\n</think>\n\nParis.", ("\nLet me see.\n", "Paris.")),
    ("qwen3", "none", "Paris.", (None, "Paris.")),
    ("qwen3", "none", "  <think>a</think>b", ("a", "b")),
    ("qwen3", "none", "<think>still thinking", ("still thinking", None)),
    ("qwen3", "none", "<thin", (None, "<thin")),
    ("qwen3", "none", "a < b </think", (None, "a < b </think")),
    ("qwen3", "closed", "Paris.", (None, "Paris.")),
    ("qwen3", "inside", "hmm</think>\n\nParis.", ("hmm", "Paris.")),
    ("qwen3", "none", "<think></think>\n\n", (None, None)),
    ("deepseek_r1", "none", "hmm</think>Paris.", ("hmm", "Paris.")),
    ("deepseek_r1", "none", "still thinking", ("still thinking", None)),
    ("deepseek_r1", "none", "<think>hmm</think>Paris.", ("hmm", "Paris.")),
    ("deepseek_r1", "closed", "Paris.", (None, "Paris.")),
    ("deepseek_r1", "inside", "a </thin k</think>b", ("a </thin k", "b")),
]


@pytest.mark.parametrize(("parser", "state", "text", "want"), CASES)
def test_whole_and_streamed_at_every_cut_agree(parser, state, text, want):
    assert split(PARSERS[parser], text, state) == want
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], list(text)):
            splitter = ReasoningSplitter(PARSERS[parser], state)
            got = [splitter.feed(p) for p in pieces] + [splitter.finish()]
            reasoning, content = "".join(r for r, _ in got), "".join(c for _, c in got)
            assert (reasoning or None, content or None) == want, (cut, pieces)


def test_prompt_state_reads_the_last_marker():
    assert prompt_state([1, 2, 3], 7, 8) == "none"
    assert prompt_state([7, 1], 7, 8) == "inside"
    assert prompt_state([7, 1, 8, 2], 7, 8) == "closed"
    assert prompt_state([7, 8, 7], 7, 8) == "inside"


def test_reasoning_tokens_count_to_the_end_marker():
    thinking = Thinking("qwen3", "none", end_token_id=8)
    assert reasoning_tokens(thinking, [7, 1, 2, 8, 3, 4], ended=True) == 4
    assert reasoning_tokens(thinking, [7, 1, 2], ended=False) == 3
    assert reasoning_tokens(thinking, [3, 4], ended=True) == 0
    assert reasoning_tokens(None, [7, 1, 8], ended=True) == 0


ARGS = '{"city": "Paris"}'
AUTO_TEXT = "<think>Need weather.</think>\n\n<tool_call>\n" + json.dumps({"name": "w", "arguments": {"city": "Paris"}})
AUTO_TEXT += "\n</tool_call>"


@pytest.mark.parametrize(
    ("mode", "text", "reasoning", "content", "calls"),
    [
        (ToolMode("auto", parser="hermes"), AUTO_TEXT, "Need weather.", None, [("w", ARGS)]),
        (ToolMode("auto", parser="hermes"), "<think>x</think>Just text.", "x", "Just text.", []),
        (ToolMode("named", name="w"), "<think>x</think>" + ARGS, "x", None, [("w", ARGS)]),
        (ToolMode("required"), '<think>x</think>[{"name": "w", "arguments": ' + ARGS + "}]", "x", None, [("w", ARGS)]),
        (ToolMode("named", name="w"), "<think>cut while thin", "cut while thin", None, []),
        (ToolMode("none"), "<think>x</think>y", "x", "y", []),
    ],
)
def test_tool_calls_are_read_after_the_thinking(mode, text, reasoning, content, calls):
    thinking = Thinking("qwen3")
    answer = final_answer(mode, thinking, text, (), "stop")
    assert (answer.reasoning, answer.content) == (reasoning, content)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in answer.calls] == calls
    assert answer.finish_reason == ("tool_calls" if calls else "stop")
    for cut in range(len(text) + 1):
        stream = AnswerStream(mode, thinking)
        pieces = stream.feed(text[:cut]) + stream.feed(text[cut:])
        more, finish_reason = stream.finish("stop")
        pieces += more
        assert finish_reason == answer.finish_reason
        assert "".join(p.text for p in pieces if isinstance(p, ReasoningPiece)) == (reasoning or "")
        assert "".join(p.text for p in pieces if isinstance(p, ContentPiece)) == (content or "")
        names = [p.name for p in pieces if isinstance(p, CallStart)]
        args = "".join(p.text for p in pieces if isinstance(p, CallArguments))
        assert [(n, args) for n in names] == calls
