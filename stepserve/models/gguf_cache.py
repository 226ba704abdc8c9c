"""Convert a GGUF model once into a plain directory (config, tokenizer, float32 safetensors).

Parsing GGUF metadata, converting its tokenizer and dequantizing every tensor takes ~15 s for the
embedded model; the converted directory loads in about a second. The cache lives under
``$XDG_CACHE_HOME/stepserve`` (``~/.cache/stepserve``), keyed by the file's path, size and
modification time, and is written to a temporary folder and renamed, so a crash leaves no half
conversion behind. When the cache cannot be written the GGUF is read directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from stepserve.models.source import ModelSource

log = logging.getLogger("stepserve")
_FORMAT = 3  # bump when the converted layout changes


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stepserve"


def _key(path: Path) -> str:
    st = path.stat()
    raw = f"{_FORMAT}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def converted_source(source: ModelSource) -> tuple[ModelSource, dict]:
    """The cached plain-directory twin of a GGUF source and its config, converting it on first
    use (the GGUF is parsed once, for both the config and the weights)."""
    target = cache_root() / _key(source.gguf_path)
    if (target / "config.json").exists():
        return ModelSource(target, None, source.name), json.loads((target / "config.json").read_text())
    from stepserve.models.gguf import GgufFile

    gguf = GgufFile(source.gguf_path)
    config = gguf.config()
    try:
        _convert(source, gguf, config, target)
    except OSError as err:
        log.warning("cannot cache the converted GGUF (%s); reading it directly", err)
        return source, config
    return ModelSource(target, None, source.name), config


def _convert(source: ModelSource, gguf, config: dict, target: Path) -> None:
    from safetensors.torch import save_file

    from stepserve.models.tokenizer import load_tokenizer

    log.info("converting %s once into %s", source.gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tokenizer = load_tokenizer(source)
        tokenizer.save_pretrained(tmp)
        weights = {name: t.contiguous() for name, t in gguf.weights(config)}
        if config["tie_word_embeddings"]:
            weights.pop("lm_head.weight", None)
        save_file(weights, tmp / "model.safetensors")
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"], "bos_token_id": config["bos_token_id"]}))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))  # written last: marks completion
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
