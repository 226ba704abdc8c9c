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
from typing import NamedTuple
from pathlib import Path

from stepserve.config import ConfigError

SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_MODULES = ("qkv_proj", "gate_up_proj")  # a model that stores them fused (Phi-3): one pair over the slices
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # a mixture's stacked expert tensors (PEFT's target_parameters)
WEIGHTS_FILE = "adapter_model.safetensors"
# module: a projection's PEFT name, with "shared_expert." before it for Qwen2-MoE's shared expert
_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.((?:shared_expert\.)?\w+)"
    r"\.lora_([AB])\.weight$"
)
# LoRA on the stacked experts (PEFT's ParamWrapper): a second target parameter of the same module
# wraps the first, whose tensors then sit one ".base_layer" deeper; which is which, the shapes say
_EXPERTS = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.mlp\.(experts(?:\.base_layer)*)\.lora_([AB])\.weight$"
)
_PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")  # one module per expert: transformers 4's layout


class Target(NamedTuple):
    """What an adapter's pair for one projection must look like: ``lora_A`` [experts * r, inner],
    ``lora_B`` [outer, experts * r] (``experts`` is 1 but for a mixture's stacked experts)."""

    inner: int
    outer: int
    experts: int = 1


@dataclass(frozen=True)
class AdapterConfig:
    path: str  # the adapter's folder
    rank: int  # r
    modules: tuple[str, ...]  # the projections it adapts (PEFT's names; "experts.gate_up_proj" ...)
    base_model: str | None  # base_model_name_or_path, as PEFT saved it
    alpha: float = 1.0  # lora_alpha
    alpha_pattern: tuple[tuple[str, float], ...] = ()  # PEFT's per-module alphas: (regex, alpha)
    use_rslora: bool = False

    def scaling_of(self, name: str, rank: int) -> float:
        """PEFT's scaling of the projection ``name`` (``model.layers.3.self_attn.q_proj``) whose
        tensors have rank ``rank``: its ``alpha_pattern`` alpha if a key matches, as PEFT matches
        them, else ``lora_alpha``; over ``rank`` or its square root with rsLoRA."""
        alpha = next((a for key, a in self.alpha_pattern if re.match(rf"(.*\.)?({key})$", name)), self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def read_adapter_config(
    path: str | Path, max_rank: int, shapes: list[dict[str, Target]] | None = None
) -> AdapterConfig:
    """The adapter at ``path``, checked: a PEFT LoRA of rank <= ``max_rank`` (twice that on a
    mixture's stacked gate/up, where PEFT fuses two rank-r adapters) on projections this server
    adapts, with its weights in safetensors, and (given the base model's ``shapes``: per layer,
    module -> ``Target``, from ``layer_shapes``) of the base's layers and shapes. ``ConfigError``
    naming what is wrong."""
    folder = Path(path)
    cfg = _read_json(folder)
    rank = int(cfg.get("r", 8))
    if rank > max_rank:
        raise ConfigError(f"{folder}: rank {rank} is above --max-lora-rank {max_rank}")
    alpha = float(cfg.get("lora_alpha", rank))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{folder}: {WEIGHTS_FILE} is missing (adapters in .bin are not read)")
    modules = set()
    for (layer, module), ab in _pairs(weights, folder).items():
        if shapes is not None:
            module = _checked(folder, layer, module, ab, shapes, max_rank)
        modules.add(module)
    if not modules:
        raise ConfigError(f"{folder}: {WEIGHTS_FILE} holds no LoRA weights")
    patterns = tuple((str(k), float(v)) for k, v in (cfg.get("alpha_pattern") or {}).items())
    return AdapterConfig(
        str(folder),
        rank,
        tuple(sorted(modules)),
        cfg.get("base_model_name_or_path"),
        alpha,
        patterns,
        bool(cfg.get("use_rslora")),
    )


def _read_json(folder: Path) -> dict:
    """adapter_config.json, refused where it asks for what is not served."""
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
    return cfg


def _pairs(weights: Path, folder: Path) -> dict[tuple[int, str], dict[str, list[int]]]:
    """(layer, module) -> {"A": shape, "B": shape} of the adapter's tensors; a module a name
    does not name yet (``experts``, ``experts.base_layer``) is resolved by ``expert_param``."""
    pairs: dict[tuple[int, str], dict[str, list[int]]] = {}
    for name, shape in _tensor_shapes(weights).items():
        layer, module, which = _parse(name, folder)
        known = (*SUPPORTED_MODULES, *FUSED_MODULES)
        if not module.startswith("experts") and module.removeprefix("shared_expert.") not in known:
            raise ConfigError(f"{folder}: it adapts {module!r}; supported targets: {', '.join(known)}")
        pairs.setdefault((layer, module), {})[which] = shape
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{folder}: layer {layer} {module} has lora_{''.join(ab)} without its pair")
    return pairs


def _checked(folder: Path, layer: int, module: str, ab: dict, shapes: list[dict[str, Target]], max_rank: int) -> str:
    """The module's name (an expert pair's resolved), after checking it against the base."""
    if layer >= len(shapes):
        raise ConfigError(f"{folder}: it adapts layer {layer}, but the base model has {len(shapes)} layers")
    targets = shapes[layer]
    if module.startswith("experts"):
        module = expert_param(ab["A"], ab["B"], targets) or module
    if module not in targets:
        raise ConfigError(
            f"{folder}: it adapts {module} in layer {layer}, but layer {layer} has no {module} to adapt "
            "(a mixture-of-experts layer adapts its attention, its stacked experts, and its shared expert "
            "where it has one; a dense layer its attention and MLP)"
        )
    target = targets[module]
    rank, extra = divmod(ab["A"][0], target.experts)
    limit = 2 * max_rank if module == "experts.gate_up_proj" else max_rank
    want = ([target.experts * rank, target.inner], [target.outer, target.experts * rank])
    if extra or [list(ab["A"]), list(ab["B"])] != [list(w) for w in want]:
        raise ConfigError(
            f"{folder}: layer {layer} {module} has lora_A {tuple(ab['A'])} and lora_B {tuple(ab['B'])}; the base "
            f"model needs [{target.experts} x r, {target.inner}] and [{target.outer}, {target.experts} x r]: "
            "is this adapter for another base model?"
        )
    if rank > limit:
        raise ConfigError(
            f"{folder}: layer {layer} {module} has rank {rank}, above the --max-lora-rank allows ({limit})"
        )
    return module


def expert_param(a_shape, b_shape, targets: dict[str, Target]) -> str | None:
    """Which stacked expert tensor a pair adapts, from its shapes: gate/up reads the hidden state
    and writes 2 x the expert width, down the reverse (never both, since 2I != I)."""
    for param in EXPERT_PARAMS:
        target = targets.get(f"experts.{param}")
        if target is not None and a_shape[1] == target.inner and b_shape[0] == target.outer:
            return f"experts.{param}"
    return None


def parse_tensor_name(name: str) -> tuple[int, str, str]:
    """(layer, PEFT module, "A" or "B") of an adapter tensor's name; a stacked-experts pair's
    module is ``experts`` or ``experts.base_layer`` until ``expert_param`` resolves it."""
    return _parse(name, None)


def module_path(layer: int, module: str) -> str:
    """The projection's name as PEFT's patterns match it: ``model.layers.3.self_attn.q_proj``."""
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


def _parse(name: str, folder: Path | None) -> tuple[int, str, str]:
    where = f"{folder}: " if folder else ""
    experts = _EXPERTS.match(name)
    if experts is not None:
        return int(experts[1]), experts[2], experts[3]
    if _PER_EXPERT.search(name):
        raise ConfigError(
            f"{where}tensor {name!r} adapts one module per expert (transformers 4's layout), which is not "
            "read; adapters of the stacked experts (peft's target_parameters, as peft writes them on "
            "transformers 5) are"
        )
    match = _NAME.match(name)
    if match is None:
        raise ConfigError(f"{where}tensor {name!r} is not a LoRA weight of a decoder projection")
    return int(match[1]), match[3], match[4]


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's JSON header."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def layer_shapes(cfg) -> list[dict[str, Target]]:
    """Per layer of a ``DecoderConfig``, each projection an adapter may target: the attention's;
    the MLP's where the layer is dense; in a mixture-of-experts layer, its stacked experts
    (``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I], as transformers 5
    holds them and PEFT adapts them) and its shared expert's (Qwen2-MoE: ``shared_expert.gate_proj`` ...).
    A model that stores q/k/v and gate/up fused (Phi-3) has ``qkv_proj`` and ``gate_up_proj`` instead."""
    q, kv, hidden = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
    attention = {
        "q_proj": Target(hidden, q),
        "k_proj": Target(hidden, kv),
        "v_proj": Target(hidden, kv),
        "o_proj": Target(q, hidden),
    }
    fused = cfg.fused_checkpoint  # Phi-3: the model has qkv_proj and gate_up_proj, so peft adapts those
    if fused:
        attention = {"qkv_proj": Target(hidden, q + 2 * kv), "o_proj": attention["o_proj"]}

    def mlp(inner: int, prefix: str = "") -> dict[str, Target]:
        gate, down = Target(hidden, inner), Target(inner, hidden)
        if fused and not prefix:
            return {"gate_up_proj": Target(hidden, 2 * inner), "down_proj": down}
        return {f"{prefix}gate_proj": gate, f"{prefix}up_proj": gate, f"{prefix}down_proj": down}

    moe = cfg.moe
    out = []
    for sparse in moe.sparse_layers if moe is not None else (False,) * cfg.num_layers:
        if not sparse:
            out.append(attention | mlp(cfg.intermediate_size))
            continue
        inner, experts = moe.intermediate_size, moe.num_experts
        stacked = {
            "experts.gate_up_proj": Target(hidden, 2 * inner, experts),
            "experts.down_proj": Target(inner, hidden, experts),
        }
        shared = mlp(moe.shared_intermediate_size, "shared_expert.") if moe.shared_intermediate_size else {}
        out.append(attention | stacked | shared)
    return out
