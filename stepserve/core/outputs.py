"""Typed messages that cross the engine's boundaries (front <-> core, core <-> worker)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stepserve.sampling import SamplingParams

if TYPE_CHECKING:  # only the worker makes arrays; the core passes them along untouched
    import numpy as np

ENCODER = "encoder"  # an encoder model's own output (pooled vector, class, token or mask logits, text2text tokens)
# How a prefill-only request's final hidden states become its result. A decoder pools them
# ("last", "mean", "cls", "max"); an encoder model's request is computed whole, in one pass.
POOLINGS = ("last", "mean", "cls", "max", ENCODER)


@dataclass(frozen=True)
class EncoderInputs:
    """What an encoder model's request carries besides its token ids."""

    token_type_ids: tuple[int, ...] | None = None  # segment ids, when the tokenizer gives them
    positions: tuple[int, ...] = ()  # fill_mask: the positions whose logits come back


@dataclass(frozen=True)
class GeneratedTokens:
    """A text2text request's result: the decoder's whole output, from one pass."""

    token_ids: tuple[int, ...]  # generated ids, without the decoder start token
    finish_reason: str  # "stop" (EOS or a stop token) or "length"
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per generated token, when asked


@dataclass(frozen=True)
class LoraRef:
    """A LoRA adapter a request runs with: its id (unique per adapter while the server runs; it
    keys the prefix cache and the worker's slots), name and folder (the worker loads it from
    there, in the PEFT format)."""

    id: int
    name: str
    path: str


@dataclass(frozen=True)
class EngineCoreRequest:
    """A fully resolved request, as the front end hands it to the core."""

    request_id: str  # unique among in-flight requests
    prompt_token_ids: tuple[int, ...]  # the tokenized prompt, never empty
    params: SamplingParams  # resolved: max_tokens is an int
    arrival_time: float = 0.0  # time.monotonic() when the front end received it
    pooling: str | None = None  # one of POOLINGS: a prefill-only request answered with its result; None: generation
    encoder: EncoderInputs | None = None  # an ENCODER request's segment ids and mask positions
    lora: LoraRef | None = None  # the adapter it runs with; None: the base model


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token and its most likely alternatives."""

    token_id: int  # the token that was generated
    logprob: float  # its log-probability under the model
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the top alternatives, best first
    rank: int | None = None  # 1 + how many tokens were more likely; set for prompt tokens


@dataclass(frozen=True)
class EngineCoreOutput:
    """What one request produced in one engine step: only the new tokens."""

    request_id: str  # the request these tokens belong to
    new_token_ids: tuple[int, ...]  # tokens accepted this step (after the stop check)
    new_logprobs: tuple[TokenLogprob, ...] | None = None  # one per new token when requested
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    stop_token_id: int | None = None  # the EOS or stop token that ended it, if any
    num_prompt_tokens: int = 0  # prompt length, for usage
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # why the engine aborted this request, if it did
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # prompt tokens 1.. (with the first output), when requested
    pooled: np.ndarray | GeneratedTokens | None = (
        None  # a pooling request's result (float32 array; text2text: tokens), with its finish
    )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class ScheduledRequest:
    """One request in a scheduler pass, with everything the model runner needs for it."""

    request_id: str  # the request
    token_ids: Sequence[int]  # read-only view of all its tokens so far: prompt, then outputs
    start: int  # tokens whose KV is already cached; the first position computed now
    num_new_tokens: int  # tokens whose KV the first step computes (a prefill chunk or 1)
    block_ids: Sequence[int]  # read-only view of its block table, covering every slot written
    params: SamplingParams  # how to sample it
    num_prompt_tokens: int  # where the prompt ends in token_ids (penalties tell them apart)
    sample: bool  # False while a prompt chunk stops short of the prompt's end
    num_steps: int  # tokens that may still be accepted this pass (<= the pass's num_steps)
    pooling: str | None = (
        None  # a pooling request's mode (POOLINGS): nothing is sampled; once ``sample``, its result is due
    )
    encoder: EncoderInputs | None = None  # an ENCODER request's extra inputs
    lora: LoraRef | None = None  # its adapter; None: the base model
    # Speculative decoding: tokens proposed after token_ids' last one, computed (and verified)
    # after it in this pass; num_new_tokens counts them. Empty: no proposal.
    draft_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SchedulerOutput:
    """The scheduler's decision for one pass; the model runner's only input."""

    requests: tuple[ScheduledRequest, ...]  # in batch order
    num_steps: int  # decode steps in this pass (1 whenever a prompt chunk is in it)
    finished_request_ids: tuple[str, ...] = ()  # gone since the last pass: drop their worker state
    num_batched_tokens: int = 0  # tokens computed by the first step
    num_proposals: int = 0  # tokens the worker's draft model proposes per sampled row after the pass; 0: none

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass(frozen=True)
class ModelRunnerOutput:
    """What the worker computed for one pass, aligned with ``SchedulerOutput.requests``."""

    sampled_token_ids: tuple[tuple[int, ...], ...]  # num_steps tokens per request, () when not sampled
    logprobs: tuple[tuple[TokenLogprob, ...] | None, ...] = ()  # per request, when requested
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why it failed in the worker
    prompt_logprobs: dict[str, tuple[TokenLogprob, ...]] = field(
        default_factory=dict
    )  # request id -> this chunk's prompt tokens
    pooled: dict[str, np.ndarray | GeneratedTokens] = field(
        default_factory=dict
    )  # request id -> result, for pooling requests whose prompt ended
    draft_token_ids: tuple[tuple[int, ...], ...] = ()  # per request, the draft model's proposals for the next pass


@dataclass(frozen=True)
class ModelInfo:
    """Facts learned while building the engine (returned, never written back into config); the
    core process sends them to the front once built (``CoreReady``)."""

    name: str  # default served model name
    max_model_len: int  # context length in use
    eos_token_ids: frozenset[int]  # ids that end a sequence
    num_kv_blocks: int  # KV cache blocks (one is the null block)
    device: str  # "cpu" or "cuda"
    dtype: str  # weights and activations
    quantization: str  # "none", "int4" or "fp8"
    load_seconds: float  # wall time to build the engine
