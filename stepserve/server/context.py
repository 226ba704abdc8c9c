"""What every route needs: the engine, the tokenizer, the served name, the limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from stepserve.engine.async_engine import AsyncEngine
from stepserve.errors import InvalidRequestError, ModelNotFoundError
from stepserve.checkpoint.generation_config import SamplingDefaults
from stepserve.server.config import ServerConfig
from stepserve.server.fields import UnknownFieldPolicy
from stepserve.server.lora import LoraRegistry
from stepserve.core.outputs import LoraRef
from stepserve.structured.compiler import GrammarCompiler


@dataclass(frozen=True)
class ServingContext:
    engine: AsyncEngine  # the async front of the engine
    tokenizer: object  # the model's transformers tokenizer
    model_name: str  # the name clients use
    max_model_len: int  # the context length in use
    vocab_size: int  # token ids must be below this
    config: ServerConfig  # max_tokens defaults and limits
    sampling_defaults: SamplingDefaults = SamplingDefaults()  # the model's, for fields a request leaves out
    unknown: UnknownFieldPolicy = field(default_factory=UnknownFieldPolicy)  # refuse, or log once and ignore
    tasks: object | None = None  # tasks.serving.TaskServing when the model serves an encoder task
    grammars: GrammarCompiler | None = None  # checks and caches output constraints; None: refused
    thinking_markers: tuple[int, int] | None = None  # --reasoning-parser's start and end token ids
    loras: LoraRegistry | None = None  # the LoRA adapters served; None: none can be

    def adapter(self, name: str | None) -> LoraRef | None:
        """The adapter a request's ``model`` names; None for the base model (any of its names);
        404 for another."""
        if name is None or name in self.model_names:
            return None
        ref = self.loras.get(name) if self.loras is not None else None
        if ref is None:
            raise ModelNotFoundError(name, [*self.model_names, *(self.loras.names if self.loras else [])])
        return ref

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name of the base model: ``model_name`` first (the one responses carry), then
        ``--model_aliases`` (vLLM's further ``--served-model-name`` names)."""
        return (self.model_name, *self.config.model_aliases)

    def check_model(self, name: str | None, adapters: bool = True) -> None:
        """Refuse a request for another model (404); an omitted model means this one. An adapter's
        name passes where ``adapters`` (generation routes), else it is a 400."""
        if self.adapter(name) is not None and not adapters:
            raise InvalidRequestError(f"model {name!r} is a LoRA adapter; adapters serve text generation", "model")

    def check_token_ids(self, ids, param: str) -> None:
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise InvalidRequestError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})", param)

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
