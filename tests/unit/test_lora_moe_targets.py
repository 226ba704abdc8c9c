"""Which projections of a mixture-of-experts model an adapter may target (docs/lora.md): the
attention everywhere, the dense MLP of the layers that have one (``mlp_only_layers``), the
stacked experts (PEFT's ``target_parameters``: ``lora_A`` [E * r, in], ``lora_B`` [out, r * E],
told apart by their shapes) and Qwen2-MoE's shared expert; one module per expert (transformers
4's layout) and an MLP projection of a sparse layer are refused, naming the tensor's layer and
module; per-module alphas (``alpha_pattern``) scale as PEFT scales them."""

import json

import pytest
import torch
from safetensors.torch import save_file

from stepserve.checkpoint.lora import WEIGHTS_FILE, layer_shapes, read_adapter_config
from stepserve.config import ConfigError
from stepserve.models.registry import decoder_config

COMMON = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
QWEN2_MOE = dict(
    COMMON,
    architectures=["Qwen2MoeForCausalLM"],
    model_type="qwen2_moe",
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=8,
    num_experts_per_tok=2,
)
QWEN3_MOE = dict(
    COMMON,
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    head_dim=16,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    mlp_only_layers=[1],
)


def adapter(path, tensors: dict[str, tuple[int, int]], rank=4):
    """A PEFT folder whose tensors have the given names and shapes."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank}))
    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, str(path / WEIGHTS_FILE))
    return path


def pair(layer: str, module: str, inner: int, outer: int, rank=4) -> dict:
    stem = f"base_model.model.model.layers.{layer}.{module}"
    return {f"{stem}.lora_A.weight": (rank, inner), f"{stem}.lora_B.weight": (outer, rank)}


def test_layer_shapes_follow_each_layers_mlp():
    qwen2 = layer_shapes(decoder_config(QWEN2_MOE, 256))
    assert all(
        s["shared_expert.gate_proj"] == (64, 48, 1) and s["shared_expert.down_proj"] == (48, 64, 1) for s in qwen2
    )
    assert all(s["experts.gate_up_proj"] == (64, 64, 8) and s["experts.down_proj"] == (32, 64, 8) for s in qwen2)
    assert all("gate_proj" not in s for s in qwen2) and all(s["k_proj"] == (64, 32, 1) for s in qwen2)
    qwen3 = layer_shapes(decoder_config(QWEN3_MOE, 256))
    assert [("gate_proj" in s, "experts.down_proj" in s) for s in qwen3] == [
        (False, True),
        (True, False),
        (False, True),
    ]
    assert qwen3[1]["down_proj"] == (128, 64, 1) and all("shared_expert.up_proj" not in s for s in qwen3)


def test_shared_expert_and_dense_layers_are_accepted(tmp_path):
    cfg = decoder_config(QWEN2_MOE, 256)
    tensors = pair(0, "mlp.shared_expert.gate_proj", 64, 48) | pair(2, "mlp.shared_expert.down_proj", 48, 64)
    tensors |= pair(1, "self_attn.q_proj", 64, 64)
    got = read_adapter_config(adapter(tmp_path / "a", tensors), 8, layer_shapes(cfg))
    assert got.modules == ("q_proj", "shared_expert.down_proj", "shared_expert.gate_proj")
    cfg = decoder_config(QWEN3_MOE, 256)
    got = read_adapter_config(adapter(tmp_path / "b", pair(1, "mlp.up_proj", 64, 128)), 8, layer_shapes(cfg))
    assert got.modules == ("up_proj",)


def test_stacked_experts_are_told_apart_by_shape_and_scaled_by_pattern(tmp_path):
    """As peft writes them on transformers 5: gate/up (rank 2r, its own alpha by alpha_pattern)
    one ``base_layer`` deeper than down, or the other way round."""
    cfg = decoder_config(QWEN3_MOE, 256)
    experts = 8
    stem = "base_model.model.model.layers.0.mlp.experts"
    tensors = {
        f"{stem}.base_layer.lora_A.weight": (experts * 8, 64),  # gate/up: reads H, writes 2I
        f"{stem}.base_layer.lora_B.weight": (64, experts * 8),
        f"{stem}.lora_A.weight": (experts * 4, 32),  # down: reads I, writes H
        f"{stem}.lora_B.weight": (64, experts * 4),
    }
    path = adapter(tmp_path / "a", tensors)
    config = json.loads((path / "adapter_config.json").read_text())
    config |= {"lora_alpha": 8, "use_rslora": True, "alpha_pattern": {".*\\.gate_up_proj": 16}}
    (path / "adapter_config.json").write_text(json.dumps(config))
    got = read_adapter_config(path, 4, layer_shapes(cfg))
    assert got.modules == ("experts.down_proj", "experts.gate_up_proj")
    assert got.scaling_of("model.layers.0.mlp.experts.gate_up_proj", 8) == pytest.approx(16 / 8**0.5)
    assert got.scaling_of("model.layers.0.mlp.experts.down_proj", 4) == pytest.approx(8 / 2)
    swapped = {
        k.replace(".base_layer", ".X").replace(".lora_", ".base_layer.lora_").replace(".X.base_layer", ""): v
        for k, v in tensors.items()
    }
    assert read_adapter_config(adapter(tmp_path / "b", swapped), 4, layer_shapes(cfg)).modules == got.modules


@pytest.mark.parametrize(
    "tensors, message",
    [
        (pair(0, "mlp.gate_proj", 64, 128), "layer 0 has no gate_proj"),  # layer 0 is sparse
        (pair(2, "mlp.shared_expert.up_proj", 64, 48), "layer 2 has no shared_expert.up_proj"),
        (pair(0, "mlp.experts.3.gate_proj", 64, 32), "one module per expert"),
        (pair(1, "mlp.experts", 64, 64, rank=32), "layer 1 has no experts"),  # layer 1 is dense
        (pair(0, "mlp.experts", 64, 64, rank=8 * 9), "rank 9, above"),  # gate/up: 2 x --max-lora-rank 4 at most
        (pair(0, "mlp.experts", 64, 64, rank=12), "is this adapter for another base model"),  # 12 rows: no 8 x r
        (pair(1, "mlp.gate_proj", 64, 96), "is this adapter for another base model"),
    ],
)
def test_what_a_mixture_cannot_take_is_refused_by_name(tmp_path, tensors, message):
    with pytest.raises(ConfigError, match=message):
        read_adapter_config(adapter(tmp_path / "a", tensors), 4, layer_shapes(decoder_config(QWEN3_MOE, 256)))
