"""The encoder core: a ``transformers`` model behind the same process, supervisor and
``CoreClient`` as the LLM engine core (it answers the same four calls: ``add_request``,
``abort``, ``step``, ``stats``). ``step()`` is cut, execute, answer: the batcher cuts a batch,
one padded forward computes it, each request gets its own ``EncoderOutput``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stepserve.config import ConfigError, SchedulerConfig
from stepserve.core.engine_core import EngineStats
from stepserve.core.outputs import TokenLogprob
from stepserve.tasks import task as T
from stepserve.tasks.batcher import Batcher
from stepserve.tasks.messages import EncoderOutput, EncoderRequest, GenerationParams
from stepserve.tasks.spec import TaskSpec

log = logging.getLogger("stepserve.tasks")

_IGNORED_MISSING = ("pooler.",)  # AutoModel's pooler is absent from *ForMaskedLM checkpoints; pooling never uses it


@dataclass(frozen=True)
class EncoderInfo:
    """Facts learned while loading (returned, never written into config)."""

    name: str  # served model name
    task: str  # the task the core computes
    device: str  # "cpu" or "cuda"
    dtype: str  # weights and activations
    load_seconds: float  # wall time to load


def _model_class(task: str):
    import transformers as tf

    return {
        T.EMBEDDING: tf.AutoModel,
        T.SEQUENCE_CLASSIFICATION: tf.AutoModelForSequenceClassification,
        T.TOKEN_CLASSIFICATION: tf.AutoModelForTokenClassification,
        T.FILL_MASK: tf.AutoModelForMaskedLM,
        T.TEXT2TEXT: tf.AutoModelForSeq2SeqLM,
    }[task]


def load_task_model(spec: TaskSpec, device: torch.device, dtype: torch.dtype):
    """The task's ``transformers`` model; a checkpoint lacking weights the task uses is refused."""
    model, loading = _model_class(spec.task).from_pretrained(spec.directory, dtype=dtype, output_loading_info=True)
    missing = [k for k in loading.get("missing_keys", ()) if not k.startswith(_IGNORED_MISSING)]
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} weights that {spec.task} needs, e.g. {sorted(missing)[:3]}")
    return model.to(device).eval()


def build_encoder_core(spec: TaskSpec, scheduler: SchedulerConfig) -> tuple[EncoderCore, EncoderInfo]:
    from stepserve.executor.builder import pick_device, pick_dtype  # the LLM engine's rules for auto

    start = time.monotonic()
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device, {"dtype": spec.checkpoint_dtype})
    model = load_task_model(spec, device, dtype)  # a decoder embedding model runs on our engine instead (decoder_pooling)
    batcher = Batcher(scheduler.max_num_seqs, scheduler.max_num_batched_tokens, spec.flags.batch_wait_ms / 1000)
    info = EncoderInfo(spec.name, spec.task, device.type, str(dtype).removeprefix("torch."), time.monotonic() - start)
    log.info("encoder core ready: %s (%s) on %s (%s) in %.1fs", info.name, info.task, info.device, info.dtype, info.load_seconds)
    return EncoderCore(model, spec, batcher, device), info


def encoder_core_factory(spec: TaskSpec, scheduler: SchedulerConfig) -> Callable[[], tuple[EncoderCore, EncoderInfo]]:
    """A picklable factory for the spawned core process."""
    return functools.partial(build_encoder_core, spec, scheduler)


