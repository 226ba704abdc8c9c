"""Typed messages between the task front and the encoder core (either side of the pipe)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stepserve.core.outputs import TokenLogprob


@dataclass(frozen=True)
class GenerationParams:
    """text2text: how ``transformers`` ``generate`` runs one request (resolved by the front)."""

    max_new_tokens: int  # resolved max_tokens
    min_new_tokens: int  # min_tokens
    temperature: float  # 0 is greedy
    top_p: float  # nucleus mass
    top_k: int  # 0 keeps all
    repetition_penalty: float  # 1 is none (transformers' rule, over the decoder's tokens)
    seed: int | None  # a sampled request's seed
    min_p: float = 0.0  # drop tokens below min_p * p(most likely); 0 is none
    presence_penalty: float = 0.0  # subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence in the tokens generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # ids that end the request like EOS
    ignore_eos: bool = False  # EOS does not end the request
    logprobs: int | None = None  # alternatives per generated token; None: no logprobs


@dataclass(frozen=True)
class EncoderRequest:
    """One sequence (or one pair, already joined by the tokenizer) for the encoder core."""

    request_id: str  # unique among in-flight requests
    token_ids: tuple[int, ...]  # the tokenized input, never empty, within max_model_len
    token_type_ids: tuple[int, ...] | None = None  # segment ids when the tokenizer gives them
    positions: tuple[int, ...] = ()  # fill_mask: the positions whose logits come back
    generation: GenerationParams | None = None  # text2text only
    arrival_time: float = 0.0  # time.monotonic() at the front


@dataclass(frozen=True)
class EncoderOutput:
    """The result of one ``EncoderRequest``; exactly one of ``values``/``token_ids``/``error`` is set."""

    request_id: str  # the request it answers
    values: np.ndarray | None = None  # float32: pooled vector, class logits, per-token logits or mask logits
    token_ids: tuple[int, ...] = ()  # text2text: generated ids, without the decoder start token
    finish_reason: str | None = "stop"  # text2text: "stop" (EOS) or "length"
    logprobs: tuple[TokenLogprob, ...] | None = None  # text2text: one per generated token, when asked
    error: str | None = None  # why the core failed this request
