"""A checkpoint's ``config.json``, read without PyTorch, and the context length it allows.

A GGUF file is converted once into a plain directory (``models/gguf_cache.py``: config,
tokenizer, float32 safetensors) that every later start reads in about a second. The conversion
dequantizes tensors with PyTorch, so a process that must stay free of it (the HTTP front) runs it
in a child process (``python -m stepserve.models.gguf_cache FILE``) and reads the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from stepserve.checkpoint.source import ModelSource
from stepserve.config import ConfigError

GGUF_CACHE_FORMAT = 3  # bump when the converted layout changes


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stepserve"


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where a GGUF file's converted twin lives, keyed by its path, size and modification time."""
    st = gguf_path.stat()
    raw = f"{GGUF_CACHE_FORMAT}:{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return cache_root() / f"{gguf_path.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def read_config(source: ModelSource) -> tuple[ModelSource, dict]:
    """The checkpoint's config and the source to load from: a directory's ``config.json``, or a
    GGUF's converted twin (converted first, in a child process, when it is not cached yet)."""
    if source.gguf_file is None:
        return source, json.loads((source.directory / "config.json").read_text())
    target = gguf_cache_dir(source.gguf_path)
    if not (target / "config.json").exists():
        return _convert_in_child(source)
    return ModelSource(target, None, source.name), json.loads((target / "config.json").read_text())


def _convert_in_child(source: ModelSource) -> tuple[ModelSource, dict]:
    command = [sys.executable, "-m", "stepserve.models.gguf_cache", str(source.gguf_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"the GGUF file {source.gguf_path} cannot be read: {last}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return ModelSource(Path(answer["directory"]), answer["gguf_file"], source.name), answer["config"]


def resolve_max_model_len(requested: int | None, hf_config: dict) -> int:
    """The context length in use: the request's ``--max-model-len``, at most the model's positions."""
    native = hf_config.get("max_position_embeddings", 2048)
    max_model_len = requested or native
    if max_model_len > native:
        raise ConfigError(f"max_model_len={max_model_len} exceeds the model's {native} positions")
    return max_model_len
