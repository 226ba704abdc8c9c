"""A model's maths read from its ``config.json``, without PyTorch: the ``DecoderConfig`` every
family fills in (``llama.py``, ``qwen.py``, ...), the rotary's scaling and an FP8 checkpoint's
format. The front checks a model with these before any weight is read; the engine builds the
model from the same ``DecoderConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepserve.config import ConfigError

# hidden_act names the layers implement (``layers.ACTIVATIONS`` maps each to its function)
ACTIVATION_NAMES = ("silu", "gelu_pytorch_tanh", "gelu_tanh", "gelu")

# rope type -> the keys it needs (beyond rope_type itself)
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("long_factor", "short_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class RopeConfig:
    """One rotary embedding: base, how many dims it rotates, and its scaling."""

    theta: float  # rope_theta
    rotary_dim: int  # dims rotated per head (head_dim * partial_rotary_factor), even
    kind: str = "default"  # a key of ROPE_TYPES
    params: tuple[tuple[str, object], ...] = ()  # the scaling's parameters as sorted pairs
    max_position_embeddings: int = 0  # the model's (longrope derives its default factor from it)
    long_context: bool = False  # longrope: use the long factors (the served context exceeds the original)

    def param(self, key: str, default=None):
        return dict(self.params).get(key, default)


def rope_config(rope: dict, theta: float, head_dim: int, max_positions: int, where: str = "rope_scaling") -> RopeConfig:
    """Validate a rope_parameters / rope_scaling dict; anything we do not implement is refused."""
    rope = {k: v for k, v in rope.items() if v is not None}
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    kind = {"su": "longrope"}.get(kind, kind)  # early Phi-3 configs' name for it
    factor = rope.pop("partial_rotary_factor", 1.0)
    rope.pop("rope_theta", None)
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    missing = [k for k in ROPE_TYPES[kind] if k not in rope]
    if missing:
        raise ConfigError(f"{where}: rope type {kind!r} needs {', '.join(missing)}")
    rotary_dim = int(head_dim * float(factor))
    if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
        raise ConfigError(
            f"partial_rotary_factor={factor} gives {rotary_dim} rotary "
            f"dims of head_dim {head_dim}; it must be even and positive"
        )
    if kind == "longrope" and len(rope["short_factor"]) != rotary_dim // 2:
        raise ConfigError(
            f"{where}: longrope short_factor has {len(rope['short_factor'])} entries, expected {rotary_dim // 2}"
        )
    params = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))
    return RopeConfig(float(theta), rotary_dim, kind, params, max_positions)


FP8_METHODS = ("compressed-tensors", "fp8")
DROPPED_SUFFIXES = (".input_scale", ".k_scale", ".v_scale")


@dataclass(frozen=True)
class Fp8Format:
    method: str  # "compressed-tensors" or "fp8"
    scale_suffix: str  # the scale tensor beside each quantized ``.weight``
    block: tuple[int, int] | None  # block-wise scales: (rows, cols) of a block


def fp8_format(hf_config: dict) -> Fp8Format | None:
    """The FP8 format of a config's ``quantization_config``; None without one. Raises
    ConfigError, naming what it found, for any other quantization."""
    quant = hf_config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
    if method == "fp8":
        if quant.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"quantization_config fmt={quant.get('fmt')!r} is not supported; supported: e4m3")
        block = quant.get("weight_block_size")
        return Fp8Format("fp8", "weight_scale_inv" if block else "weight_scale", tuple(block) if block else None)
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    raise ConfigError(
        f"quantization method {method!r} is not supported (config.json quantization_config); supported: "
        f"FP8 checkpoints ({' or '.join(FP8_METHODS)}), unquantized safetensors, GGUF files (dequantized), "
        "and stepserve's own --quantization int4 (CPU) and fp8 (CUDA)"
    )


def _compressed_tensors(quant: dict) -> Fp8Format:
    fmt = quant.get("format", "float-quantized")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ConfigError(
            f"compressed-tensors format {fmt!r} is not supported; supported: float-quantized (FP8 weights)"
        )
    blocks = set()
    for name, group in (quant.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        kind = (weights.get("type"), weights.get("num_bits"))
        if kind != ("float", 8):
            raise ConfigError(
                f"compressed-tensors group {name!r}: {kind[1]}-bit {kind[0]} "
                "weights are not supported; supported: 8-bit float (FP8)"
            )
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "block"):
            raise ConfigError(
                f"compressed-tensors group {name!r}: weight strategy "
                f"{strategy!r} is not supported; supported: tensor, channel, block"
            )
        if strategy == "block":
            blocks.add(tuple(weights.get("block_structure") or (128, 128)))
    if len(blocks) > 1:
        raise ConfigError(
            f"compressed-tensors groups with different block structures {sorted(blocks)} are not supported"
        )
    return Fp8Format("compressed-tensors", "weight_scale", blocks.pop() if blocks else None)


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts MLP (``moe.SparseMoE``): which layers have one, and its shape."""

    num_experts: int
    top_k: int  # experts per token
    intermediate_size: int  # each expert's inner width
    renormalize: bool  # the top-k weights divided by their sum (norm_topk_prob; always for Mixtral)
    sparse_layers: tuple[bool, ...]  # per layer: the MoE block (True) or the dense MLP
    shared_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)


