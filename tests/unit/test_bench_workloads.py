"""``stepserve bench throughput --workload``: TensorRT-LLM's fixed-length workloads, resolved from
the command line without loading a model."""

import pytest

from stepserve.bench.throughput import RANDOM, WORKLOADS, Workload, fill_max_num_seqs, resolve_workload
from stepserve.cli import build_parser
from stepserve.config import ConfigError, engine_config_from_args


def resolved(*flags: str):
    args = fill_max_num_seqs(build_parser().parse_args(["bench", "throughput", *flags]))
    return resolve_workload(args, engine_config_from_args(args))


def test_the_table_is_trtllm_lengths_and_loads():
    assert WORKLOADS == {
        "trtllm-128-128": Workload(128, 128, 4096, 1024),
        "trtllm-500-2000": Workload(500, 2000, 1024, 512),
        "trtllm-1000-1000": Workload(1000, 1000, 1024, 512),
        "trtllm-2048-128": Workload(2048, 128, 1024, 512),
        "trtllm-5000-500": Workload(5000, 500, 512, 256),
    }
    for name, w in WORKLOADS.items():
        assert name == f"trtllm-{w.input_len}-{w.output_len}"


def test_a_workload_sets_fixed_lengths_and_its_concurrency():
    plan, engine = resolved("--workload", "trtllm-128-128", "--num-prompts", "3")
    assert (plan.workload, plan.input_len, plan.output_len, plan.range_ratio) == ("trtllm-128-128", 128, 128, 0.0)
    assert plan.num_prompts == 3  # the flag over the workload's 4096
    assert engine.scheduler.max_num_seqs == 1024


def test_a_workload_gives_its_count_and_yields_to_max_num_seqs():
    plan, engine = resolved("--workload", "trtllm-5000-500", "--max-num-seqs", "64")
    assert plan.num_prompts == 512
    assert engine.scheduler.max_num_seqs == 64
    _, engine = resolved("--workload", "trtllm-128-128", "--max-num-seqs", "256")  # the engine's default, given
    assert engine.scheduler.max_num_seqs == 256


def test_without_a_workload_nothing_changes():
    plan, engine = resolved()
    assert (plan.workload, plan.num_prompts, plan.input_len, plan.output_len, plan.range_ratio) == (
        RANDOM,
        64,
        128,
        64,
        0.5,
    )
    assert engine.scheduler.max_num_seqs == 256
    plan, _ = resolved("--input-len", "16", "--range-ratio", "0")
    assert (plan.input_len, plan.range_ratio) == (16, 0)


def test_an_unknown_workload_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "throughput", "--workload", "trtllm-1-1"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_short_context_is_refused_not_cut():
    with pytest.raises(ConfigError, match=r"trtllm-5000-500 needs max_model_len >= 5500 .* the engine has 4096"):
        resolved("--workload", "trtllm-5000-500", "--max-model-len", "4096")
    plan, _ = resolved("--workload", "trtllm-5000-500", "--max-model-len", "5500")
    assert plan.input_len + plan.output_len == 5500


def test_lengths_beside_a_workload_are_refused():
    with pytest.raises(ConfigError, match="leave out --input-len"):
        resolved("--workload", "trtllm-128-128", "--input-len", "64")


def test_the_gpu_part_covers_every_workload():
    from stepserve.bench.gpu import TRTLLM_FP8_OUT_TOK_S, TRTLLM_MAX_MODEL_LEN

    assert all(w.input_len + w.output_len <= TRTLLM_MAX_MODEL_LEN for w in WORKLOADS.values())
    assert all(set(row) == set(WORKLOADS) for row in TRTLLM_FP8_OUT_TOK_S.values())
