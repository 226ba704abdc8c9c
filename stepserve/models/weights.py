"""The safetensors reader: ``(hf_name, tensor)`` pairs, the stream ``gguf.py`` yields too."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from stepserve.config import ConfigError
from stepserve.models.load_progress import LoadProgress


def safetensors_weights(
    model_dir: Path, read: Callable[[str, object], torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors checkpoint, single file or sharded with an index. ``read(key,
    file)`` replaces ``file.get_tensor(key)`` (a tensor-parallel rank reads slices of it)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no .safetensors files in {model_dir}")
    progress = LoadProgress(len(files), None if weight_map is None else len(weight_map))
    for i, name in enumerate(files):
        with safe_open(model_dir / name, framework="pt") as f:
            keys = list(f.keys())
            tensors = ((key, f.get_tensor(key) if read is None else read(key, f)) for key in keys)
            yield from progress.shard(i, name, len(keys), tensors)
