"""Embeddings from decoder models (Qwen3-Embedding and the like) on stepserve's own engine.

Each input becomes a prefill-only pooling request of the engine core: it goes through the
scheduler like any prompt (continuous batching, chunked prefill past
``--max-num-batched-tokens``, prefix-cache hits, preemption), finishes after its last prompt
chunk without sampling, and comes back with its pooled final hidden state
(``EngineCoreOutput.pooled``; the folding is ``worker/pooling.py``). ``PoolingCore`` speaks the
encoder core's messages to the task front and the engine core's to the engine, so the task
front, its supervisor, readiness and metrics are the ones every task uses. Pure Python: the
engine is built by ``engine.builder`` inside the core process.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

from stepserve.config import EngineConfig
from stepserve.core.engine_core import EngineCore, EngineStats
from stepserve.core.outputs import EngineCoreOutput, EngineCoreRequest
from stepserve.sampling import SamplingParams
from stepserve.tasks.messages import EncoderOutput, EncoderRequest
from stepserve.tasks.spec import TaskSpec

# What a pooling request carries for the engine's checks: resolved, greedy, one token. Nothing
# is sampled with it: the request finishes once its prompt is computed.
POOLING_PARAMS = SamplingParams(temperature=0.0, max_tokens=1)


class PoolingCore:
    """An ``EngineCore`` answering ``EncoderRequest``s with pooled vectors (the encoder core's four calls)."""

    def __init__(self, core: EngineCore, mode: str) -> None:
        self.core = core
        self.mode = mode  # the sentence-transformers pooling: "last", "mean", "cls" or "max"

    @property
    def has_unfinished(self) -> bool:
        return self.core.has_unfinished

    def add_request(self, request: EncoderRequest) -> None:
        self.core.add_request(EngineCoreRequest(request.request_id, request.token_ids, POOLING_PARAMS, request.arrival_time, pooling=self.mode))

    def abort(self, request_ids: Sequence[str]) -> list[EncoderOutput]:
        self.core.abort(request_ids)  # the front has forgotten them: nothing to answer
        return []

    def stats(self) -> EngineStats:
        return self.core.stats()

    def step(self) -> list[EncoderOutput]:
        return [_answer(out) for out in self.core.step() if out.finished]


def _answer(out: EngineCoreOutput) -> EncoderOutput:
    if out.error is not None or out.pooled is None:
        return EncoderOutput(out.request_id, finish_reason="abort", error=out.error or f"the request finished without a vector ({out.finish_reason})")
    return EncoderOutput(out.request_id, values=out.pooled)


def build_pooling_core(spec: TaskSpec, engine: EngineConfig) -> tuple[PoolingCore, object]:
    """The engine for the checkpoint (the builder refuses what the model registry cannot
    compute), run at the task's input limit; no tokenizer: the front holds it."""
    from stepserve.engine.builder import build_engine
    from stepserve.models.loader import open_checkpoint

    model = dataclasses.replace(engine.model, max_model_len=spec.max_model_len)
    weights = None if model.load_format == "dummy" else with_head(open_checkpoint(model.model).weights())
    core, _, info = build_engine(dataclasses.replace(engine, model=model), weights, eos_token_ids=frozenset())
    return PoolingCore(core, spec.pooling.mode), info


def with_head(weights: Iterator[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """The checkpoint's weights, plus the embedding as a stand-in ``lm_head`` when there is none:
    sentence-transformers saves a decoder's base model only (Qwen3-Embedding's untied sizes have
    no head), pooling never reads the head, and the loader wants every parameter filled. A tied
    model skips it."""
    embedding, has_head = None, False
    for name, tensor in weights:
        short = name.removeprefix("model.")
        has_head |= short == "lm_head.weight"
        if short == "embed_tokens.weight":
            embedding = tensor
        yield name, tensor
    if not has_head and embedding is not None:
        yield "lm_head.weight", embedding


def pooling_core_factory(spec: TaskSpec, engine: EngineConfig) -> Callable[[], tuple[PoolingCore, object]]:
    """A picklable factory for the spawned core process."""
    return functools.partial(build_pooling_core, spec, engine)
