"""The LoRA adapters a server serves (``--lora-modules``, and at run time
``/v1/load_lora_adapter``): name -> ``LoraRef``, each checked (``checkpoint.lora``) before it
is listed. A request picks one with its ``model`` field."""

from __future__ import annotations

import itertools
import json
import threading

from stepserve.checkpoint.lora import read_adapter_config
from stepserve.config import ConfigError
from stepserve.core.outputs import LoraRef
from stepserve.errors import InvalidRequestError, NotFoundError


def parse_lora_modules(values: list[str] | None) -> list[tuple[str, str]]:
    """vLLM's ``--lora-modules``: ``name=path`` or a JSON object ``{"name", "path"}`` each."""
    out = []
    for value in values or ():
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
                out.append((spec["name"], spec["path"]))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"--lora-modules {value!r}: a JSON module needs name and path") from None
            continue
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora-modules {value!r}: use name=path")
        out.append((name, path))
    return out


class LoraRegistry:
    def __init__(
        self,
        base_name: str,
        max_rank: int,
        max_loras: int = 1,
        shapes: list[dict[str, tuple[int, int]]] | None = None,
    ) -> None:
        self.base_name = base_name
        self.max_rank = max_rank
        self.max_loras = max_loras  # adapters resident at once (the metric's max_lora)
        self.shapes = shapes  # per layer, (in, out) of each adaptable projection (checkpoint.lora.layer_shapes)
        self._adapters: dict[str, LoraRef] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def get(self, name: str) -> LoraRef | None:
        return self._adapters.get(name)

    def add(self, name: str, path: str, param: str = "lora_path") -> LoraRef:
        """Check the adapter and serve it under ``name``; 400 naming what is wrong."""
        if not name or name == self.base_name:
            raise InvalidRequestError(
                f"lora_name {name!r} must be non-empty and not the base model's name", "lora_name"
            )
        try:
            config = read_adapter_config(path, self.max_rank, self.shapes)
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), param) from None
        with self._lock:
            if name in self._adapters:
                raise InvalidRequestError(f"the adapter {name!r} is already loaded", "lora_name")
            ref = self._adapters[name] = LoraRef(next(self._ids), name, config.path)
        return ref

    def remove(self, name: str) -> None:
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise NotFoundError(
                    f"no adapter {name!r} is loaded (loaded: {', '.join(self._adapters) or 'none'})", "lora_name"
                )
