"""One pass from a model name to a filled model: find the checkpoint, read its config once,
pick the family (refusing what is not supported), build the model, stream the weights in.

``open_checkpoint`` is all the front end needs (config and tokenizer location); the engine core
calls it too, then ``build_model`` with the ``DecoderConfig`` the registry made.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from stepserve.config import ConfigError
from stepserve.models.decoder import DecoderConfig, DecoderForCausalLM
from stepserve.models.layers import RMSNorm
from stepserve.models.registry import architecture, decoder_config
from stepserve.models.source import ModelSource, resolve_source
from stepserve.models.weights import safetensors_weights

__all__ = ["Checkpoint", "ModelSource", "build_model", "decoder_config", "load_model", "open_checkpoint", "read_hf_config", "resolve_source"]


@dataclass(frozen=True)
class Checkpoint:
    """A model's files and its config, read once."""

    source: ModelSource  # where the files are (a GGUF is replaced by its converted cache when possible)
    hf_config: dict  # config.json, or a GGUF's metadata shaped like it

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The ``(hf_name, tensor)`` stream of the checkpoint's weights."""
        if self.source.gguf_path is not None:
            from stepserve.models.gguf import GgufFile

            gguf = GgufFile(self.source.gguf_path)
            return gguf.weights(self.hf_config)
        return safetensors_weights(self.source.directory)


def open_checkpoint(model: str | None) -> Checkpoint:
    """Find the model, convert a GGUF once (cached), read the config, refuse an unsupported
    architecture (the rest of the config is checked by ``decoder_config``)."""
    from stepserve.models.gguf_cache import converted_source

    source = resolve_source(model)
    if source.gguf_file is not None:
        source, hf_config = converted_source(source)
    else:
        hf_config = json.loads((source.directory / "config.json").read_text())
    architecture(hf_config)
    return Checkpoint(source, hf_config)


def build_model(
    cfg: DecoderConfig,
    weights: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str = "none",
) -> DecoderForCausalLM:
    """The model on ``device`` filled from ``weights``. On CPU the projections are prepacked for
    oneDNN, and with ``quantization="int4"`` quantized from the float32 weights (so that a
    GGUF's 4-bit blocks come back exactly, not via a bfloat16 rounding)."""
    with torch.device("meta"):
        model = DecoderForCausalLM(cfg, max_positions)
    load_dtype = torch.float32 if quantization == "int4" else dtype
    model = model.to_empty(device=device).to(load_dtype)
    model.fill_rotary()
    missing = model.missing_weights(model.load_weights(weights))
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    if device.type == "cpu" and dtype == torch.bfloat16:
        model.pack_for_cpu(dtype, int4=quantization == "int4")
        model.embed_tokens.to(dtype)
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.to(dtype)
    return model.eval()


def read_hf_config(source: ModelSource) -> dict:
    """config.json, or a GGUF's metadata shaped like it (for callers holding a bare source)."""
    if source.gguf_path is not None:
        from stepserve.models.gguf import GgufFile

        return GgufFile(source.gguf_path).config()
    return json.loads((source.directory / "config.json").read_text())


def load_model(source: ModelSource, hf_config: dict, dtype: torch.dtype, device: torch.device, max_positions: int, weights=None, quantization: str = "none") -> DecoderForCausalLM:
    """The model of a source whose config is in hand: ``decoder_config`` then ``build_model``
    (used by the pooling tasks, which load a decoder outside the engine)."""
    cfg = decoder_config(hf_config, max_positions)
    weights = Checkpoint(source, hf_config).weights() if weights is None else weights
    return build_model(cfg, weights, dtype, device, max_positions, quantization)
