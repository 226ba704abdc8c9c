"""The safetensors reader: ``(hf_name, tensor)`` pairs, the stream ``gguf.py`` yields too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from stepserve.config import ConfigError


def safetensors_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors checkpoint, single file or sharded with an index."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no .safetensors files in {model_dir}")
    for name in files:
        with safe_open(model_dir / name, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
