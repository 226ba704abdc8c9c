"""The MoE benchmark's batch-1 bandwidth bound counts the bytes a decode token reads, by hand."""

from stepserve.bench.gpu import MAX_MODEL_LEN, SHAPES
from stepserve.bench.gpu_moe import MOE, decode_bytes
from stepserve.models.registry import decoder_config

# Two layers: layer 0 a mixture (8 experts of width 32, 2 a token), layer 1 dense (width 48).
TINY = dict(
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    vocab_size=100,
    hidden_size=64,
    intermediate_size=48,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def test_bf16_bytes_by_hand():
    cfg = decoder_config(TINY, 256)
    attention = (64 * 64 + 2 * (32 * 64) + 64 * 64) * 2  # q [64, 64], k and v [32, 64], o [64, 64]
    norms = (2 * 64 + 2 * 16) * 2  # input and post-attention norms, q_norm and k_norm
    router = 8 * 64 * 2
    experts = 2 * (2 * 32 * 64 + 64 * 32) * 2  # top 2 of w13 [64, 64] and w2 [64, 32]
    dense = (2 * 48 * 64 + 64 * 48) * 2
    final = 64 * 2 + 100 * 64 * 2 + 64 * 2  # final norm, LM head, the embedding row
    assert attention + norms == 24896 and router + experts == 25600 and dense == 18432 and final == 13056
    need = decode_bytes(cfg)
    assert need.weights == 2 * 24896 + 25600 + 18432 + 13056 == 106880
    assert need.kv_per_context_token == 2 * 2 * 32 * 2  # layers x (k, v) x 2 heads of 16 x bf16


def test_fp8_bytes_by_hand():
    """Projections (experts included) one byte a weight and 4 a channel's scale; the router, the
    norms, the head and the embedding stay bf16."""
    cfg = decoder_config(TINY, 256)
    attention = 64 * 64 + 2 * (32 * 64) + 64 * 64 + (64 + 32 + 32 + 64) * 4
    norms = (2 * 64 + 2 * 16) * 2
    experts = 2 * (2 * 32 * 64 + 64 * 32 + (64 + 64) * 4)
    dense = 2 * 48 * 64 + 64 * 48 + (96 + 64) * 4
    assert attention + norms == 13376 and experts == 13312 and dense == 9856
    need = decode_bytes(cfg, fp8=True)
    assert need.weights == 2 * 13376 + 8 * 64 * 2 + 13312 + 9856 + 13056 == 64000


def test_qwen3_30b_a3b_shape():
    """The benchmark's shape builds a decoder: 48 sparse layers, 8 of 128 experts of width 768,
    and a batch-1 token reads about 6.08 GB of bf16 weights (3.37 GB with FP8)."""
    cfg = decoder_config(SHAPES[MOE], MAX_MODEL_LEN)
    assert cfg.architecture == "Qwen3MoeForCausalLM" and cfg.qk_norm and cfg.num_layers == 48
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.renormalize) == (128, 8, 768, True)
    assert moe.sparse_layers == (True,) * 48 and moe.shared_intermediate_size == 0
    assert decode_bytes(cfg).weights == 6_083_739_648
    assert decode_bytes(cfg, fp8=True).weights == 3_372_711_936
    assert decode_bytes(cfg).kv_per_context_token == 98_304
