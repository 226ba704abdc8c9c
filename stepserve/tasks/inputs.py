"""Text and token ids in, validated task inputs out (``Encoded``, for ``serving``): every bad input is a 400
naming its field before the core sees it (docs/architecture.md, invariant 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stepserve.errors import InvalidRequestError
from stepserve.tasks.spec import TaskSpec


@dataclass(frozen=True)
class Encoded:
    """One tokenized input."""

    token_ids: tuple[int, ...]  # what the model reads
    token_type_ids: tuple[int, ...] | None  # segment ids, when the tokenizer gives them
    offsets: tuple[tuple[int, int], ...] | None = None  # character span of each token, when asked


def resolve_truncation(value: int | None, max_model_len: int) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: None keeps all (too long is a 400), -1 means max_model_len."""
    if value is None:
        return None
    if value == -1:
        return max_model_len
    if not 1 <= value <= max_model_len:
        raise InvalidRequestError(
            f"truncate_prompt_tokens={value}: use -1 or 1 to {max_model_len}", "truncate_prompt_tokens"
        )
    return value


class TaskTokenizer:
    """The model's tokenizer with KServe's flags applied, and the length and vocabulary checks."""

    def __init__(self, tokenizer, spec: TaskSpec) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.add_special_tokens = not spec.flags.disable_special_tokens
        self.return_token_type_ids = True if spec.flags.return_token_type_ids else None

    def text(
        self, text: str, where: str, param: str, truncate: int | None, pair: str | None = None, offsets: bool = False
    ) -> Encoded:
        """``where`` names the input in messages (``input[2]``); ``param`` is the field."""
        if not text or (pair is not None and not pair):
            raise InvalidRequestError(f"{where} must not be an empty string", param)
        enc = self.tokenizer(
            text,
            pair,
            add_special_tokens=self.add_special_tokens,
            return_token_type_ids=self.return_token_type_ids,
            return_offsets_mapping=offsets,
            truncation=truncate is not None,
            max_length=truncate,
        )
        ids = tuple(enc["input_ids"])
        self._check_length(ids, where, param)
        types = tuple(enc["token_type_ids"]) if "token_type_ids" in enc else None
        spans = tuple(tuple(span) for span in enc["offset_mapping"]) if offsets else None
        return Encoded(ids, types, spans)

    def ids(self, ids: Sequence[int], where: str, param: str, truncate: int | None) -> Encoded:
        if not ids:
            raise InvalidRequestError(f"{where} must not be an empty list of token ids", param)
        for token in ids:
            if not 0 <= token < self.spec.vocab_size:
                raise InvalidRequestError(
                    f"{where}: token id {token} is outside the vocabulary [0, {self.spec.vocab_size})", param
                )
        kept = tuple(ids[:truncate] if truncate is not None else ids)
        self._check_length(kept, where, param)
        return Encoded(kept, None)

    def _check_length(self, ids: tuple[int, ...], where: str, param: str) -> None:
        limit = self.spec.max_model_len
        if len(ids) > limit:
            raise InvalidRequestError(
                f"{where} has {len(ids)} tokens, more than this model's maximum input length of {limit}; "
                "shorten it or set truncate_prompt_tokens",
                param,
            )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