class EncoderCore:
    """Batches ``EncoderRequest``s and computes them; one failing request fails alone."""

    def __init__(self, model, spec: TaskSpec, batcher: Batcher, device: torch.device) -> None:
        self.model = model
        self.spec = spec
        self.batcher = batcher
        self.device = device
        self._run = self._generate if spec.task == T.TEXT2TEXT else self._encode
        # Segment ids reach only a model that takes them (DistilBERT, ModernBERT do not).
        self._takes_types = "token_type_ids" in inspect.signature(model.forward).parameters

    @property
    def has_unfinished(self) -> bool:
        return len(self.batcher) > 0

    def add_request(self, request: EncoderRequest) -> None:
        self.batcher.add(request, time.monotonic())

    def abort(self, request_ids: Sequence[str]) -> list[EncoderOutput]:
        self.batcher.remove(request_ids)
        return []

    def stats(self) -> EngineStats:
        return EngineStats(0, len(self.batcher), 0.0, 0, 0, 0)

    def step(self) -> list[EncoderOutput]:
        batch = self.batcher.cut(time.monotonic())
        if not batch:
            time.sleep(self.batcher.wait_left(time.monotonic()))
            return []
        return self._run_isolated(batch)

    def _run_isolated(self, batch: list[EncoderRequest]) -> list[EncoderOutput]:
        """Run the batch; if it fails, run its requests alone so that only the one at fault fails."""
        try:
            return self._run(batch)
        except Exception as exc:
            if len(batch) > 1:
                return [out for request in batch for out in self._run_isolated([request])]
            log.exception("encoder request %s failed", batch[0].request_id)
            return [EncoderOutput(batch[0].request_id, finish_reason="abort", error=f"{type(exc).__name__}: {exc}")]

    # -- encoders ---------------------------------------------------------------------------

    def _pad(self, batch: Sequence[EncoderRequest]) -> dict[str, torch.Tensor]:
        """Right-padded inputs; ``token_type_ids`` only when a request brought them."""
        width = max(len(r.token_ids) for r in batch)
        ids = torch.full((len(batch), width), self.spec.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r.token_ids)] = torch.tensor(r.token_ids)
            mask[i, : len(r.token_ids)] = 1
            if r.token_type_ids is not None:
                types[i, : len(r.token_type_ids)] = torch.tensor(r.token_type_ids)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self._takes_types and any(r.token_type_ids is not None for r in batch):
            inputs["token_type_ids"] = types
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def _encode(self, batch: Sequence[EncoderRequest]) -> list[EncoderOutput]:
        inputs = self._pad(batch)
        out = self.model(**inputs)
        rows = _HEADS[self.spec.task](self.spec, out, inputs["attention_mask"], batch)
        return [EncoderOutput(r.request_id, values=v) for r, v in zip(batch, rows)]

    # -- text2text ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate(self, batch: Sequence[EncoderRequest]) -> list[EncoderOutput]:
        groups: dict[object, list[EncoderRequest]] = {}
        for r in batch:  # greedy requests with equal settings share a generate call; sampled ones run alone
            key = dataclasses.replace(r.generation, seed=None) if r.generation.temperature == 0 else r.request_id
            groups.setdefault(key, []).append(r)
        return [out for group in groups.values() for out in self._generate_group(group)]

    def _generate_group(self, group: list[EncoderRequest]) -> list[EncoderOutput]:
        g = group[0].generation
        inputs = self._pad(group)
        inputs.pop("token_type_ids", None)
        if g.seed is not None:
            torch.manual_seed(g.seed)
        stops = self._stop_ids(g)
        out = self.model.generate(**inputs, **_generate_kwargs(g, self.spec.pad_token_id, stops), return_dict_in_generate=True, output_logits=g.logprobs is not None)
        rows = out.sequences.tolist()
        return [self._finished(r, row, g, stops, out.logits, i) for i, (r, row) in enumerate(zip(group, rows))]

    def _stop_ids(self, g: GenerationParams) -> list[int]:
        """The ids that end this request: EOS (unless ignore_eos) and its stop_token_ids."""
        eos = self.model.generation_config.eos_token_id
        eos = [] if g.ignore_eos or eos is None else eos if isinstance(eos, list) else [eos]
        return list(dict.fromkeys([*eos, *g.stop_token_ids]))

    def _finished(self, request: EncoderRequest, row: list[int], g: GenerationParams, stops: list[int], logits, index: int) -> EncoderOutput:
        tokens = row[1:]  # the decoder start token is not output
        end = next((i + 1 for i, token in enumerate(tokens) if token in stops), None)
        tokens = tokens[: end or g.max_new_tokens]
        logprobs = _logprobs(logits, index, tokens, g.logprobs) if g.logprobs is not None else None
        return EncoderOutput(request.request_id, token_ids=tuple(tokens), finish_reason="stop" if end else "length", logprobs=logprobs)


class _OpenAIAdjustments:
    """A ``generate`` logits processor for what transformers lacks, in the LLM sampler's order
    and formulas: logit_bias added, then frequency and presence penalties over the tokens
    generated so far (the decoder start token is not one). transformers applies
    ``repetition_penalty`` before it."""

    def __init__(self, g: GenerationParams) -> None:
        self.bias = g.logit_bias
        self.presence, self.frequency = g.presence_penalty, g.frequency_penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.bias:
            ids, values = zip(*self.bias)
            scores = scores.index_add(1, torch.tensor(ids, device=scores.device), torch.tensor([values], dtype=scores.dtype, device=scores.device).expand(len(scores), -1))
        generated = input_ids[:, 1:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _generate_kwargs(g: GenerationParams, pad_token_id: int, stops: list[int]) -> dict:
    kwargs = {
        "max_new_tokens": g.max_new_tokens, "min_new_tokens": g.min_new_tokens, "repetition_penalty": g.repetition_penalty,
        "pad_token_id": pad_token_id, "num_beams": 1, "eos_token_id": stops or None,
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


# -- what each task takes from the model's output, per request (float32 numpy rows) ------------


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


def _embedding(spec: TaskSpec, out, mask: torch.Tensor, batch) -> list[np.ndarray]:
    pooled = pool(out.last_hidden_state, mask, spec.pooling.mode).float().cpu().numpy()
    return list(pooled)


def _sequence_logits(spec: TaskSpec, out, mask: torch.Tensor, batch) -> list[np.ndarray]:
    return list(out.logits.float().cpu().numpy())


def _token_logits(spec: TaskSpec, out, mask: torch.Tensor, batch) -> list[np.ndarray]:
    logits = out.logits.float().cpu().numpy()
    return [logits[i, : len(r.token_ids)] for i, r in enumerate(batch)]


def _mask_logits(spec: TaskSpec, out, mask: torch.Tensor, batch) -> list[np.ndarray]:
    logits = out.logits.float().cpu().numpy()
    return [logits[i, list(r.positions)] for i, r in enumerate(batch)]


_HEADS = {
    T.EMBEDDING: _embedding,
    T.SEQUENCE_CLASSIFICATION: _sequence_logits,
    T.TOKEN_CLASSIFICATION: _token_logits,
    T.FILL_MASK: _mask_logits,
}
