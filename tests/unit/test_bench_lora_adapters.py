"""The LoRA benchmark's adapters, written without peft, are folders the server accepts: a PEFT
LoRA on all seven projections of every layer, of the base model's shapes."""

import json

from safetensors import safe_open

from stepserve.bench.gpu_lora import write_adapter, write_adapters
from stepserve.checkpoint.lora import SUPPORTED_MODULES, WEIGHTS_FILE, layer_shapes, read_adapter_config
from stepserve.models.registry import decoder_config

# The 8B shape's layout, shrunk: grouped KV heads, a head_dim apart from hidden / heads.
TINY = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=100,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def test_adapter_is_accepted_with_the_base_shapes(tmp_path):
    cfg = decoder_config(TINY, 256)
    path = write_adapter(tmp_path / "a", cfg, seed=0, rank=16, alpha=32)
    adapter = read_adapter_config(path, 16, layer_shapes(cfg))
    assert adapter.rank == 16 and adapter.scaling_of("model.layers.0.self_attn.q_proj", 16) == 32 / 16
    assert set(adapter.modules) == set(SUPPORTED_MODULES)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == "random-8b"
    with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
        names = set(f.keys())
        down_b = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
        k_a = f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight")
    assert len(names) == 2 * len(SUPPORTED_MODULES) * cfg.num_layers
    assert tuple(down_b.shape) == (64, 16) and tuple(k_a.shape) == (16, 64)
    assert str(k_a.dtype) == "torch.bfloat16" and 0.005 < k_a.float().std().item() < 0.02


def test_adapters_differ_and_have_distinct_ids(tmp_path):
    refs = write_adapters(tmp_path, decoder_config(TINY, 256), count=3)
    assert [r.id for r in refs] == [1, 2, 3] and len({r.path for r in refs}) == 3
    weights = [(tmp_path / f"adapter-{i}" / WEIGHTS_FILE).read_bytes() for i in range(3)]
    assert len(set(weights)) == 3
