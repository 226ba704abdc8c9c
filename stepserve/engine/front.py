"""What the front end needs about the model without loading it: tokenizer, context length,
vocabulary size, end-of-sequence ids. The weights load in the engine core process."""

from __future__ import annotations

from dataclasses import dataclass

from stepserve.config import EngineConfig
from stepserve.distributed.sharding import check_tensor_parallel_startup as check_tensor_parallel
from stepserve.checkpoint.generation_config import SamplingDefaults, load_sampling_defaults, log_sampling_defaults
from stepserve.checkpoint.config import read_config, resolve_max_model_len
from stepserve.models.registry import decoder_config
from stepserve.checkpoint.source import ModelSource, resolve_source
from stepserve.checkpoint.tokenizer import eos_token_ids, load_tokenizer


@dataclass(frozen=True)
class FrontInfo:
    name: str  # the default served model name
    max_model_len: int  # context length in use
    vocab_size: int  # token ids must be below this
    eos_token_ids: frozenset[int]  # ids that end a sequence
    sampling_defaults: SamplingDefaults = SamplingDefaults()  # the model's, for fields a request leaves out


def sampling_defaults(config: EngineConfig, source: ModelSource | None = None) -> SamplingDefaults:
    """The model's sampling defaults under ``--generation-config``, logged once (front only)."""
    source = source or resolve_source(config.model.model)  # a GGUF's folder is all that is read
    model_dir = None if source.gguf_file is not None else source.directory  # a raw GGUF's folder is not the model's
    defaults = load_sampling_defaults(config.model.generation_config, model_dir)
    log_sampling_defaults(defaults)
    return defaults


def load_front(config: EngineConfig) -> tuple[object, FrontInfo]:
    """The tokenizer and the model facts the routes validate against. The model's config is
    checked here too, so that an unsupported architecture or setting stops the server at startup."""
    source, hf_config = read_config(resolve_source(config.model.model))
    max_model_len = resolve_max_model_len(config.model.max_model_len, hf_config)
    check_tensor_parallel(config, decoder_config(hf_config, max_model_len))
    tokenizer = load_tokenizer(source)
    eos = eos_token_ids(source, hf_config, tokenizer)
    return tokenizer, FrontInfo(
        source.name, max_model_len, hf_config["vocab_size"], eos, sampling_defaults(config, source)
    )
