"""The worker of an encoder model (BERT family, RoBERTa, T5...): a ``transformers`` model behind
the same ``EngineCore`` as the decoders. The scheduler hands it whole inputs (``ENCODER``
requests are never chunked); one padded forward computes a pass, and each request's result
goes back in ``ModelRunnerOutput.pooled``: the pooled vector, the class, token or mask logits,
or a text2text request's generated tokens. A pass that raises is re-run request by request by
the core, so one bad request fails alone (docs/architecture.md, invariant 2)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stepserve.config import ConfigError
from stepserve.core.outputs import GeneratedTokens, ModelRunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprob
from stepserve.sampling import SamplingParams

log = logging.getLogger("stepserve.engine")

_IGNORED_MISSING = ("pooler.",)  # AutoModel's pooler is absent from *ForMaskedLM checkpoints; pooling never uses it

# What the runner computes for each request, by the model's head.
POOLED, SEQUENCE_LOGITS, TOKEN_LOGITS, MASK_LOGITS, GENERATE = (
    "pooled",
    "sequence_logits",
    "token_logits",
    "mask_logits",
    "generate",
)
HEADS = (POOLED, SEQUENCE_LOGITS, TOKEN_LOGITS, MASK_LOGITS, GENERATE)


@dataclass(frozen=True)
class EncoderSpec:
    """What the encoder runner needs to know about its model (resolved by the task front)."""

    head: str  # one of HEADS
    directory: str  # the model directory
    pad_token_id: int  # filler for padded batch rows
    pooling: str  # POOLED: "mean", "cls", "max" or "last" over the final hidden states
    dtype: str  # --dtype as given
    device: str  # --device as given
    checkpoint_dtype: str  # config.json's dtype, for --dtype auto


def _model_class(head: str):
    import transformers as tf

    return {
        POOLED: tf.AutoModel,
        SEQUENCE_LOGITS: tf.AutoModelForSequenceClassification,
        TOKEN_LOGITS: tf.AutoModelForTokenClassification,
        MASK_LOGITS: tf.AutoModelForMaskedLM,
        GENERATE: tf.AutoModelForSeq2SeqLM,
    }[head]


def load_encoder_model(spec: EncoderSpec, device: torch.device, dtype: torch.dtype):
    """The head's ``transformers`` model; a checkpoint lacking weights the head uses is refused."""
    model, loading = _model_class(spec.head).from_pretrained(spec.directory, dtype=dtype, output_loading_info=True)
    missing = [k for k in loading.get("missing_keys", ()) if not k.startswith(_IGNORED_MISSING)]
    if missing:
        raise ConfigError(
            f"the checkpoint lacks {len(missing)} weights that its task needs, e.g. {sorted(missing)[:3]}"
        )
    return model.to(device).eval()


class EncoderRunner:
    """Computes ``ENCODER`` requests, each whole; the ``Worker`` an encoder's ``EngineCore`` drives."""

    def __init__(self, model, spec: EncoderSpec, device: torch.device) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self._run = self._generate if spec.head == GENERATE else self._encode
        # Segment ids reach only a model that takes them (DistilBERT, ModernBERT do not).
        self._takes_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        batch = [s for s in sched.requests if s.sample]  # always all of them: inputs are scheduled whole
        results = self._run(batch) if batch else []
        return ModelRunnerOutput(((),) * len(sched.requests), pooled={s.request_id: r for s, r in zip(batch, results)})

    def reseed(self, seed: int) -> None:
        torch.manual_seed(seed)

    # -- encoders ---------------------------------------------------------------------------

    def _pad(self, batch: Sequence[ScheduledRequest]) -> dict[str, torch.Tensor]:
        """Right-padded inputs; ``token_type_ids`` only when a request brought them."""
        width = max(len(r.token_ids) for r in batch)
        ids = torch.full((len(batch), width), self.spec.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r.token_ids)] = torch.tensor(list(r.token_ids))
            mask[i, : len(r.token_ids)] = 1
            if _types(r) is not None:
                types[i, : len(_types(r))] = torch.tensor(_types(r))
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self._takes_types and any(_types(r) is not None for r in batch):
            inputs["token_type_ids"] = types
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def _encode(self, batch: Sequence[ScheduledRequest]) -> list[np.ndarray]:
        inputs = self._pad(batch)
        out = self.model(**inputs)
        return _HEADS[self.spec.head](self.spec, out, inputs["attention_mask"], batch)

    # -- text2text ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate(self, batch: Sequence[ScheduledRequest]) -> list[GeneratedTokens]:
        groups: dict[object, list[int]] = {}
        for i, r in enumerate(
            batch
        ):  # greedy requests with equal settings share a generate call; sampled ones run alone
            key = dataclasses.replace(r.params, seed=None) if r.params.temperature == 0 else r.request_id
            groups.setdefault(key, []).append(i)
        results: list[GeneratedTokens | None] = [None] * len(batch)
        for rows in groups.values():
            for i, result in zip(rows, self._generate_group([batch[i] for i in rows])):
                results[i] = result
        return results

    def _generate_group(self, group: list[ScheduledRequest]) -> list[GeneratedTokens]:
        g = group[0].params
        inputs = self._pad(group)
        inputs.pop("token_type_ids", None)
        if g.seed is not None:
            torch.manual_seed(g.seed)
        stops = self._stop_ids(g)
        out = self.model.generate(
            **inputs,
            **_generate_kwargs(g, self.spec.pad_token_id, stops),
            return_dict_in_generate=True,
            output_logits=g.logprobs is not None,
        )
        rows = out.sequences.tolist()
        return [self._finished(r, row, g, stops, out.logits, i) for i, (r, row) in enumerate(zip(group, rows))]

    def _stop_ids(self, g: SamplingParams) -> list[int]:
        """The ids that end this request: EOS (unless ignore_eos) and its stop_token_ids."""
        eos = self.model.generation_config.eos_token_id
        eos = [] if g.ignore_eos or eos is None else eos if isinstance(eos, list) else [eos]
        return list(dict.fromkeys([*eos, *g.stop_token_ids]))

    def _finished(
        self, request: ScheduledRequest, row: list[int], g: SamplingParams, stops: list[int], logits, index: int
    ) -> GeneratedTokens:
        tokens = row[1:]  # the decoder start token is not output
        end = next((i + 1 for i, token in enumerate(tokens) if token in stops), None)
        tokens = tokens[: end or g.max_tokens]
        logprobs = _logprobs(logits, index, tokens, g.logprobs) if g.logprobs is not None else None
        return GeneratedTokens(tuple(tokens), "stop" if end else "length", logprobs)