@dataclass(frozen=True)
class DecoderConfig:
    """Everything that shapes a decoder's maths (its MLPs dense, or mixtures of experts)."""

    architecture: str  # config.json's architectures[0]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig  # the rotary of full-attention layers (and of windowed ones without local_rope)
    layer_windows: tuple[int, ...]  # per layer: keys a query sees, itself included; 0 = all
    attn_scale: float  # multiplies q.k
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"  # one of ACTIVATION_NAMES
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotary (Qwen3, Gemma 3)
    norm_offset: bool = False  # RMSNorm multiplies by (1 + w) (Gemma)
    sandwich_norms: bool = False  # norms after attention and MLP too (Gemma 2/3)
    local_rope: RopeConfig | None = None  # windowed layers' own rotary (Gemma 3)
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap); 0 = off (Gemma 2)
    final_softcap: float = 0.0  # the same on the logits (Gemma 2)
    embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden); Granite)
    residual_scale: float = 1.0  # each branch times this before the residual add (Granite)
    logits_divisor: float = 1.0  # logits divided by this (Granite's logits_scaling)
    fused_checkpoint: bool = False  # the checkpoint stores qkv_proj and gate_up_proj fused (Phi-3)
    moe: MoEConfig | None = None  # mixture-of-experts layers (Qwen3-MoE, Qwen2-MoE, Mixtral)

    @property
    def all_windowed(self) -> bool:
        return all(w > 0 for w in self.layer_windows)


def _rope_dict(hf: dict, layer_type: str | None = None) -> dict:
    """The rope parameters of ``config.json``, new (``rope_parameters``) or old spelling."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if layer_type is not None and layer_type in rope:  # per layer type (Gemma 3 in transformers 5)
        rope = rope[layer_type]
    rope = dict(rope)
    for key in ("partial_rotary_factor", "original_max_position_embeddings"):
        if key in hf and key not in rope:
            rope[key] = hf[key]
    return rope


def rope_from_hf(
    hf: dict, head_dim: int, max_model_len: int, layer_type: str | None = None, theta: float | None = None
) -> RopeConfig:
    rope = _rope_dict(hf, layer_type)
    theta = theta or rope.get("rope_theta") or hf.get("rope_theta", 10000.0)
    where = "rope_parameters" if "rope_parameters" in hf else "rope_scaling"
    cfg = rope_config(rope, theta, head_dim, hf.get("max_position_embeddings", 2048), where)
    if cfg.kind == "longrope":
        long = max_model_len > cfg.param("original_max_position_embeddings")
        cfg = RopeConfig(cfg.theta, cfg.rotary_dim, cfg.kind, cfg.params, cfg.max_position_embeddings, long)
    return cfg


def check_common(hf: dict, arch: str) -> None:
    """Refuse what no family implements: quantized checkpoints other than FP8 ones (which the
    loader dequantizes, ``fp8_checkpoint``) and unknown activations."""
    fp8_format(hf)  # raises for any other quantization_config
    act = hf.get("hidden_act") or hf.get("hidden_activation") or "silu"
    if act not in ACTIVATION_NAMES:
        raise ConfigError(f"hidden_act={act!r} is not supported for {arch}; supported: {', '.join(ACTIVATION_NAMES)}")


def base_fields(hf: dict, arch: str, max_model_len: int) -> dict:
    """The fields every family reads the same way; a family overrides what differs."""
    check_common(hf, arch)
    unknown = sorted(set(hf.get("layer_types") or ()) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ConfigError(f"layer_types {unknown} are not supported; supported: full_attention, sliding_attention")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    layers = hf["num_hidden_layers"]
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf.get("intermediate_size") or 0,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope=rope_from_hf(hf, head_dim, max_model_len),
        layer_windows=(0,) * layers,
        attn_scale=head_dim**-0.5,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        activation=hf.get("hidden_act") or hf.get("hidden_activation") or "silu",
    )


def windows_from_layer_types(hf: dict, default_types: list[str]) -> tuple[int, ...]:
    """Per-layer windows from ``layer_types`` (saved by transformers 5) or the family's default."""
    types = hf.get("layer_types") or default_types
    window = hf.get("sliding_window") or 0
    if len(types) != hf["num_hidden_layers"]:
        raise ConfigError(f"layer_types has {len(types)} entries for {hf['num_hidden_layers']} layers")
    if "sliding_attention" in types and window <= 0:
        raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
    return tuple(window if t == "sliding_attention" else 0 for t in types)
