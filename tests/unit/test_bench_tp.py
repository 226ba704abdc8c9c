"""The multi-GPU benchmark's arithmetic and shapes (it runs on a machine of several GPUs only):
the 70B shape is Llama-3.1-70B's and splits over 2, 4 and 8 ranks; the batch-1 bound is one
GPU's bytes at its bandwidth; the all-reduce time is the NCCL kernels' share of a step."""

from types import SimpleNamespace

import pytest

from stepserve.bench import gpu_tp as T
from stepserve.bench.gpu import SHAPES
from stepserve.distributed.sharding import check_tensor_parallel, shard_config
from stepserve.models.registry import decoder_config


def test_70b_shape_splits_over_the_ranks_a_host_holds():
    cfg = decoder_config(SHAPES["70b"], 1024)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (80, 8192, 64, 8)
    params = cfg.vocab_size * cfg.hidden_size * 2 + cfg.num_layers * (
        cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        + cfg.num_heads * cfg.head_dim * cfg.hidden_size
        + 3 * cfg.hidden_size * cfg.intermediate_size
    )
    assert 70.0e9 < params < 71.0e9  # Llama-3.1-70B: 70.6B parameters
    for size in (2, 4, 8):
        check_tensor_parallel(size, cfg)
        shard = shard_config(cfg, size)
        assert shard.num_kv_heads == 8 // size and shard.intermediate_size == 28672 // size


def test_batch1_bound_is_one_gpus_bytes_at_its_bandwidth():
    bound = T.batch1_bound(weight_bytes=35_000_000_000, kv_bytes_per_token=40_960, context=640, copy_tb_s=3.0)
    assert bound["bytes_per_gpu"] == 35_000_000_000 + 40_960 * 640
    assert bound["bound_tok_s"] == pytest.approx(3.0e12 / bound["bytes_per_gpu"], abs=0.05)


def test_all_reduce_time_counts_the_nccl_kernels_only():
    def event(key, us):
        return SimpleNamespace(key=key, self_device_time_total=us)

    kernels = [
        event("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 800.0),
        event("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT", 5000.0),
        event("_paged_decode_kernel", 300.0),
    ]
    assert T.all_reduce_ms(kernels, steps=16) == 0.05
    assert T.all_reduce_ms(kernels, steps=0) is None


def test_summary_names_each_target():
    results = {
        "tp": 4,
        "runs": {
            "8b-tp1": {"out_tok_s": 9000.0},
            "8b-tp2": {"out_tok_s": 15300.0},
            "70b-tp4": {"batch1": {"of_bound": 0.55}},
        },
    }
    s = T.summary(results)
    assert s["tp2_over_tp1_8b"] == 1.7 and s["met"] == {"tp2_over_tp1_8b": True, "batch1_of_bound_70b": False}
    assert T.summary({"tp": 2, "runs": {"8b-tp1": {"skipped": "out of memory"}}})["met"]["tp2_over_tp1_8b"] is None