class _OpenAIAdjustments:
    """A ``generate`` logits processor for what transformers lacks, in the LLM sampler's order
    and formulas: logit_bias added, then frequency and presence penalties over the tokens
    generated so far (the decoder start token is not one). transformers applies
    ``repetition_penalty`` before it."""

    def __init__(self, g: SamplingParams) -> None:
        self.bias = g.logit_bias
        self.presence, self.frequency = g.presence_penalty, g.frequency_penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.bias:
            ids, values = zip(*self.bias)
            scores = scores.index_add(
                1,
                torch.tensor(ids, device=scores.device),
                torch.tensor([values], dtype=scores.dtype, device=scores.device).expand(len(scores), -1),
            )
        generated = input_ids[:, 1:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _generate_kwargs(g: SamplingParams, pad_token_id: int, stops: list[int]) -> dict:
    kwargs = {
        "max_new_tokens": g.max_tokens,
        "min_new_tokens": g.min_tokens,
        "repetition_penalty": g.repetition_penalty,
        "pad_token_id": pad_token_id,
        "num_beams": 1,
        "eos_token_id": stops or None,
    }
    if g.logit_bias or g.presence_penalty or g.frequency_penalty:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([_OpenAIAdjustments(g)])
    if g.temperature == 0:
        return kwargs | {"do_sample": False}
    sampled = {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k or None}
    return kwargs | sampled | ({"min_p": g.min_p} if g.min_p > 0 else {})


def _logprobs(logits, index: int, tokens: list[int], k: int) -> tuple[TokenLogprob, ...]:
    """Each generated token's log-probability under the model's raw logits (before penalties
    and temperature, as the LLM path reports them) and its ``k`` most likely alternatives."""
    out = []
    for step, token in enumerate(tokens):
        logprobs = logits[step][index].float().log_softmax(dim=-1)
        values, ids = logprobs.topk(max(k, 1))
        out.append(TokenLogprob(token, float(logprobs[token]), tuple(zip(ids[:k].tolist(), values[:k].tolist()))))
    return tuple(out)


# -- what each head takes from the model's output, per request (float32 numpy rows) ------------


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' pooling formulas over right-padded rows."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(1).values
    if mode == "cls":
        return hidden[:, 0]
    return hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]  # "last"


def _embedding(spec: EncoderSpec, out, mask: torch.Tensor, batch) -> list[np.ndarray]:
    pooled = pool(out.last_hidden_state, mask, spec.pooling).float().cpu().numpy()
    return list(pooled)


def _sequence_logits(spec: EncoderSpec, out, mask: torch.Tensor, batch) -> list[np.ndarray]:
    return list(out.logits.float().cpu().numpy())


def _token_logits(spec: EncoderSpec, out, mask: torch.Tensor, batch) -> list[np.ndarray]:
    logits = out.logits.float().cpu().numpy()
    return [logits[i, : len(r.token_ids)] for i, r in enumerate(batch)]


def _mask_logits(spec: EncoderSpec, out, mask: torch.Tensor, batch) -> list[np.ndarray]:
    logits = out.logits.float().cpu().numpy()
    return [logits[i, list(r.encoder.positions)] for i, r in enumerate(batch)]


_HEADS = {
    POOLED: _embedding,
    SEQUENCE_LOGITS: _sequence_logits,
    TOKEN_LOGITS: _token_logits,
    MASK_LOGITS: _mask_logits,
}


def _types(r: ScheduledRequest) -> tuple[int, ...] | None:
    return r.encoder.token_type_ids if r.encoder is not None else None
