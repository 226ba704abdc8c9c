"""LoRA adapters in a batch: each token adds its adapter's low-rank delta to a projection.

A projection with adapters holds, for every resident adapter slot, ``A`` [rank, in] and ``B``
[out, rank], stacked: ``lora_a`` [slots, R, in] and ``lora_b`` [slots, out, R], with ``R`` the
server's ``--max-lora-rank`` (a smaller rank is zero-padded) and PEFT's scaling (``alpha / r``,
or ``alpha / sqrt(r)`` with ``use_rslora``) folded into ``B`` at load. A fused projection
(``qkv_proj``, ``gate_up_proj``) keeps one ``A`` and one ``B`` for all its slices: the slices'
``A`` rows one after the other along the rank axis (``R`` counts them all), and ``B``
block-diagonal (a slice's output rows read only its own rank columns), so the delta of the fused
output is one shrink and one expand.

The batched computation is one operation behind one interface,
``lora_delta(y, x, lora_a, lora_b, slots)``: ``y[t] += lora_b[s] @ (lora_a[s] @ x[t])`` for the
slot ``s = slots[t]`` of each token, nothing where ``s < 0`` (the base model). ``lora_reference``
is the PyTorch twin (tokens grouped by slot, one matmul pair per slot in use) for the CPU and the
GPU tests; the Triton kernels (``kernels.triton.lora``) run it on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def lora_reference(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """``y`` [T, out] plus each token's adapter delta (in place, returned): the shrink
    ``x @ A.T`` in float32, rounded to ``x``'s dtype, then the expand ``@ B.T`` in float32, added
    and rounded to ``y``'s dtype."""
    if x.shape[0] == 0:
        return y
    used = torch.unique(slots).tolist()
    for slot in used:
        if slot < 0:
            continue
        rows = (slots == slot).nonzero(as_tuple=True)[0]
        shrunk = F.linear(x.index_select(0, rows).float(), lora_a[slot].float()).to(x.dtype)
        delta = F.linear(shrunk.float(), lora_b[slot].float())
        y.index_copy_(0, rows, (y.index_select(0, rows).float() + delta).to(y.dtype))
    return y


def lora_delta(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    cache: dict | None = None,
) -> torch.Tensor:
    """The batched LoRA delta added to ``y``: the Triton kernels on CUDA (``cache`` shares the
    tokens' grouping between the calls of one forward), the reference elsewhere."""
    if y.is_cuda:
        from stepserve.kernels.triton.lora import lora_delta as triton_delta

        return triton_delta(y, x, lora_a, lora_b, slots, cache)
    return lora_reference(y, x, lora_a, lora_b, slots)


# -- adapters on a model ------------------------------------------------------------------

# The projections an adapter may target, and the PEFT module names each one stands for (its slices,
# in the fused projection's output order).
TARGETS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
    "shared_expert.gate_up_proj": ("shared_expert.gate_proj", "shared_expert.up_proj"),  # Qwen2-MoE
    "shared_expert.down_proj": ("shared_expert.down_proj",),
}
PEFT_MODULES = frozenset(m for slices in TARGETS.values() for m in slices)


class LoraState:
    """The current step's slot per token, shared by every adapted projection of a model (the
    runner sets it before each forward); None or all -1: no adapter in the batch. Setting it
    empties ``groups``, where the projections of that forward share the tokens' grouping by slot
    (so a CUDA graph captured after the assignment records the grouping too)."""

    def __init__(self) -> None:
        self._slots: torch.Tensor | None = None
        self.groups: dict = {}

    @property
    def slots(self) -> torch.Tensor | None:
        return self._slots

    @slots.setter
    def slots(self, value: torch.Tensor | None) -> None:
        self._slots = value
        self.groups = {}


