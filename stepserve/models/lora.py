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

A mixture's stacked experts take adapters too (``ExpertLora``): each (slot, expert) pair is a
LoRA of its own, so the same operation computes every token copy's delta with the pair
``slot * E + expert`` as its slot (``ExpertLoraInputs``, read by ``models.moe.experts``).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ExpertLoraInputs:
    """A forward's adapters on the stacked experts (``models.lora.ExpertLora``): the delta of
    token copy (t, k) with expert ``e`` is that of pair ``slots[t] * E + e`` (none where
    ``slots[t]`` is -1, the base), added to gate/up before the activation and to the expert's
    output, each as ``models.lora.lora_delta`` computes it."""

    a13: torch.Tensor  # [S * E, R13, H]
    b13: torch.Tensor  # [S * E, 2I, R13], scaled
    a2: torch.Tensor  # [S * E, R, I]
    b2: torch.Tensor  # [S * E, H, R], scaled
    slots: torch.Tensor  # [T] int32: each token's adapter slot, -1 for the base

    def pairs(self, tokens: torch.Tensor, expert: torch.Tensor | int, num_experts: int) -> torch.Tensor:
        """The (slot, expert) pair of copies of ``tokens`` routed to ``expert``; -1 for the base."""
        slot = self.slots.long()[tokens]
        return torch.where(slot >= 0, slot * num_experts + expert, -1)


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
    "experts": ("experts.gate_up_proj", "experts.down_proj"),  # a mixture's stacked experts (ExpertLora)
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

    experts = 1  # the pair's factor: one A and one B (see ExpertLora)

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
        slots = self.state.slots
        if slots is not None and x.shape[0] == 1 and x.dtype == self.lora_a.dtype and self.one_row_gemv():
            from stepserve.kernels.triton.lora import lora_gemv

            return lora_gemv(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, slots)
        y = self.base(x)
        if slots is None:
            return y
        return lora_delta(y, x.to(self.lora_a.dtype), self.lora_a, self.lora_b, slots, self.state.groups)

    def one_row_silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """For the gated MLP's gate/up projection: ``silu(gate) * up`` of one row in one GEMV with
        each adapter's delta in its epilogue (``lora_gemv(silu_mul=True)``; without adapters in
        the pass, ``gemv_silu_mul``), as ``forward`` then ``silu_and_mul`` compute it. None
        where ``forward`` would not take ``lora_gemv`` (``one_row_gemv``)."""
        if x.shape[0] != 1 or x.dtype != self.lora_a.dtype or not self.one_row_gemv():
            return None
        from stepserve.kernels.triton.gemv import gemv_silu_mul
        from stepserve.kernels.triton.lora import lora_gemv

        slots, base = self.state.slots, self.base
        if slots is None:
            return gemv_silu_mul(x, base.weight, None, base.bias)
        return lora_gemv(x, base.weight, base.bias, self.lora_a, self.lora_b, slots, silu_mul=True)

    def one_row_gemv(self) -> bool:
        """Whether a one-row pass (batch-1 decode) takes ``lora_gemv`` (the shrink, then the base
        projection with the expand in its epilogue): on CUDA, for a plain 16-bit
        ``nn.Linear`` (not FP8, nor a tensor-parallel wrapper)."""
        weight = self.base.weight
        return (
            type(self.base) is nn.Linear
            and weight.is_cuda
            and weight.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == self.lora_a.dtype
            and weight.is_contiguous()
        )

    def inner(self, index: int) -> int:
        """The input width of slice ``index`` (every slice reads the projection's input)."""
        return self.lora_a.shape[2]

    def max_rank_of(self, index: int) -> int:
        return self.max_rank

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


