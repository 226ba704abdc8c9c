"""Request bodies of the OpenAI and KServe routes, and how a raw body becomes one.

Bodies are parsed by hand (``parse_body``) instead of by FastAPI, so malformed JSON and wrong
types are a 400 in the OpenAI error shape that names the parameter, never FastAPI's 422.
Range checks live in ``SamplingParams``; these models only fix the types.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictBool, StrictInt, StrictStr, ValidationError

from stepserve.errors import InvalidRequestError
from stepserve.server import json_body
from stepserve.server.fields import STRICT, UnknownFieldPolicy, unknown_fields

_SEED_BOUND = (
    2**63 - 2**20
)  # within int64 (choices get mix_seed(seed, i), a hash; the margin is left from the old seed + i)
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # what the engine's int64 tensors hold

Model = TypeVar("Model", bound=BaseModel)


class _Body(BaseModel):
    # Unknown fields are kept aside so that ``validate`` can name them in a 400 (or, with
    # --allow-unknown-fields, log and ignore them as vLLM does): see server/fields.py.
    model_config = ConfigDict(extra="allow", frozen=True)


class StreamOptions(_Body):
    include_usage: StrictBool = False  # send a final chunk with usage


class JsonSchemaFormat(_Body):
    name: str | None = None  # the schema's name (OpenAI requires it; only reported back)
    description: str | None = None  # what the answer is for
    schema_: dict | None = Field(default=None, alias="schema")  # the JSON schema the answer follows
    strict: StrictBool | None = None  # enforced either way; true also closes objects (additionalProperties false)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # needed by type=json_schema


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    json_: dict | str | None = Field(default=None, alias="json")  # a JSON schema
    regex: str | None = None  # a regular expression (Rust regex syntax)
    choice: list[str] | None = None  # the answer is one of these strings
    grammar: str | None = None  # a Lark or GBNF grammar
    json_object: StrictBool | None = None  # any JSON object


class _StructuredFields(_Body):
    """Output constraints, on completions and chat (OpenAI's and vLLM's spellings)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    prompt_logprobs: int | None = None  # vLLM: logprobs of the prompt tokens (with this many alternatives)


class _SamplingFields(_StructuredFields):
    """Sampling parameters shared by completions, chat and the KServe ``parameters``."""

    model: str | None = None
    max_tokens: Int64 | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    n: int = Field(default=1, ge=1, le=128)
    best_of: Int64 | None = None  # accepted only equal to n (vLLM V1 has no best_of > n)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-_SEED_BOUND, le=_SEED_BOUND)
    presence_penalty: FiniteFloat = 0.0
    frequency_penalty: FiniteFloat = 0.0
    logit_bias: dict[str, FiniteFloat] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: Int64 = 0
    min_p: FiniteFloat = 0.0
    repetition_penalty: FiniteFloat = 1.0
    ignore_eos: StrictBool = False
    min_tokens: Int64 = 0
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: StrictBool = True
    # OpenAI's advisory fields: accepted, and they change nothing in the output
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[Int64] | list[list[Int64]]
    logprobs: Int64 | None = None  # top alternatives per token
    echo: StrictBool = False  # return the prompt before the completion
    suffix: str | None = None  # not supported; refused when set


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    # An assistant message replayed from a response (the openai client's message.model_dump())
    # carries these as null; a value would not reach the chat template, so it is refused.
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: StrictBool | None = None  # arguments are enforced (and closed) when the call is forced, either way


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Int64 | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: StrictBool = False  # return the chosen tokens' logprobs
    top_logprobs: Int64 | None = None  # alternatives per token, needs logprobs
    add_generation_prompt: StrictBool = True  # end the template with the assistant's turn
    chat_template_kwargs: dict | None = None  # extra template variables (Qwen3's enable_thinking), as vLLM
    tools: list[ToolDef] | None = None  # functions the model may call
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: StrictBool = True  # more than one call per answer


class LoraAdapterRequest(_Body):
    """``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, as vLLM spells them."""

    lora_name: str
    lora_path: str | None = None  # required to load


class KServeV2Tensor(_Body):
    name: str
    shape: list[int]
    datatype: str
    data: list
    parameters: dict = Field(default_factory=dict)  # e.g. content_type, binary_data_size


class KServeV2RequestedOutput(_Body):
    name: str
    parameters: dict = Field(default_factory=dict)  # e.g. binary_data (KServe's client sends it)


class KServeV2Request(_Body):
    id: str | None = None
    model_name: str | None = None  # KServe's InferRequest.to_rest sends it
    inputs: list[KServeV2Tensor]
    outputs: list[KServeV2RequestedOutput] | None = None  # the outputs wanted; default: all
    parameters: dict = Field(default_factory=dict)


class KServeV1Request(_Body):
    instances: list[str | dict]
    parameters: dict = Field(default_factory=dict)


def decode_json(raw: bytes) -> dict:
    """The body as a JSON object within depth and size limits, or a 400 (see ``json_body``)."""
    return json_body.loads(raw)


def validate(model: type[Model], body: dict, unknown: UnknownFieldPolicy = STRICT, prefix: str = "") -> Model:
    """``model`` built from ``body``, or a 400 naming the first bad top-level field; fields no
    model declares are a 400 too unless ``unknown`` allows them. ``prefix`` is where ``body``
    sits in the request (``parameters.``), for the error messages."""
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequestError(f"{where}: {first['msg']} (parameter={param})", param=param) from None
    unknown.check(unknown_fields(req, prefix))
    return req


def parse_body(model: type[Model], raw: bytes, unknown: UnknownFieldPolicy = STRICT) -> Model:
    return validate(model, decode_json(raw), unknown)


# -- the pooling routes (OpenAI embeddings, vLLM/Cohere rerank and score) --------------------


class EmbeddingRequest(_Body):
    model: str | None = None
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None  # Matryoshka models only
    user: str | None = None
    truncate_prompt_tokens: StrictInt | None = None  # vLLM: keep the first k tokens (-1: max_model_len)


class RerankDocument(_Body):
    text: StrictStr


class RerankRequest(_Body):
    model: str | None = None
    query: StrictStr
    documents: list[StrictStr | RerankDocument]
    top_n: StrictInt | None = None  # the best n results; None or 0: all
    return_documents: StrictBool = True  # echo each document's text in its result
    truncate_prompt_tokens: StrictInt | None = None


class ScoreRequest(_Body):
    model: str | None = None
    text_1: StrictStr | list[StrictStr]
    text_2: StrictStr | list[StrictStr]
    truncate_prompt_tokens: StrictInt | None = None
