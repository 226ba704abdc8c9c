"""``TaskServing``: what the routes reach through ``ServingContext.tasks`` when the model serves
a task other than text generation. It owns the tokenizer with KServe's flags, turns validated
inputs into prefill-only engine requests and hands them to the one ``AsyncEngine``."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stepserve.core.outputs import ENCODER, EncoderInputs, EngineCoreRequest, GeneratedTokens
from stepserve.engine.async_engine import AsyncEngine
from stepserve.errors import InvalidRequestError
from stepserve.sampling import SamplingParams
from stepserve.tasks import task as T
from stepserve.tasks.inputs import Encoded, TaskTokenizer
from stepserve.tasks.spec import TaskSpec

# What a pooling request carries for the engine's checks: resolved, greedy, one token. Nothing
# is sampled with it: the request finishes once its input is computed.
POOLING_PARAMS = SamplingParams(temperature=0.0, max_tokens=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class TaskServing:
    spec: TaskSpec  # the task and the model facts
    tokens: TaskTokenizer  # tokenizer with KServe's flags and the input checks
    engine: AsyncEngine  # the engine's async front

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def handles_kserve(self) -> bool:
        """KServe v1/v2 answer with this task's outputs (text2text answers with generated text, as generation does)."""
        return self.task != T.TEXT2TEXT

    def require(self, tasks: Sequence[str], route: str) -> None:
        """A 400 on a route this model's task does not serve."""
        if self.task not in tasks:
            raise InvalidRequestError(
                f"{route} is not served by this model: it serves {self.task} (this route needs {' or '.join(tasks)})",
                "model",
            )

    async def run(
        self,
        prefix: str,
        encoded: Sequence[Encoded],
        positions: Sequence[tuple[int, ...]] | None = None,
        params: Sequence[SamplingParams] | None = None,
    ) -> tuple[str, list[np.ndarray | GeneratedTokens]]:
        """Compute each input: its vector or logits (float32), or with ``params`` (text2text) its
        generated tokens. ``positions`` are fill_mask's mask positions, per input."""
        request_id = new_id(prefix)
        mode = self.spec.pooling.mode if self.spec.decoder else ENCODER
        requests = [
            EngineCoreRequest(
                f"{request_id}-{i}",
                e.token_ids,
                params[i] if params is not None else POOLING_PARAMS,
                pooling=mode,
                encoder=EncoderInputs(e.token_type_ids, positions[i] if positions is not None else ()),
            )
            for i, e in enumerate(encoded)
        ]
        outputs = await self.engine.encode(request_id, requests)
        return request_id, [out.pooled for out in outputs]

    def embedding(self, values: np.ndarray, dimensions: int | None = None) -> np.ndarray:
        """The pooled vector, cut to ``dimensions`` (Matryoshka) and normalised as the model says."""
        vector = values[:dimensions] if dimensions is not None else values
        if self.spec.pooling.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)  # torch's F.normalize eps
        return vector.astype(np.float32)

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        allowed = self.spec.matryoshka
        if allowed is None:
            raise InvalidRequestError(
                f"dimensions: this model ({self.spec.name}) "
                "is not a Matryoshka model, so its embeddings cannot be shortened",
                "dimensions",
            )
        if not 1 <= dimensions <= self.spec.hidden_size:
            raise InvalidRequestError(f"dimensions={dimensions}: use 1 to {self.spec.hidden_size}", "dimensions")
        if allowed and dimensions not in allowed:
            raise InvalidRequestError(
                f"dimensions={dimensions}: this model supports {', '.join(map(str, allowed))}", "dimensions"
            )

    def cross_score(self, values: np.ndarray) -> float:
        """A cross-encoder's relevance score from its one logit."""
        logit = float(values[0])
        return 1.0 / (1.0 + np.exp(-logit)) if self.spec.score_activation == "sigmoid" else logit
