"""The model's own sampling defaults, read from its ``generation_config.json``.

As vLLM's ``--generation-config``: ``auto`` reads the file beside the model, ``vllm`` ignores it,
a directory reads the file there. The defaults fill only the fields a request leaves out;
``max_new_tokens`` becomes one more cap on an omitted ``max_tokens`` (docs/architecture.md, invariant 1), never
a limit on a value the request gives. Pure Python: the server imports it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from stepserve.config import ConfigError
from stepserve.errors import InvalidRequestError
from stepserve.sampling import SamplingParams

log = logging.getLogger("stepserve")

FILE = "generation_config.json"
MODES = ("auto", "vllm")  # or a directory holding generation_config.json
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # as vLLM reads them


@dataclass(frozen=True)
class SamplingDefaults:
    """The model's sampling defaults; None where the model sets none."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None  # cap on max_tokens when a request leaves it out
    source: str | None = None  # the file they were read from

    def as_dict(self) -> dict:
        """The defaults that are set (what the model card and the startup log show)."""
        names = (*SAMPLING_FIELDS, "max_new_tokens")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def sampling(self) -> dict:
        """The sampling fields that are set, as ``SamplingParams`` keywords."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}

    def params(self) -> SamplingParams:
        """``SamplingParams`` with the model's defaults: the offline API's default (vLLM's
        ``LLM.get_default_sampling_params``). ``max_new_tokens`` applies when resolving."""
        return SamplingParams(**self.sampling())

    def cap(self, default_max_tokens: int | None) -> int | None:
        """The smaller of the server's cap on an omitted ``max_tokens`` and ``max_new_tokens``."""
        caps = [c for c in (default_max_tokens, self.max_new_tokens) if c is not None]
        return min(caps) if caps else None


def load_sampling_defaults(mode: str, model_dir: Path | None) -> SamplingDefaults:
    """The defaults for ``--generation-config MODE``; ``model_dir`` is the model's directory."""
    if mode == "vllm":
        return SamplingDefaults()
    if mode == "auto":
        path = None if model_dir is None else model_dir / FILE
        if path is None or not path.is_file():
            return SamplingDefaults()
    else:
        path = Path(mode).expanduser() / FILE
        if not path.is_file():
            raise ConfigError(
                f"generation_config={mode!r}: no {FILE} there; give auto, vllm or a directory holding {FILE}"
            )
    return _parse(path)


def _parse(path: Path) -> SamplingDefaults:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; fix it, or start with --generation-config vllm") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a JSON object; fix it, or start with --generation-config vllm")
    values = {name: raw[name] for name in (*SAMPLING_FIELDS, "max_new_tokens") if raw.get(name) is not None}
    defaults = SamplingDefaults(**values, source=str(path))
    _check(defaults, path)
    return defaults


def _check(defaults: SamplingDefaults, path: Path) -> None:
    """Refuse values a request could not give either, naming the file and the field."""
    try:
        SamplingParams(**defaults.sampling(), max_tokens=defaults.max_new_tokens)
    except InvalidRequestError as exc:
        raise ConfigError(f"{path}: {exc.message}; fix it, or start with --generation-config vllm") from None


def log_sampling_defaults(defaults: SamplingDefaults) -> None:
    """The one startup line saying which defaults requests will get."""
    if defaults.as_dict():
        shown = ", ".join(f"{k}={v}" for k, v in defaults.as_dict().items())
        log.info(
            "using the model's sampling defaults: %s (from %s; --generation-config vllm ignores them)",
            shown,
            defaults.source,
        )
