"""Request bodies of the pooling routes (OpenAI embeddings, vLLM/Cohere rerank and score),
on the server's ``_Body`` so they follow its unknown-field policy."""

from __future__ import annotations

from typing import Literal

from pydantic import StrictInt, StrictStr, StrictBool

from stepserve.server.schemas import _Body


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