class ExpertLora(nn.Module):
    """Adapters of a mixture's stacked experts, beside its ``SparseMoE``: for every (slot, expert)
    pair ``p = slot * E + e``, gate/up's ``a13[p]`` [R13, H] and ``b13[p]`` [2I, R13] and down's
    ``a2[p]`` [R, I] and ``b2[p]`` [H, R], scaling folded into B. ``R`` is ``--max-lora-rank``
    and ``R13`` twice it: PEFT adapts the stacked gate/up tensor as one, with the rank of gate's
    and up's adapters together. Read from PEFT's tensors of a stacked parameter (ParamWrapper):
    ``lora_A`` [E * r, in] (expert-major rows), ``lora_B`` [out, r * E] (expert-minor columns).
    The expert computation (``models.moe.experts``) adds each token copy's delta before the
    activation and to its expert's output (``ExpertLoraInputs``)."""

    def __init__(self, moe: nn.Module, max_loras: int, max_rank: int, state: LoraState) -> None:
        super().__init__()
        experts, inner2, hidden = moe.w13.shape
        inner = inner2 // 2
        self.experts, self.max_rank, self.state = experts, max_rank, state  # experts: the pair's factor
        self.slices = (2 * inner, hidden)  # output rows of gate/up and of down
        self._inner = (hidden, inner)
        dtype = moe.w13.dtype if moe.w13.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        pairs, device = max_loras * experts, moe.w13.device
        self.register_buffer("a13", torch.zeros(pairs, 2 * max_rank, hidden, dtype=dtype, device=device))
        self.register_buffer("b13", torch.zeros(pairs, 2 * inner, 2 * max_rank, dtype=dtype, device=device))
        self.register_buffer("a2", torch.zeros(pairs, max_rank, inner, dtype=dtype, device=device))
        self.register_buffer("b2", torch.zeros(pairs, hidden, max_rank, dtype=dtype, device=device))

    def inner(self, index: int) -> int:
        return self._inner[index]

    def max_rank_of(self, index: int) -> int:
        return 2 * self.max_rank if index == 0 else self.max_rank

    def param_of(self, a: torch.Tensor, b: torch.Tensor) -> str | None:
        """Which stacked tensor a PEFT pair adapts, from its shapes (gate/up reads H, down I)."""
        for index, name in enumerate(TARGETS["experts"]):
            if a.shape[1] == self._inner[index] and b.shape[0] == self.slices[index]:
                return name
        return None

    def load(self, slot: int, slices: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Fill ``slot``'s pairs with one adapter: per tensor (gate/up, down), PEFT's
        (A [E * r, in], B scaled [out, r * E]) or None."""
        span = slice(slot * self.experts, (slot + 1) * self.experts)
        for (a_buf, b_buf), pair in zip(((self.a13, self.b13), (self.a2, self.b2)), slices):
            a_buf[span].zero_()
            b_buf[span].zero_()
            if pair is None:
                continue
            a, b = pair
            rank = a.shape[0] // self.experts
            a_buf[span, :rank].copy_(a.view(self.experts, rank, a.shape[1]))
            b_buf[span, :, :rank].copy_(b.view(b.shape[0], rank, self.experts).permute(2, 0, 1))

    def inputs(self) -> ExpertLoraInputs | None:
        """This forward's adapters for ``models.moe.experts``; None without adapters in the batch."""
        slots = self.state.slots
        if slots is None:
            return None
        return ExpertLoraInputs(self.a13, self.b13, self.a2, self.b2, slots)


def attach_lora(model: nn.Module, max_loras: int, max_rank: int) -> LoraState:
    """Wrap every adaptable projection of the model's layers in a ``LoraLinear`` (slots of zeros):
    the attention's, a dense MLP's, a mixture's shared expert; and give a mixture's stacked
    experts an ``ExpertLora``."""
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
        if hasattr(layer.mlp, "w13"):  # a mixture's stacked experts
            layer.mlp.expert_lora = ExpertLora(layer.mlp, max_loras, max_rank, state)
    model.lora_state = state
    return state


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module inside the wrappers tensor parallelism puts around row-parallel projections and
    a mixture's whole MLP (``distributed.layers.AllReduced``, which keeps it as ``inner``)."""
    while not isinstance(module, LoraLinear) and isinstance(getattr(module, "inner", None), nn.Module):
        module = module.inner
    return module


def _gated_mlps(layer: nn.Module) -> dict[str, nn.Module]:
    """A layer's gated MLPs an adapter may target, by the prefix of their TARGETS: the dense MLP
    (""), or a mixture's shared expert ("shared_expert.")."""
    mlp = _unwrapped(layer.mlp)
    if hasattr(mlp, "gate_up_proj"):
        return {"": mlp}
    shared = getattr(mlp, "shared_expert", None)
    return {"shared_expert.": shared} if shared is not None else {}


def warm_up_lora_kernels(model: nn.Module, max_tokens: int) -> int:
    """On CUDA, compile the LoRA kernels for every projection shape and batch size class a pass
    up to ``max_tokens`` tokens can bring (``kernels.triton.lora.warm_up``); the calls made."""
    pairs = {}  # (A, B, most rows a call brings)
    one_row = {}  # a LoraLinear of each shape whose one-row pass takes lora_gemv
    gated = getattr(model.cfg, "activation", None) == "silu"  # gate/up's one row also takes silu_and_mul
    for found in adapted_layers(model):
        for name, linear in found.items():
            if isinstance(linear, ExpertLora):  # rows: the token copies grouped by expert, padded
                rows = max_tokens * model.cfg.moe.top_k + model.cfg.moe.num_experts * 128  # tiles of <= 128
                for a, b in ((linear.a13, linear.b13), (linear.a2, linear.b2)):
                    pairs[(a.shape, b.shape)] = (a, b, rows)
            else:
                pairs.setdefault((linear.lora_a.shape, linear.lora_b.shape), (linear.lora_a, linear.lora_b, max_tokens))
                if linear.one_row_gemv():
                    base, silu_mul = linear.base, gated and name.endswith("gate_up_proj")
                    one_row[(base.weight.shape, base.bias is None, linear.lora_a.shape, silu_mul)] = (linear, silu_mul)
    if not pairs or not next(iter(pairs.values()))[0].is_cuda:
        return 0
    from stepserve.kernels.triton.lora import lora_gemv, warm_up

    for linear, silu_mul in one_row.values():  # batch-1 decode's kernels (the graphs' capture would compile them too)
        x = torch.zeros(1, linear.lora_a.shape[2], dtype=linear.lora_a.dtype, device=linear.lora_a.device)
        slots = torch.zeros(1, dtype=torch.int32, device=x.device)
        lora_gemv(x, linear.base.weight, linear.base.bias, linear.lora_a, linear.lora_b, slots, silu_mul=silu_mul)
    return len(one_row) + sum(warm_up(a, b, rows) for a, b, rows in pairs.values())


def adapted_layers(model: nn.Module) -> list[dict[str, nn.Module]]:
    """Per layer: target name -> its ``LoraLinear`` (or ``ExpertLora``, as "experts")."""
    out = []
    for layer in model.layers:
        found = {}
        for name in ("qkv_proj", "o_proj"):
            module = _unwrapped(getattr(layer.self_attn, name))
            if isinstance(module, LoraLinear):
                found[name] = module
        for prefix, mlp in _gated_mlps(layer).items():
            for name in ("gate_up_proj", "down_proj"):
                module = _unwrapped(getattr(mlp, name))
                if isinstance(module, LoraLinear):
                    found[prefix + name] = module
        experts = getattr(_unwrapped(layer.mlp), "expert_lora", None)
        if experts is not None:
            found["experts"] = experts
        out.append(found)
    return out


def read_adapter_weights(config, layers: list[dict[str, nn.Module]], shard=None) -> list[dict[str, list]]:
    """The adapter's tensors (PEFT names), checked against the model's projections: per layer,
    target -> per slice (A, B * scaling) or None. ``ConfigError`` for a shape that does not fit.
    ``shard``: under tensor parallelism, ``(module path, A, B) -> (A, B)`` this rank's share of a
    pair (``distributed.sharding.cut_adapter``), taken before the shapes are checked against the
    rank's projections."""
    from safetensors.torch import load_file

    from stepserve.checkpoint.lora import FUSED_MODULES, WEIGHTS_FILE, module_path, parse_tensor_name
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
        found = layers[layer] if layer < len(layers) else {}
        a, b = ab["A"], ab["B"]
        if module.startswith("experts"):
            experts = found.get("experts")
            module, a, b = _resolve_experts(experts, layer, a, b, shard) if experts is not None else (None, a, b)
            if module is None:
                raise ConfigError(f"{config.path}: layer {layer} has no stacked experts of these shapes here")
        elif shard is not None:
            a, b = shard(module_path(layer, module), a, b)
        fused = module in FUSED_MODULES  # one pair over every slice of the projection (Phi-3)
        target = module if fused else next(t for t, slices in TARGETS.items() if module in slices)
        linear = found.get(target)
        if linear is None:
            raise ConfigError(f"{config.path}: layer {layer} has no adaptable {target} here")
        index = 0 if fused else TARGETS[target].index(module)
        rank = a.shape[0] // linear.experts
        expect_a = (linear.experts * rank, linear.inner(index))
        expect_b = (sum(linear.slices) if fused else linear.slices[index], linear.experts * rank)
        if tuple(a.shape) != expect_a or tuple(b.shape) != expect_b or rank > linear.max_rank_of(index):
            raise ConfigError(
                f"{config.path}: layer {layer} {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"the base model needs {expect_a} and {expect_b} with rank <= {linear.max_rank_of(index)} "
                "(is this adapter for another base model?)"
            )
        slices = out[layer].setdefault(target, [None] * len(TARGETS[target]))
        scaled = b * config.scaling_of(module_path(layer, module), rank)
        if fused:  # each slice: the one A, and its own rows of B
            slices[:] = [(a, rows) for rows in scaled.split(list(linear.slices))]
        else:
            slices[index] = (a, scaled)
    return out


def _resolve_experts(experts: ExpertLora, layer: int, a: torch.Tensor, b: torch.Tensor, shard):
    """(stacked tensor, A, B) of a stacked-experts pair, told by its shapes (``param_of``) once cut
    as that tensor would be (``shard``, under tensor parallelism); (None, A, B) if none fits."""
    from stepserve.checkpoint.lora import module_path

    for name in TARGETS["experts"]:
        cut_a, cut_b = shard(module_path(layer, name), a, b) if shard is not None else (a, b)
        if experts.param_of(cut_a, cut_b) == name:
            return name, cut_a, cut_b
    return None, a, b
