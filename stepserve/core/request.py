"""The engine's view of one request: tokens, how many are computed, and the stop rule."""

from __future__ import annotations

import enum
from collections.abc import Collection

from stepserve.core.block_manager import CacheSalt
from stepserve.core.outputs import EngineCoreRequest
from stepserve.sampling import SamplingParams


PLACEHOLDER = -1  # a token an in-flight pass samples, not yet back (asynchronous scheduling)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class Request:
    """A request inside the core. There are no phases: ``num_computed_tokens`` against
    ``num_tokens`` says what is left, so prefill chunks, prefix hits and decode are one rule."""

    def __init__(self, msg: EngineCoreRequest) -> None:
        self.request_id = msg.request_id
        self.params: SamplingParams = msg.params
        self.max_tokens: int = msg.params.max_tokens  # resolved by the front end
        self.arrival_time = msg.arrival_time
        self.num_prompt_tokens = len(msg.prompt_token_ids)
        self.token_ids: list[int] = list(msg.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.num_placeholders = 0  # PLACEHOLDER tokens at the end of token_ids (see Scheduler.assume)
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_token_id: int | None = None
        self.prompt_logprobs: list | None = [] if msg.params.prompt_logprobs is not None else None  # until sent
        self.encoder = msg.encoder  # an encoder request's extra inputs, for the runner
        self.lora = msg.lora  # its LoRA adapter; None: the base model
        # Speculative decoding (core/speculative.py): the draft model's proposals for the next
        # pass, the n-gram index of the tokens, and how many tokens the request may propose.
        self.draft_token_ids: list[int] = []
        self.ngram = None  # NgramIndex, made on the first proposal
        self.draft_limit = None  # DraftLimit, likewise
        self.pooling: str | None = (
            msg.pooling
        )  # prefill-only: finishes with its pooled vector once the prompt is computed

    @property
    def prefix_salt(self) -> CacheSalt | None:
        """What the prefix cache keys this request's blocks by beside their tokens: its adapter
        (two adapters never share KV)."""
        return None if self.lora is None else CacheSalt(self.lora.id, self.lora.name)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def remaining_tokens(self) -> int:
        """New tokens this request may still produce."""
        return self.max_tokens - self.num_output_tokens

    @property
    def reads_prefix_cache(self) -> bool:
        """Whether a cached prefix may stand in for computing it: not when every prompt token's
        output is needed (prompt logprobs; mean, max and CLS pooling read each hidden state)."""
        return self.prompt_logprobs is None and self.pooling in (None, "last")

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


def _grammar_open(request: Request) -> bool:
    """Whether the output constraint held the token just appended (its gate, if it has one, came before it)."""
    spec = request.params.structured
    return spec.after is None or spec.after in request.token_ids[request.num_prompt_tokens : -1]


def check_stop(request: Request, eos_token_ids: Collection[int], max_model_len: int) -> FinishReason | None:
    """The one place that decides whether the token just appended ends the request
    (docs/architecture.md, invariant 4). EOS and stop tokens count only once ``min_tokens`` are out."""
    token = request.token_ids[-1]
    params = request.params
    if params.structured is not None and token in eos_token_ids and _grammar_open(request):
        # The grammar allows EOS only where the output is complete; its end ends the request,
        # whatever ignore_eos and min_tokens say (the grammar forbids anything after it).
        request.stop_token_id = token
        return FinishReason.STOP
    if request.num_output_tokens > params.min_tokens:  # the sampler masks them before that
        if (not params.ignore_eos and token in eos_token_ids) or token in params.stop_token_ids:
            request.stop_token_id = token
            return FinishReason.STOP
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
