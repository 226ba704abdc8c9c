"""Convert a GGUF model once into a plain directory (config, tokenizer, float32 safetensors).

Parsing GGUF metadata, converting its tokenizer and dequantizing every tensor takes ~15 s for the
embedded model; the converted directory loads in about a second. The cache lives under
``$XDG_CACHE_HOME/stepserve`` (``~/.cache/stepserve``, ``checkpoint.config.gguf_cache_dir``) and is
written to a temporary folder and renamed, so a crash leaves no half conversion behind. When the
cache cannot be written the GGUF is read directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from stepserve.checkpoint.config import gguf_cache_dir
from stepserve.checkpoint.source import ModelSource, resolve_source

log = logging.getLogger("stepserve")


def converted_source(source: ModelSource) -> tuple[ModelSource, dict]:
    """The cached plain-directory twin of a GGUF source and its config, converting it on first
    use (the GGUF is parsed once, for both the config and the weights)."""
    target = gguf_cache_dir(source.gguf_path)
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

    from stepserve.checkpoint.tokenizer import load_tokenizer

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
        (tmp / "generation_config.json").write_text(
            json.dumps({"eos_token_id": config["eos_token_id"], "bos_token_id": config["bos_token_id"]})
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=1))  # written last: marks completion
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(path: str) -> None:
    """``python -m stepserve.models.gguf_cache FILE``: convert (or find) the file's cached twin and
    print its location and config as one JSON line, for a process that does not import PyTorch."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source, config = converted_source(resolve_source(path))
    print(json.dumps({"directory": str(source.directory), "gguf_file": source.gguf_file, "config": config}))


if __name__ == "__main__":
    main(sys.argv[1])
