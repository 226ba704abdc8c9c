"""The engine's flags (model, cache, scheduler, parallelism) and the model's location, shared
by every command that builds an engine."""

from __future__ import annotations

import argparse

from stepserve.config import PARALLEL_ALIASES, CacheConfig, EngineConfig, LoraConfig, ModelConfig, ParallelConfig
from stepserve.config import SchedulerConfig
from stepserve.config import add_dataclass_args, engine_config_from_args
from stepserve.cli.vllm_flags import CACHE_ALIASES, MODEL_ALIASES, REVISION_ALIAS

# KServe huggingfaceserver's spellings for the flags it has.
KSERVE_ALIASES = {"model": "--model_dir"}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, ModelConfig, KSERVE_ALIASES | MODEL_ALIASES)
    parser.add_argument(
        "--model_id",
        "--model-id",
        dest="model_id",
        default=None,
        help="a Hugging Face hub id ORG/NAME, downloaded with huggingface_hub "
        "(HF_TOKEN, HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE apply), or a local path",
    )
    parser.add_argument(
        "--model_revision",
        "--model-revision",
        REVISION_ALIAS,
        dest="model_revision",
        default=None,
        help="hub branch, tag or commit of --model_id (default: main)",
    )
    parser.add_argument(
        "--tokenizer_revision",
        "--tokenizer-revision",
        dest="tokenizer_revision",
        default=None,
        help="hub revision of the tokenizer, when it differs from --model_revision",
    )
    add_dataclass_args(parser, CacheConfig, CACHE_ALIASES)
    add_dataclass_args(parser, SchedulerConfig)
    add_dataclass_args(parser, LoraConfig)
    add_dataclass_args(parser, ParallelConfig, PARALLEL_ALIASES)


def located_engine_config(args: argparse.Namespace) -> tuple[EngineConfig, str | None]:
    """The engine config with the model found first (hub download, /mnt/models, embedded),
    and the served name the model's location suggests (a hub id), if any."""
    from stepserve.checkpoint.source import locate_from_args

    located = locate_from_args(args)
    return engine_config_from_args(argparse.Namespace(**{**vars(args), "model": located.path})), located.name
