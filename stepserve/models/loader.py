"""One pass from a model name to a filled model: find the checkpoint, read its config once,
pick the family (refusing what is not supported), build the model, stream the weights in.

The engine core calls ``open_checkpoint``, then ``build_model`` with the ``DecoderConfig`` the
registry made; the front reads the same config without PyTorch (``checkpoint/config.py``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from stepserve.config import ConfigError
from stepserve.models.config import DecoderConfig
from stepserve.models.decoder import DecoderForCausalLM
from stepserve.models.config import Fp8Format, fp8_format
from stepserve.models.fp8_checkpoint import dequantized_weights
from stepserve.models.layers import RMSNorm
from stepserve.models.registry import architecture, decoder_config
from stepserve.checkpoint.source import ModelSource, resolve_source
from stepserve.models.weights import safetensors_weights

log = logging.getLogger("stepserve")

__all__ = [
    "Checkpoint",
    "ModelSource",
    "build_model",
    "decoder_config",
    "load_model",
    "open_checkpoint",
    "read_hf_config",
    "resolve_source",
]


@dataclass(frozen=True)
class Checkpoint:
    """A model's files and its config, read once."""

    source: ModelSource  # where the files are (a GGUF is replaced by its converted cache when possible)
    hf_config: dict  # config.json, or a GGUF's metadata shaped like it

    def weights(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The ``(hf_name, tensor)`` stream of the checkpoint's weights; an FP8 checkpoint's come
        dequantized to ``dtype`` (on ``device``, where the arithmetic runs)."""
        if self.source.gguf_path is not None:
            from stepserve.models.gguf import GgufFile

            gguf = GgufFile(self.source.gguf_path)
            return gguf.weights(self.hf_config)
        fmt = self.fp8_format
        if fmt is not None:
            return dequantized_weights(safetensors_weights(self.source.directory), fmt, dtype, torch.device(device))
        return safetensors_weights(self.source.directory)

    @property
    def fp8_format(self) -> Fp8Format | None:
        return fp8_format(self.hf_config)


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
    weights: Iterator[tuple[str, torch.Tensor]] | None,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str = "none",
    seed: int = 0,
    lora: tuple[int, int] | None = None,
) -> DecoderForCausalLM:
    """The model on ``device`` filled from ``weights``, or, with ``weights=None``, with random
    weights (``--load-format dummy``, see ``fill_dummy``). On CPU the projections are prepacked
    for oneDNN, and with ``quantization="int4"`` quantized from the float32 weights (so that a
    GGUF's 4-bit blocks come back exactly, not via a bfloat16 rounding). ``lora``: (slots, rank)
    of the LoRA adapters it may run (``models.lora``)."""
    start = time.monotonic()
    with torch.device("meta"):
        model = DecoderForCausalLM(cfg, max_positions)
    load_dtype = torch.float32 if quantization == "int4" else dtype
    model = model.to(load_dtype).to_empty(device=device)  # memory of the load dtype only, no float32 detour
    model.fill_rotary()
    allocated = _settled(device) - start
    if weights is None:
        fill_dummy(model, seed)
    else:
        missing = model.missing_weights(model.load_weights(weights))
        if missing:
            raise ConfigError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    log.info(
        "model memory on %s in %.1fs, weights %s in %.1fs",
        device,
        allocated,
        "made" if weights is None else "read",
        _settled(device) - start - allocated,
    )
    if quantization == "fp8":
        from stepserve.models.fp8 import quantize_fp8

        quantize_fp8(model)
    if lora is not None:  # (max_loras, max_lora_rank): slots of zeros on every adaptable projection
        from stepserve.models.lora import attach_lora

        attach_lora(model, *lora)
    if device.type == "cpu" and (dtype == torch.bfloat16 or quantization == "int4"):
        model.pack_for_cpu(dtype, int4=quantization == "int4")
        model.embed_tokens.to(dtype)
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.to(dtype)
    return model.eval()


def _settled(device: torch.device) -> float:
    """The time once the device's queued work is done (the phases' times are the device's too)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.monotonic()


@torch.no_grad()
def fill_dummy(model: DecoderForCausalLM, seed: int) -> None:
    """``--load-format dummy``: random weights in the model's own shapes, made in place on its
    device (no files read): N(0, 0.02) for matrices, ones for the norms, zeros for biases. The
    same for a seed on the same device."""
    gen = torch.Generator(device=model.embed_tokens.weight.device)
    for k, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:
            param.fill_(1.0)
        else:
            gen.manual_seed(seed * 100003 + k)
            for rows in param.view(-1, param.shape[-1]).split(8192):  # float32 scratch of a slice, not of a table
                rows.copy_(torch.randn(rows.shape, generator=gen, device=rows.device, dtype=torch.float32).mul_(0.02))


def read_hf_config(source: ModelSource) -> dict:
    """config.json, or a GGUF's metadata shaped like it (for callers holding a bare source)."""
    if source.gguf_path is not None:
        from stepserve.models.gguf import GgufFile

        return GgufFile(source.gguf_path).config()
    return json.loads((source.directory / "config.json").read_text())


def load_model(
    source: ModelSource,
    hf_config: dict,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    weights=None,
    quantization: str = "none",
    load_format: str = "auto",
    seed: int = 0,
) -> DecoderForCausalLM:
    """The model of a source whose config is in hand: ``decoder_config`` then ``build_model``
    (``load_format="dummy"``: random weights, no files read)."""
    cfg = decoder_config(hf_config, max_positions)
    if weights is None and load_format != "dummy":
        weights = Checkpoint(source, hf_config).weights(dtype, device)
    return build_model(cfg, weights, dtype, device, max_positions, quantization, seed)
