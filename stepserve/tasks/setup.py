"""From the command line to a served task: resolve the task (a clear startup error when the
model cannot do it), read the model's facts once, and hand the server a client factory and
``TaskFront``. ``plan_task`` returns None for text_generation: the LLM engine serves it."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

from stepserve.checkpoint.source import resolve_source
from stepserve.checkpoint.tokenizer import load_tokenizer
from stepserve.config import ConfigError, EngineConfig
from stepserve.tasks import spec as S
from stepserve.tasks import task as T
from stepserve.tasks.config import TaskConfig
from stepserve.tasks.spec import TaskSpec


@dataclass(frozen=True)
class TaskFront:
    """The front's half of a task: started inside the server's event loop by ``create_app``."""

    spec: TaskSpec  # the resolved task and model facts
    tokenizer: object  # the model's tokenizer, KServe's lower-case flag applied

    def start(self, client, on_finish, limits):
        """(the async engine the health routes watch, the ``TaskServing`` the routes use)."""
        from stepserve.engine.async_engine import AsyncEngine
        from stepserve.tasks.inputs import TaskTokenizer
        from stepserve.tasks.serving import TaskServing

        engine = AsyncEngine(client, self.tokenizer, on_finish, limits)
        return engine, TaskServing(self.spec, TaskTokenizer(self.tokenizer, self.spec), engine)


def plan_task(engine: EngineConfig, flags: TaskConfig) -> TaskFront | None:
    source = resolve_source(engine.model.model)
    if source.gguf_file is not None:
        if flags.task not in (None, T.TEXT_GENERATION):
            raise ConfigError(f"--task {flags.task}: a GGUF model serves text_generation only")
        return None
    hf_config = json.loads((source.directory / "config.json").read_text())
    task = T.resolve_task(flags.task, hf_config, S.is_sentence_transformers(source.directory))
    if task == T.TEXT_GENERATION:
        return None
    if engine.scheduler.speculative_config:
        raise ConfigError(
            f"--task {task}: speculative decoding serves text_generation only; leave out --speculative-config"
        )
    if engine.parallel.tensor_parallel_size > 1:
        raise ConfigError(
            f"--task {task}: tensor parallelism serves text_generation only; use --tensor-parallel-size 1"
        )
    if T.architecture_task((hf_config.get("architectures") or ["?"])[0]) != T.TEXT_GENERATION:
        _refuse_decoder_engine_flags(task, engine)
    # KServe passes do_lower_case=True unless --disable_lower_case, which lower-cases cased
    # models too; here the tokenizer's own setting stands unless the flag turns it off.
    tokenizer = load_tokenizer(source, **({"do_lower_case": False} if flags.disable_lower_case else {}))
    return TaskFront(_spec(task, source, hf_config, tokenizer, engine, flags), tokenizer)


def _refuse_decoder_engine_flags(task: str, engine: EngineConfig) -> None:
    """An encoder model runs through transformers (``worker/encoder_runner.py``): the flags of
    stepserve's own decoder engine would not reach it, so they are refused, never ignored."""
    given = {
        "--num-scheduler-steps": engine.scheduler.num_scheduler_steps != 1,
        "--async-scheduling": engine.scheduler.async_scheduling,
        "--quantization": engine.model.quantization not in ("auto", "none"),
        "--kv-cache-dtype": engine.cache.kv_cache_dtype != "auto",
        "--load-format": engine.model.load_format != "auto",
    }
    named = [flag for flag, set_ in given.items() if set_]
    if named:
        raise ConfigError(
            f"--task {task} runs an encoder model through transformers, which {', '.join(named)} "
            "do not apply to; leave them out"
        )


