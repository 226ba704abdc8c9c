"""SamplingParams and the one function that resolves ``max_tokens`` (docs/architecture.md, invariant 1).

The front end builds a ``SamplingParams`` from what the user sent, then calls
``SamplingParams.resolve`` once the prompt length is known. Only resolved params enter the
engine: ``max_tokens`` is then an int and every field the engine computes with is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from stepserve.errors import InvalidRequestError


GRAMMAR_KINDS = ("json", "json_object", "regex", "choice", "grammar", "tool_calls")


@dataclass(frozen=True)
class GrammarSpec:
    """An output constraint checked and compiled by the front end (``structured.compiler``); the
    core builds its matcher from ``grammar`` (compiled once per distinct text in each process,
    then copied per request)."""

    kind: str  # one of GRAMMAR_KINDS: what the user asked for, for logs and errors
    grammar: str  # llguidance's grammar text (a JSON document), the cache key on both sides
    # The constraint starts after the first output token with this id (the end of a reasoning
    # model's thinking: docs/responses-and-messages.md); None: from the first output token.
    after: int | None = None

    def opened(self, output_ids) -> bool:
        """Whether the constraint holds after ``output_ids`` (the gate token is among them)."""
        return self.after is None or self.after in output_ids


MAX_LOGPROBS = 20
_GREEDY_EPS = 1e-5


def _fail(param: str, message: str) -> None:
    raise InvalidRequestError(f"{message} (parameter={param})", param=param)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(param: str, value: object, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(param, f"{param} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(param, f"{param} must be at least {minimum}, got {value}")


def _check_range(param: str, value: object, low: float, high: float, *, open_low: bool = False) -> None:
    if not _is_number(value) or not math.isfinite(value):
        _fail(param, f"{param} must be a finite number, got {value!r}")
    below = value <= low if open_low else value < low
    if below or value > high:
        bracket = "(" if open_low else "["
        _fail(param, f"{param} must be in {bracket}{low}, {high}], got {value}")


def _as_stop(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    for item in items:
        if not isinstance(item, str) or not item:
            _fail("stop", f"stop must be a non-empty string or a list of them, got {item!r}")
    return items


def _as_logit_bias(bias: Mapping | Iterable | None) -> tuple[tuple[int, float], ...]:
    if bias is None:
        return ()
    pairs = bias.items() if isinstance(bias, Mapping) else bias
    out = []
    for token, value in pairs:
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            _fail("logit_bias", f"logit_bias keys must be token ids, got {token!r}")
        _check_range("logit_bias", value, -100.0, 100.0)
        out.append((token_id, float(value)))
    return tuple(out)


def mix_seed(seed: int, index: int) -> int:
    """A seed in [0, 2**63) (what every torch generator takes) that hashes ``seed`` with ``index``.

    Unlike ``seed + index``, neighbouring seeds share nothing: (900, 1) and (901, 0) give
    unrelated streams. Used for the choices of an ``n > 1`` request and for each output token.
    """
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request, with vLLM's field names and meanings.

    ``max_tokens=None`` means "as many as the context allows" until ``resolve`` fills it in.
    """

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    min_p: float = 0.0  # drop tokens below min_p * p(most likely)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides (or multiplies) logits of prompt+generated tokens
    seed: int | None = None  # per-request seed (any int); None uses the engine's generator
    stop: tuple[str, ...] = ()  # stop strings; matched text is not returned
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the request like EOS
    ignore_eos: bool = False  # keep going past EOS
    max_tokens: int | None = None  # new tokens at most; None until resolved
    min_tokens: int = 0  # EOS and stop tokens are masked before this many tokens
    logprobs: int | None = None  # number of top alternatives to return with each token
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    skip_special_tokens: bool = True  # leave special tokens out of the text
    structured: GrammarSpec | None = None  # output constraint checked by the front end; None: free text
    prompt_logprobs: int | None = None  # logprobs of the prompt tokens, with this many alternatives; None: none

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("stop", _as_stop(self.stop))
        set_("stop_token_ids", tuple(self.stop_token_ids or ()))
        set_("logit_bias", _as_logit_bias(self.logit_bias))
        if _is_number(self.temperature) and self.temperature < _GREEDY_EPS and self.temperature >= 0:
            set_("temperature", 0.0)
        if self.top_k == -1:
            set_("top_k", 0)
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, 1)
        _check_range("temperature", self.temperature, 0.0, 100.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, open_low=True)
        _check_int("top_k", self.top_k, 0)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 2.0, open_low=True)
        if self.seed is not None:
            _check_int("seed", self.seed)
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, 0)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", f"min_tokens={self.min_tokens} must not exceed max_tokens={self.max_tokens}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
            if self.logprobs > MAX_LOGPROBS:
                _fail("logprobs", f"logprobs must be at most {MAX_LOGPROBS}, got {self.logprobs}")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0)
            if self.prompt_logprobs > MAX_LOGPROBS:
                _fail("prompt_logprobs", f"prompt_logprobs must be at most {MAX_LOGPROBS}, got {self.prompt_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_resolved(self) -> bool:
        """True once ``max_tokens`` is an int: the only state the engine accepts."""
        return isinstance(self.max_tokens, int)

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def for_choice(self, index: int) -> SamplingParams:
        """The params of choice ``index`` of an ``n > 1`` request: its own seed, mixed from ours."""
        return self if self.seed is None else self.replace(seed=mix_seed(self.seed, index))

    def resolve(
        self,
        prompt_len: int,
        max_model_len: int,
        *,
        omitted_default: int | None = None,
        default_max_tokens: int | None = None,
        max_tokens_limit: int | None = None,
    ) -> SamplingParams:
        """Return a copy with ``max_tokens`` resolved; see ``resolve_max_tokens``."""
        max_tokens = resolve_max_tokens(
            self.max_tokens,
            prompt_len,
            max_model_len,
            omitted_default=omitted_default,
            default_max_tokens=default_max_tokens,
            max_tokens_limit=max_tokens_limit,
        )
        if self.min_tokens > max_tokens:
            _fail("min_tokens", f"min_tokens={self.min_tokens} must not exceed max_tokens={max_tokens}")
        return self.replace(max_tokens=max_tokens)


def resolve_max_tokens(
    requested: int | None,
    prompt_len: int,
    max_model_len: int,
    *,
    omitted_default: int | None = None,
    default_max_tokens: int | None = None,
    max_tokens_limit: int | None = None,
) -> int:
    """Resolve the number of new tokens a request may produce (docs/architecture.md, invariant 1).

    Args:
        requested: what the user asked for, or None if they left it out.
        prompt_len: tokens in the prompt.
        max_model_len: the context length the server runs with.
        omitted_default: the route's default when omitted (16 on /v1/completions); None means
            the remaining context.
        default_max_tokens: the server's cap on an omitted value (``--default-max-tokens``).
        max_tokens_limit: the server's hard limit on a given value (``--max-tokens-limit``).

    Raises:
        InvalidRequestError: the prompt leaves no room, or the requested value is out of bounds.
    """
    _check_int("prompt", prompt_len, 1)
    room = max_model_len - prompt_len
    if room <= 0:
        _fail(
            "prompt",
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens, which leaves no room for output. Shorten the prompt",
        )
    if requested is None:
        resolved = room if omitted_default is None else min(omitted_default, room)
        if default_max_tokens is not None:
            resolved = min(resolved, default_max_tokens)
        return resolved
    _check_int("max_tokens", requested, 1)
    if requested > room:
        _fail(
            "max_tokens",
            f"max_tokens={requested} is too large: the prompt has {prompt_len} tokens and this "
            f"model's maximum context length is {max_model_len}, so at most {room} can be generated",
        )
    if max_tokens_limit is not None and requested > max_tokens_limit:
        _fail("max_tokens", f"max_tokens={requested} exceeds this server's limit of {max_tokens_limit}")
    return requested
