"""What the front end needs about the model without loading it: tokenizer, context length,
vocabulary size, end-of-sequence ids. The weights load in the engine core process."""

from __future__ import annotations

from dataclasses import dataclass

from stepserve.config import ConfigError, EngineConfig
from stepserve.distributed import check_startup
from stepserve.generation_config import SamplingDefaults, load_sampling_defaults, log_sampling_defaults
from stepserve.models.loader import decoder_config, open_checkpoint
from stepserve.models.source import ModelSource, resolve_source
from stepserve.models.tokenizer import eos_token_ids, load_tokenizer


@dataclass(frozen=True)
class FrontInfo:
    name: str  # the default served model name
    max_model_len: int  # context length in use
    vocab_size: int  # token ids must be below this
    eos_token_ids: frozenset[int]  # ids that end a sequence
    sampling_defaults: SamplingDefaults = SamplingDefaults()  # the model's, for fields a request leaves out


def resolve_max_model_len(config: EngineConfig, hf_config: dict) -> int:
    native = hf_config.get("max_position_embeddings", 2048)
    max_model_len = config.model.max_model_len or native
    if max_model_len > native:
        raise ConfigError(f"max_model_len={max_model_len} exceeds the model's {native} positions")
    return max_model_len


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
    checkpoint = open_checkpoint(config.model.model)
    source, hf_config = checkpoint.source, checkpoint.hf_config
    max_model_len = resolve_max_model_len(config, hf_config)
    check_startup(config, decoder_config(hf_config, max_model_len))
    tokenizer = load_tokenizer(source)
    eos = eos_token_ids(source, hf_config, tokenizer)
    return tokenizer, FrontInfo(source.name, max_model_len, hf_config["vocab_size"], eos, sampling_defaults(config, source))