class LoraLinear(nn.Module):
    """A projection plus the batched delta of its adapters (see the module docstring)."""

    def __init__(self, base: nn.Module, slices: tuple[int, ...], max_loras: int, max_rank: int, state: LoraState):
        super().__init__()
        self.base = base
        weight = base.weight
        out_features, in_features = sum(slices), weight.shape[1]
        self.slices = slices  # output rows of each slice (q, k, v; gate, up; or one)
        self.max_rank = max_rank
        rank = max_rank * len(slices)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        self.register_buffer("lora_a", torch.zeros(max_loras, rank, in_features, dtype=dtype, device=weight.device))
        self.register_buffer("lora_b", torch.zeros(max_loras, out_features, rank, dtype=dtype, device=weight.device))
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        slots = self.state.slots
        if slots is None:
            return y
        return lora_delta(y, x.to(self.lora_a.dtype), self.lora_a, self.lora_b, slots, self.state.groups)

    def load(self, slot: int, slices: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Fill ``slot`` with one adapter: per slice, (A [r, in], B scaled [out_slice, r]) or None."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        row = 0
        for i, pair in enumerate(slices):
            if pair is not None:
                a, b = pair
                rank = a.shape[0]
                cols = slice(i * self.max_rank, i * self.max_rank + rank)
                self.lora_a[slot, cols].copy_(a)
                self.lora_b[slot, row : row + self.slices[i], cols].copy_(b)
            row += self.slices[i]


def attach_lora(model: nn.Module, max_loras: int, max_rank: int) -> LoraState:
    """Wrap every adaptable projection of the model's layers in a ``LoraLinear`` (slots of zeros):
    the attention's, a dense MLP's, and a mixture's shared expert (its routed experts take none)."""
    state = LoraState()
    cfg = model.cfg
    for layer in model.layers:
        attn = layer.self_attn
        kv = attn.num_kv_heads * attn.head_dim
        attn.qkv_proj = LoraLinear(attn.qkv_proj, (attn.q_size, kv, kv), max_loras, max_rank, state)
        attn.o_proj = LoraLinear(attn.o_proj, (cfg.hidden_size,), max_loras, max_rank, state)
        for mlp in _gated_mlps(layer).values():
            inner = mlp.down_proj.weight.shape[1]
            mlp.gate_up_proj = LoraLinear(mlp.gate_up_proj, (inner, inner), max_loras, max_rank, state)
            mlp.down_proj = LoraLinear(mlp.down_proj, (cfg.hidden_size,), max_loras, max_rank, state)
    model.lora_state = state
    return state


def _gated_mlps(layer: nn.Module) -> dict[str, nn.Module]:
    """A layer's gated MLPs an adapter may target, by the prefix of their TARGETS: the dense MLP
    (""), or a mixture's shared expert ("shared_expert.")."""
    mlp = layer.mlp
    if hasattr(mlp, "gate_up_proj"):
        return {"": mlp}
    shared = getattr(mlp, "shared_expert", None)
    return {"shared_expert.": shared} if shared is not None else {}


def warm_up_lora_kernels(model: nn.Module, max_tokens: int) -> int:
    """On CUDA, compile the LoRA kernels for every projection shape and batch size class a pass
    up to ``max_tokens`` tokens can bring (``kernels.triton.lora.warm_up``); the calls made."""
    shapes = {}
    for found in adapted_layers(model):
        for linear in found.values():
            shapes.setdefault((linear.lora_a.shape, linear.lora_b.shape), linear)
    if not shapes or not next(iter(shapes.values())).lora_a.is_cuda:
        return 0
    from stepserve.kernels.triton.lora import warm_up

    return sum(warm_up(linear.lora_a, linear.lora_b, max_tokens) for linear in shapes.values())


def adapted_layers(model: nn.Module) -> list[dict[str, LoraLinear]]:
    """Per layer: projection name -> its ``LoraLinear``."""
    out = []
    for layer in model.layers:
        found = {}
        for name in ("qkv_proj", "o_proj"):
            module = getattr(layer.self_attn, name)
            if isinstance(module, LoraLinear):
                found[name] = module
        for prefix, mlp in _gated_mlps(layer).items():
            for name in ("gate_up_proj", "down_proj"):
                module = getattr(mlp, name)
                if isinstance(module, LoraLinear):
                    found[prefix + name] = module
        out.append(found)
    return out


def read_adapter_weights(config, layers: list[dict[str, LoraLinear]]) -> list[dict[str, list]]:
    """The adapter's tensors (PEFT names), checked against the model's projections: per layer,
    projection -> per slice (A, B * scaling) or None. ``ConfigError`` for a shape that does not fit."""
    from safetensors.torch import load_file

    from stepserve.checkpoint.lora import WEIGHTS_FILE, parse_tensor_name
    from stepserve.config import ConfigError

    tensors = load_file(f"{config.path}/{WEIGHTS_FILE}")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        layer, module, which = parse_tensor_name(name)
        pairs.setdefault((layer, module), {})[which] = tensor
    out: list[dict[str, list]] = [{} for _ in layers]
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{config.path}: layer {layer} {module} has lora_{''.join(ab)} without its pair")
        target = next(t for t, slices in TARGETS.items() if module in slices)
        linear = layers[layer].get(target) if layer < len(layers) else None
        if linear is None:
            raise ConfigError(f"{config.path}: layer {layer} has no adaptable {target} here")
        index = TARGETS[target].index(module)
        a, b = ab["A"], ab["B"]
        expect_a, expect_b = (config.rank, linear.lora_a.shape[2]), (linear.slices[index], config.rank)
        if tuple(a.shape) != expect_a or tuple(b.shape) != expect_b:
            raise ConfigError(
                f"{config.path}: layer {layer} {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"the base model needs {expect_a} and {expect_b} (is this adapter for another base model?)"
            )
        slices = out[layer].setdefault(target, [None] * len(TARGETS[target]))
        slices[index] = (a, b * config.scaling)
    return out
