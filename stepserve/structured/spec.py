"""What crosses from the front end to the engine core about a request's output constraint."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar", "tool_calls")


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint checked and compiled by the front end; the core builds its matcher from
    ``grammar`` (compiled once per distinct text in each process, then copied per request)."""

    kind: str  # one of KINDS: what the user asked for, for logs and errors
    grammar: str  # llguidance's grammar text (a JSON document), the cache key on both sides
