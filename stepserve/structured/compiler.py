"""Grammar compilation in the front end: request constraints become checked ``GrammarSpec``s.

Everything that can go wrong with a schema or grammar goes wrong here, as a 400 naming the
field (docs/architecture.md, invariant 1), so the engine core only ever sees grammars that compile. Checks are
bounded in time (llguidance's own resource limits, and a wall-clock timeout on top) and cached
by source text, so the same schema is compiled once.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from stepserve.errors import InvalidRequestError
from stepserve.sampling import GrammarSpec
from stepserve.structured.ecma_regex import to_rust
from stepserve.structured.json_schema import prepare_schema

MAX_SOURCE_CHARS = 65_536  # a schema or grammar longer than this is refused before compiling
COMPILE_TIMEOUT_S = 5.0  # wall-clock bound on checking one grammar
CACHE_SIZE = 512  # distinct grammars remembered
# Compact JSON (no free whitespace): a model cannot pad its answer with blanks forever.
JSON_OPTIONS = {"whitespace_flexible": False}


def build_ll_tokenizer(tokenizer, vocab_size: int, eos_token_ids: Collection[int]):
    """llguidance's view of the tokenizer; the model's vocabulary may be larger than the
    tokenizer's (ids past the tokenizer are never allowed)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))


def ll_tokenizer_in_background(
    load: Callable[[], object], vocab_size: int, eos_token_ids: Collection[int]
) -> Callable[[], object]:
    """Start building llguidance's tokenizer from ``load()``'s tokenizer in a thread of its own;
    the function returned waits for it (and raises what the build raised). Started when a
    server or engine starts, so that its first constrained request does not pay for the build
    (a second or two on the embedded model, with loading the tokenizer where that is needed)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ll-tokenizer")
    future = pool.submit(lambda: build_ll_tokenizer(load(), vocab_size, eos_token_ids))
    pool.shutdown(wait=False)
    return future.result


def grammar_text(kind: str, source: object, closed: bool = False) -> str:
    """llguidance's grammar for one request constraint; ``ValueError`` when it is malformed.
    Regexes and schema patterns are ECMA-262; ``closed`` JSON schemas take an unstated
    ``additionalProperties`` as false (``json_schema.prepare_schema``)."""
    import llguidance

    if kind == "json":
        schema = prepare_schema(source, closed)
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        if not isinstance(source, str):
            raise ValueError("a regex must be a string")
        return llguidance.LLMatcher.grammar_from_regex(to_rust(source))
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in source))
    if kind in ("grammar", "tool_calls"):
        return llguidance.grammar_from("grammar", source)  # Lark, or GBNF converted to Lark
    raise ValueError(f"unknown constraint kind {kind!r}")


class GrammarCompiler:
    """Checks request constraints against the served tokenizer; one per server."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        eos_token_ids: Collection[int],
        timeout_s: float = COMPILE_TIMEOUT_S,
        ll_tokenizer: Callable[[], object] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = frozenset(eos_token_ids)
        self._timeout_s = timeout_s
        # Waits for llguidance's tokenizer (see prepare); given when one is already built
        # in this process (the offline LLM shares its engine core's).
        self._ll_tokenizer = ll_tokenizer
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, bool, str], GrammarSpec] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")

    def prepare(self) -> None:
        """Start building llguidance's view of the tokenizer (in the background), so that the
        first request with a constraint finds it built."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = ll_tokenizer_in_background(lambda: self._tokenizer, self._vocab_size, self._eos)

    def compile(self, kind: str, source: object, param: str, closed: bool = False) -> GrammarSpec:
        """The checked constraint, or a 400 naming ``param`` that says why it cannot be used.
        ``closed``: a JSON schema's unstated ``additionalProperties`` is false."""
        key_text = source if isinstance(source, str) else json.dumps(source)
        if len(key_text) > MAX_SOURCE_CHARS:
            raise InvalidRequestError(
                f"{param} is too large ({len(key_text)} characters; at most {MAX_SOURCE_CHARS})", param
            )
        key = (kind, closed and kind == "json", key_text)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        spec = GrammarSpec(kind, self._checked(kind, source, param, closed))
        with self._lock:
            self._cache[key] = spec
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return spec

    def _checked(self, kind: str, source: object, param: str, closed: bool) -> str:
        try:
            grammar = grammar_text(kind, source, closed)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"{param} cannot be compiled: {exc}", param) from None
        future = self._pool.submit(self._validate, grammar)
        try:
            error = future.result(timeout=self._timeout_s)
        except FutureTimeout:
            raise InvalidRequestError(
                f"{param} took longer than {self._timeout_s:g}s to compile; simplify it", param
            ) from None
        if error:
            raise InvalidRequestError(f"{param} cannot be compiled: {error}", param)
        return grammar

    def _validate(self, grammar: str) -> str:
        """The first error llguidance finds ('' when none): the grammar built against the tokenizer."""
        import llguidance

        self.prepare()  # a no-op when the server started it
        ll_tokenizer = self._ll_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
        if is_error:
            return messages[0].strip() if messages else "invalid grammar"
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        return matcher.get_error() if matcher.is_error() else ""
