"""Request bodies of Anthropic's Messages API (``server/anthropic.py`` serves them), and how a
raw body becomes one: as ``schemas.py`` does for OpenAI's, an unknown field is a 400 naming it
(unless --allow-unknown-fields), and a wrong type a 400 naming its field. A string where blocks
may go is one text block, as Anthropic reads it.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, FiniteFloat, StrictBool, StrictInt, StrictStr

from stepserve.errors import InvalidRequestError
from stepserve.server.fields import UnknownFieldPolicy
from stepserve.server.schemas import _Body, decode_json, validate


def _as_blocks(value: object) -> object:
    """A string is shorthand for one text block (Anthropic's rule for content and system)."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


class CacheControl(_Body):
    """Accepted, with no effect: the prefix cache reuses every shared prefix on its own."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Body):
    type: Literal["text"]
    text: StrictStr
    cache_control: CacheControl | None = None
    citations: None = None  # a replayed answer's (this server cites nothing)


class MediaBlock(BaseModel):
    """Blocks a text model cannot read: refused whole by ``server/anthropic.py``, their fields unread."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["image", "document", "search_result", "container_upload"]


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: StrictStr
    name: StrictStr
    input: dict
    cache_control: CacheControl | None = None


ResultBlock = Annotated[TextBlock | MediaBlock, Field(discriminator="type")]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: StrictStr
    content: Annotated[list[ResultBlock], BeforeValidator(_as_blocks)] = []
    is_error: StrictBool = False  # the tool failed: its result reaches the model marked so
    cache_control: CacheControl | None = None


class ThinkingBlock(_Body):
    """An earlier turn's thinking: dropped from the prompt, as chat templates drop past reasoning."""

    type: Literal["thinking"]
    thinking: StrictStr
    signature: StrictStr | None = None


class RedactedThinkingBlock(_Body):
    type: Literal["redacted_thinking"]
    data: StrictStr


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock | MediaBlock,
    Field(discriminator="type"),
]


class Message(_Body):
    role: Literal["user", "assistant"]
    content: Annotated[list[Block], BeforeValidator(_as_blocks)]


class Tool(_Body):
    name: StrictStr
    input_schema: dict | None = None  # required: checked in ``_tools`` (server tools have none)
    description: StrictStr | None = None
    type: Literal["custom"] | None = None  # server tools are refused before validation
    strict: StrictBool | None = None  # forced calls are enforced (and closed) either way
    cache_control: CacheControl | None = None


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None  # the tool, with type=tool
    disable_parallel_tool_use: StrictBool = False


class ThinkingConfig(_Body):
    """``budget_tokens`` is a target the model is not held to, as Anthropic documents it for its
    newer models: the thinking ends when the model ends it, within ``max_tokens``."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = None  # with type=enabled: >= 1024 and < max_tokens


class Metadata(_Body):
    user_id: StrictStr | None = None  # accepted, unused: an identifier, not a behaviour


class CountTokensRequest(_Body):
    model: StrictStr
    messages: list[Message]
    system: Annotated[list[TextBlock], BeforeValidator(_as_blocks)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    cache_control: CacheControl | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: StrictInt
    stop_sequences: list[StrictStr] | None = None
    stream: StrictBool = False
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    top_k: StrictInt | None = None
    metadata: Metadata | None = None


Request = TypeVar("Request", bound=CountTokensRequest)

_REFUSED = {
    "service_tier": "there are no service tiers here: every request is served alike",
    "container": "there are no code-execution containers here",
    "mcp_servers": "this server calls no MCP servers: run the tools in the client",
}


def parse(model: type[Request], raw: bytes, unknown: UnknownFieldPolicy) -> Request:
    """The request, or a 400 naming the field; what Anthropic's API offers and this server
    cannot honour is refused before the unknown fields, even with --allow-unknown-fields."""
    body = decode_json(raw)
    for name, why in _REFUSED.items():
        if body.get(name) is not None:
            raise InvalidRequestError(f"{name} is not supported: {why} (parameter={name})", name)
    for i, tool in enumerate(body.get("tools") or ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in (None, "custom"):
            raise InvalidRequestError(
                f"tools[{i}].type={kind!r}: server tools are not available here, only custom tools "
                "(name, description, input_schema) that the client runs (parameter=tools)",
                "tools",
            )
    return validate(model, body, unknown)
