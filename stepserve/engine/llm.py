"""The offline API, shaped like vLLM's: ``LLM(...).generate(prompts, params)`` and ``.chat``."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from stepserve.checkpoint.lora import read_adapter_config
from stepserve.config import EngineConfig
from stepserve.core.outputs import EngineCoreRequest, LoraRef
from stepserve.engine.builder import build_engine
from stepserve.engine.front import sampling_defaults
from stepserve.engine.output_processor import RequestOutput, RequestState
from stepserve.errors import InvalidRequestError
from stepserve.checkpoint.tokenizer import apply_chat_template
from stepserve.sampling import SamplingParams
from stepserve.structured.compiler import GrammarCompiler
from stepserve.sampling import GrammarSpec

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for ``LLM.generate``, as vLLM spells it: a name, a unique integer id, and its
    folder in the PEFT format."""

    lora_name: str
    lora_int_id: int
    lora_path: str


class LLM:
    """Runs the engine in-process. ``model=None`` is the embedded SmolLM2-135M-Instruct; engine
    options (``num_scheduler_steps``, ``max_model_len``, ``block_size``, ...) are keywords.

    ``generation_config`` (``auto``, ``vllm`` or a directory) picks the model's sampling defaults
    as the server's flag does: ``sampling_params=None`` gets them (``get_default_sampling_params``),
    and ``max_new_tokens`` caps every ``max_tokens=None``. ``speculative_config`` and
    ``kv_events_config`` take a dict, as vLLM's ``LLM`` does, or its JSON text."""

    def __init__(self, model: str | None = None, **engine_options) -> None:
        for name in ("speculative_config", "kv_events_config"):
            if isinstance(engine_options.get(name), dict):
                engine_options[name] = json.dumps(engine_options[name])
        self.config = EngineConfig.from_kwargs(model=model, **engine_options)
        self.core, self.tokenizer, self.info = build_engine(self.config)
        self.sampling_defaults = sampling_defaults(self.config)
        self._counter = 0
        self._grammars: GrammarCompiler | None = None

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); one RequestOutput per prompt, in order.
        ``lora_request`` (one, or one per prompt; needs ``enable_lora=True``) picks an adapter."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists = [self._tokenize(p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self._run(texts, token_lists, sampling_params, self._loras(lora_request, len(token_lists)))

    def _loras(self, lora_request, count: int) -> list[LoraRef | None]:
        requests = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * count
        if len(requests) != count:
            raise InvalidRequestError(f"got {len(requests)} lora requests for {count} prompts", "lora_request")
        if any(r is not None for r in requests) and not self.config.lora.enable_lora:
            raise InvalidRequestError("lora_request needs LLM(..., enable_lora=True)", "lora_request")
        out = []
        for r in requests:
            if r is not None:
                read_adapter_config(r.lora_path, self.config.lora.max_lora_rank)  # a bad adapter: an error here
            out.append(None if r is None else LoraRef(r.lora_int_id, r.lora_name, r.lora_path))
        return out

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation (``chat_template_kwargs`` are
        template variables, e.g. Qwen3's ``enable_thinking``), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_lists = [
            apply_chat_template(self.tokenizer, c, add_generation_prompt, chat_template_kwargs) for c in conversations
        ]
        return self._run([None] * len(token_lists), token_lists, sampling_params)

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's sampling defaults (vLLM's name); plain ``SamplingParams()`` if it has none."""
        return self.sampling_defaults.params()

    def grammar(self, kind: str, source: object, closed: bool = False) -> GrammarSpec:
        """A checked output constraint for ``SamplingParams(structured=...)``: ``kind`` is
        ``json`` (a schema), ``json_object``, ``regex`` (ECMA-262), ``choice`` (a list) or
        ``grammar`` (Lark or GBNF); ``closed``: a schema's unstated ``additionalProperties`` is false."""
        if self._grammars is None:
            worker = self.core.worker  # its llguidance tokenizer, built since the engine started, serves both
            self._grammars = GrammarCompiler(
                self.tokenizer, worker.vocab_size, self.info.eos_token_ids, ll_tokenizer=worker.grammars.ll_tokenizer
            )
        return self._grammars.compile(kind, source, kind, closed=closed)

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def _run(self, texts, token_lists, sampling_params, loras=None) -> list[RequestOutput]:
        params_list = self._params_per_prompt(sampling_params, len(token_lists))
        # Resolve and validate everything before anything enters the engine (invariant 1).
        cap = self.sampling_defaults.max_new_tokens
        resolved = [
            p.resolve(len(ids), self.info.max_model_len, default_max_tokens=cap)
            for p, ids in zip(params_list, token_lists)
        ]
        states: dict[str, RequestState] = {}
        groups: list[list[RequestState]] = []
        for ids, params, lora in zip(token_lists, resolved, loras or [None] * len(token_lists)):
            groups.append(self._add(ids, params, states, lora))
        self._drain(states)
        return [
            RequestOutput(
                g[0].request_id.rsplit("-", 1)[0],
                text,
                list(ids),
                [s.completion() for s in g],
                g[0].num_cached_tokens,
                prompt_logprobs=g[0].prompt_logprobs,
            )
            for g, text, ids in zip(groups, texts, token_lists)
        ]

    def _params_per_prompt(self, sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise InvalidRequestError(
                f"got {len(sampling_params)} sampling params for {count} prompts", "sampling_params"
            )
        return list(sampling_params)

    def _add(
        self, ids: list[int], params: SamplingParams, states: dict[str, RequestState], lora: LoraRef | None = None
    ) -> list[RequestState]:
        base = f"llm{self._counter}"
        self._counter += 1
        group = []
        for i in range(params.n):
            child = params.for_choice(i)
            request_id = f"{base}-{i}"
            self.core.add_request(EngineCoreRequest(request_id, tuple(ids), child, time.monotonic(), lora=lora))
            states[request_id] = RequestState.create(request_id, i, child, self.tokenizer, ids)
            group.append(states[request_id])
        return group

    def _drain(self, states: dict[str, RequestState]) -> None:
        while self.core.has_unfinished:
            for out in self.core.step():
                _, must_abort = states[out.request_id].update(out)
                if must_abort:
                    self.core.abort([out.request_id])
