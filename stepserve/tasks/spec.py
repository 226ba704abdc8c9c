"""What the front and the task's engine need to know about a task model, read once from its
directory (config.json, sentence-transformers files). Pure Python, no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stepserve.config import ConfigError
from stepserve.tasks.config import TaskConfig

_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}
_ST_UNSUPPORTED_KEYS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
_ST_MODULES = {
    "sentence_transformers.models.Transformer": "transformer",
    "sentence_transformers.models.Pooling": "pooling",
    "sentence_transformers.models.Normalize": "normalize",
}
# Models whose position ids start after the padding index (RoBERTa's offset of padding_idx + 1).
_PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "data2vec-text")
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity"}


@dataclass(frozen=True)
class Pooling:
    mode: str  # "mean", "cls", "max" or "last" over the final hidden states
    normalize: bool  # L2-normalise the pooled vector


@dataclass(frozen=True)
class TaskSpec:
    """The resolved task and the model facts it computes with; handed to the core process."""

    task: str  # one of tasks.task.TASKS, resolved
    directory: str  # the model directory
    name: str  # default served model name
    architecture: str  # config.json's first architecture
    max_model_len: int  # longest input in tokens
    vocab_size: int  # token ids must be below this
    pad_token_id: int  # filler for padded batch rows
    hidden_size: int  # embedding size before any ``dimensions`` truncation
    pooling: Pooling  # text_embedding only
    matryoshka: tuple[int, ...] | None  # None: no Matryoshka; (): any size; else the allowed sizes
    labels: tuple[str, ...]  # class names by index (id2label)
    score_activation: str  # cross-encoder scores: "sigmoid" (one label) or "identity"
    mask_token_id: int | None  # fill_mask's [MASK]
    dtype: str  # --dtype as given
    device: str  # --device as given
    flags: TaskConfig  # KServe's output flags
    decoder: bool = False  # text_embedding of a *ForCausalLM model: stepserve's own model computes it
    checkpoint_dtype: str = "float32"  # config.json's dtype, for --dtype auto


def is_sentence_transformers(directory: Path) -> bool:
    return (directory / "modules.json").exists()


def read_pooling(directory: Path) -> Pooling:
    """The sentence-transformers pooling config; KServe's mean + normalise without one."""
    if not is_sentence_transformers(directory):
        return Pooling("mean", True)
    kinds = []
    for module in json.loads((directory / "modules.json").read_text()):
        kind = _ST_MODULES.get(module.get("type", ""))
        if kind is None:
            raise ConfigError(
                f"sentence-transformers module {module.get('type')!r} ({module.get('path')}) "
                "is not supported; stepserve serves Transformer, Pooling and Normalize"
            )
        kinds.append((kind, module.get("path", "")))
    pooling_dirs = [path for kind, path in kinds if kind == "pooling"]
    if len(pooling_dirs) != 1:
        raise ConfigError(f"modules.json must list exactly one Pooling module, found {len(pooling_dirs)}")
    config = json.loads((directory / pooling_dirs[0] / "config.json").read_text())
    return Pooling(_pooling_mode(config), any(kind == "normalize" for kind, _ in kinds))


def _pooling_mode(config: dict) -> str:
    for key in _ST_UNSUPPORTED_KEYS:
        if config.get(key):
            raise ConfigError(
                f"sentence-transformers pooling {key} is not supported; use mean, cls, max or lasttoken pooling"
            )
    modes = [mode for key, mode in _ST_POOLING_KEYS.items() if config.get(key)]
    if len(modes) != 1:
        raise ConfigError(f"the Pooling config must turn on exactly one mode, found {modes or 'none'}")
    return modes[0]


def native_max_len(hf_config: dict, directory: Path) -> int:
    """The longest input the model takes: its positions, less RoBERTa's padding offset, capped
    by sentence-transformers' ``max_seq_length``."""
    positions = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or 512
    if hf_config.get("model_type") in _PADDING_OFFSET_POSITIONS:
        positions -= (hf_config.get("pad_token_id") or 1) + 1
    st_file = directory / "sentence_bert_config.json"
    if st_file.exists():
        positions = min(positions, json.loads(st_file.read_text()).get("max_seq_length") or positions)
    return positions


def matryoshka(hf_config: dict) -> tuple[int, ...] | None:
    """vLLM's rule: ``matryoshka_dimensions`` (the sizes allowed) or ``is_matryoshka`` (any)."""
    dims = hf_config.get("matryoshka_dimensions")
    if dims:
        return tuple(int(d) for d in dims)
    return () if hf_config.get("is_matryoshka") else None


def score_activation(hf_config: dict) -> str:
    """sentence-transformers' CrossEncoder default (sigmoid for one label) unless the config names another."""
    name = ((hf_config.get("sentence_transformers") or {}).get("activation_fn") or "Sigmoid").rsplit(".", 1)[-1]
    if name not in _ACTIVATIONS:
        raise ConfigError(f"cross-encoder activation {name} is not supported; use Sigmoid or Identity")
    return _ACTIVATIONS[name]


def labels(hf_config: dict) -> tuple[str, ...]:
    id2label = hf_config.get("id2label") or {}
    count = hf_config.get("num_labels") or len(id2label) or 2
    return tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count))