def _spec(task: str, source, hf_config: dict, tokenizer, engine: EngineConfig, flags: TaskConfig) -> TaskSpec:
    native = S.native_max_len(hf_config, source.directory)
    max_model_len = engine.model.max_model_len or native
    if max_model_len > native:
        raise ConfigError(f"max_model_len={max_model_len} exceeds the model's {native} positions")
    if task == T.FILL_MASK and tokenizer.mask_token_id is None:
        raise ConfigError("fill_mask needs a tokenizer with a mask token; this one has none")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else hf_config.get("pad_token_id") or 0
    return TaskSpec(
        task=task,
        directory=str(source.directory),
        name=source.name,
        architecture=(hf_config.get("architectures") or ["?"])[0],
        max_model_len=max_model_len,
        vocab_size=hf_config.get("vocab_size") or len(tokenizer),
        pad_token_id=pad,
        hidden_size=hf_config.get("hidden_size") or hf_config.get("d_model") or 0,
        pooling=S.read_pooling(source.directory) if task == T.EMBEDDING else S.Pooling("mean", True),
        matryoshka=S.matryoshka(hf_config),
        labels=S.labels(hf_config),
        score_activation=S.score_activation(hf_config),
        mask_token_id=tokenizer.mask_token_id,
        dtype=engine.model.dtype,
        device=engine.model.device,
        flags=flags,
        decoder=T.architecture_task((hf_config.get("architectures") or ["?"])[0]) == T.TEXT_GENERATION,
        checkpoint_dtype=hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32",
    )


# The encoder runner's head for each task it computes (``worker/encoder_runner.py``).
_HEADS = {
    T.EMBEDDING: "pooled",
    T.SEQUENCE_CLASSIFICATION: "sequence_logits",
    T.TOKEN_CLASSIFICATION: "token_logits",
    T.FILL_MASK: "mask_logits",
    T.TEXT2TEXT: "generate",
}


def core_factory(spec: TaskSpec, engine: EngineConfig) -> Callable[[], tuple[object, object]]:
    """A picklable factory of the task's engine core, for the spawned core process: the
    generation engine for a decoder embedding model (prefill-only pooling requests), else the
    same core driving an encoder runner. The engine's modules load in that process only."""
    return functools.partial(_build_core, spec, engine)


def _build_core(spec: TaskSpec, engine: EngineConfig) -> tuple[object, object]:
    from stepserve.engine.builder import build_encoder_engine, build_pooling_engine
    from stepserve.worker.encoder_runner import EncoderSpec

    if spec.decoder:
        return build_pooling_engine(engine, spec.max_model_len)
    encoder = EncoderSpec(
        _HEADS[spec.task],
        spec.directory,
        spec.pad_token_id,
        spec.pooling.mode,
        spec.dtype,
        spec.device,
        spec.checkpoint_dtype,
    )
    return build_encoder_engine(encoder, engine, spec.name, spec.max_model_len)


def serving(front: TaskFront, engine: EngineConfig, server) -> tuple[Callable, object, object]:
    """(make_client, tokenizer, FrontInfo) for ``create_app``: the task's engine core in its own
    supervised process, or in a thread with ``--engine-in-process``."""
    from stepserve.checkpoint.generation_config import SamplingDefaults
    from stepserve.engine.front import FrontInfo, sampling_defaults

    spec = front.spec
    # text2text takes the model's generation_config.json sampling defaults, as generation does
    defaults = sampling_defaults(engine) if spec.task == T.TEXT2TEXT else SamplingDefaults()
    info = FrontInfo(spec.name, spec.max_model_len, spec.vocab_size, frozenset(), defaults)
    factory = core_factory(spec, engine)
    if server.engine_in_process:
        from stepserve.engine.core_client import ThreadCoreClient

        core, _ = factory()
        return (lambda: ThreadCoreClient(core)), front.tokenizer, info
    from stepserve.engine.supervisor import RestartPolicy, SupervisedCoreClient

    policy = RestartPolicy(server.max_restarts, server.restart_backoff_s)
    return (lambda: SupervisedCoreClient(factory, policy, spare=server.spare_core)), front.tokenizer, info
