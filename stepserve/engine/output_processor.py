"""Front-side state of each request: detokenization, stop strings, accumulated outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from stepserve.core.outputs import EngineCoreOutput, TokenLogprob
from stepserve.engine.detokenizer import IncrementalDetokenizer
from stepserve.sampling import SamplingParams


@dataclass
class CompletionOutput:
    """One of a request's ``n`` completions (vLLM's shape)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    """The result of one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = True
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None first (no logprob for token 0), when asked


@dataclass(frozen=True)
class Delta:
    """What one completion gained in one engine step, ready for a stream."""

    text: str  # new text, safe to show
    token_ids: tuple[int, ...]  # new tokens
    logprobs: tuple[TokenLogprob, ...]  # their logprobs, when requested
    finish_reason: str | None  # set on the last delta
    error: str | None = None  # set when the engine aborted the request


@dataclass
class RequestState:
    """Accumulates one completion's outputs; decides when a stop string ends it."""

    request_id: str
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the prompt's, once the first output brings them

    @classmethod
    def create(cls, request_id: str, index: int, params: SamplingParams, tokenizer, prompt_token_ids) -> RequestState:
        detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens)
        return cls(request_id, index, params, detok, num_prompt_tokens=len(prompt_token_ids))

    def update(self, out: EngineCoreOutput) -> tuple[Delta, bool]:
        """Apply one engine output; returns the delta and whether the core must abort the
        request (a stop string matched while the engine would go on)."""
        self.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = [None, *out.prompt_logprobs]
        stopped_before = self.detokenizer.matched_stop is not None
        text = self.detokenizer.add(out.new_token_ids, finished=out.finished, skip_last=out.stop_token_id is not None)
        # Tokens after a stop string are dropped, however many one engine step brought (a
        # multi-step or speculative pass brings several): the output is the same either way.
        new_ids, new_logprobs = out.new_token_ids, out.new_logprobs or ()
        if stopped_before:
            new_ids, new_logprobs = (), ()
        elif self.detokenizer.matched_stop is not None:
            new_ids, new_logprobs = new_ids[: self.detokenizer.stop_index], new_logprobs[: self.detokenizer.stop_index]
        self.token_ids.extend(new_ids)
        self.logprobs.extend(new_logprobs)
        self.text += text
        must_abort = False
        if self.detokenizer.matched_stop is not None:
            must_abort = not out.finished
            self.finish_reason, self.stop_reason = "stop", self.detokenizer.matched_stop
        elif out.finished:
            self.finish_reason, self.stop_reason, self.error = out.finish_reason, out.stop_token_id, out.error
        delta = Delta(text, tuple(new_ids), tuple(new_logprobs), self.finish_reason, self.error)
        return delta, must_abort

    def completion(self) -> CompletionOutput:
        logprobs = self.logprobs if self.params.logprobs is not None else None
        return CompletionOutput(
            self.index, self.text, list(self.token_ids), self.finish_reason, logprobs, self.stop_reason
        )
