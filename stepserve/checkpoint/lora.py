"""A LoRA adapter's folder in the PEFT format, read without PyTorch: ``adapter_config.json``
checked against what the server serves, and the tensor names of ``adapter_model.safetensors``
(its JSON header), so that the front refuses a bad adapter by name before any weight moves.
The worker reads the tensors themselves (``models.lora``)."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from stepserve.config import ConfigError

SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_FILE = "adapter_model.safetensors"
# module: a projection's PEFT name, with "shared_expert." before it for Qwen2-MoE's shared expert
_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.((?:shared_expert\.)?\w+)"
    r"\.lora_([AB])\.weight$"
)
_ROUTED_EXPERTS = re.compile(r"\.mlp\.experts\.")  # PEFT's target_parameters, or per-expert modules


@dataclass(frozen=True)
class AdapterConfig:
    path: str  # the adapter's folder
    rank: int  # r
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (as PEFT computes it)
    modules: tuple[str, ...]  # the projections it adapts (PEFT's names)
    base_model: str | None  # base_model_name_or_path, as PEFT saved it


def read_adapter_config(
    path: str | Path, max_rank: int, shapes: list[dict[str, tuple[int, int]]] | None = None
) -> AdapterConfig:
    """The adapter at ``path``, checked: a PEFT LoRA of rank <= ``max_rank`` on projections this
    server adapts, with its weights in safetensors, and (given the base model's ``shapes``, per
    layer module -> (in, out): ``layer_shapes``) of the base's layers and shapes. ``ConfigError``
    naming what is wrong."""
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"{folder} is not a LoRA adapter: it has no adapter_config.json")
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_file} cannot be read: {exc}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{folder}: peft_type {cfg.get('peft_type')!r} is not supported; supported: LORA")
    for key, allowed in (("bias", "none"), ("use_dora", False)):
        if cfg.get(key, allowed) not in (allowed, None):
            raise ConfigError(f"{folder}: {key}={cfg.get(key)!r} is not supported (only {key}={allowed!r})")
    if cfg.get("modules_to_save"):
        raise ConfigError(
            f"{folder}: modules_to_save={cfg['modules_to_save']} is not supported (full modules, not LoRA)"
        )
    rank = int(cfg.get("r", 8))
    if rank > max_rank:
        raise ConfigError(f"{folder}: rank {rank} is above --max-lora-rank {max_rank}")
    alpha = float(cfg.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{folder}: {WEIGHTS_FILE} is missing (adapters in .bin are not read)")
    modules = set()
    for name, shape in _tensor_shapes(weights).items():
        layer, module, which = _parse(name, folder)
        if module.removeprefix("shared_expert.") not in SUPPORTED_MODULES:
            raise ConfigError(f"{folder}: it adapts {module!r}; supported targets: {', '.join(SUPPORTED_MODULES)}")
        if shapes is not None and layer >= len(shapes):
            raise ConfigError(f"{folder}: it adapts layer {layer}, but the base model has {len(shapes)} layers")
        if shapes is not None and module not in shapes[layer]:
            raise ConfigError(
                f"{folder}: it adapts {module} in layer {layer}, but layer {layer} has no {module} to adapt "
                "(a mixture-of-experts layer adapts its attention, and its shared expert where it has one)"
            )
        if shapes is not None:
            inner, outer = shapes[layer][module]
            want = (rank, inner) if which == "A" else (outer, rank)
            if tuple(shape) != want:
                raise ConfigError(
                    f"{folder}: {name} has shape {tuple(shape)}, the base model needs {want}: "
                    "is this adapter for another base model?"
                )
        modules.add(module)
    if not modules:
        raise ConfigError(f"{folder}: {WEIGHTS_FILE} holds no LoRA weights")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):  # after the tensors, which name a worse problem first
        raise ConfigError(f"{folder}: per-module rank_pattern/alpha_pattern is not supported")
    return AdapterConfig(str(folder), rank, scaling, tuple(sorted(modules)), cfg.get("base_model_name_or_path"))


def parse_tensor_name(name: str) -> tuple[int, str, str]:
    """(layer, PEFT module, "A" or "B") of an adapter tensor's name."""
    return _parse(name, None)


def _parse(name: str, folder: Path | None) -> tuple[int, str, str]:
    where = f"{folder}: " if folder else ""
    if _ROUTED_EXPERTS.search(name):
        raise ConfigError(
            f"{where}tensor {name!r} adapts a mixture's routed experts, which take no adapter here "
            "(supported: the attention, dense MLP and shared-expert projections)"
        )
    match = _NAME.match(name)
    if match is None:
        raise ConfigError(f"{where}tensor {name!r} is not a LoRA weight of a decoder projection")
    return int(match[1]), match[2], match[3]


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's JSON header."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def layer_shapes(cfg) -> list[dict[str, tuple[int, int]]]:
    """Per layer of a ``DecoderConfig``, (in, out) of each projection an adapter may target: the
    attention's; the MLP's where the layer is dense; in a mixture-of-experts layer, its shared
    expert's (Qwen2-MoE, as ``shared_expert.gate_proj`` ...). Routed experts take none."""
    q, kv, hidden = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
    attention = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden)}

    def mlp(inner: int, prefix: str = "") -> dict[str, tuple[int, int]]:
        shapes = {"gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
        return {prefix + name: shape for name, shape in shapes.items()}

    moe = cfg.moe
    out = []
    for sparse in moe.sparse_layers if moe is not None else (False,) * cfg.num_layers:
        if not sparse:
            out.append(attention | mlp(cfg.intermediate_size))
        elif moe.shared_intermediate_size:
            out.append(attention | mlp(moe.shared_intermediate_size, "shared_expert."))
        else:
            out.append(dict(attention))
    return out
