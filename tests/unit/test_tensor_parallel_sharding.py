"""Tensor parallelism without processes: what each rank reads of every checkpoint tensor (the
ranks' pieces put back together are the tensor, in the layout the shard's model expects), the
safetensors slice reader against whole tensors, the startup checks, and the flags."""

from __future__ import annotations

import pytest
import torch

from stepserve.cli import build_parser, main
from stepserve.config import ConfigError, EngineConfig, engine_config_from_args
from stepserve.distributed.sharding import check_tensor_parallel, shard_config
from stepserve.distributed.sharding import ZERO, cut, take, take_slice
from stepserve.models.config import DecoderConfig
from stepserve.models.config import RopeConfig


def config(heads=8, kv=4, head_dim=4, inter=24, **kw) -> DecoderConfig:
    return DecoderConfig(
        architecture="LlamaForCausalLM",
        vocab_size=50,
        hidden_size=16,
        intermediate_size=inter,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope=RopeConfig(10000.0, head_dim),
        layer_windows=(0,),
        attn_scale=0.5,
        **kw,
    )


def rows(cfg: DecoderConfig, what: str) -> torch.Tensor:
    """A tensor whose row i holds i, so that a slice says which rows it took."""
    n = {"q": cfg.num_heads, "k": cfg.num_kv_heads}[what] * cfg.head_dim
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, cfg.hidden_size).contiguous()


@pytest.mark.parametrize("size", [2, 4])
def test_column_and_row_parallel_pieces_rebuild_the_tensor(size):
    cfg = config()
    q, k = rows(cfg, "q"), rows(cfg, "k")
    gate = torch.randn(cfg.intermediate_size, cfg.hidden_size)
    down = torch.randn(cfg.hidden_size, cfg.intermediate_size)
    shard = shard_config(cfg, size)
    for name, full, dim in (("q_proj", q, 0), ("k_proj", k, 0), ("gate_proj", gate, 0), ("down_proj", down, 1)):
        pieces = [take(full, cut(f"model.layers.0.mlp.{name}.weight", cfg, r, size)) for r in range(size)]
        assert torch.equal(torch.cat(pieces, dim=dim), full), name
    o = torch.randn(cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    o0 = take(o, cut("model.layers.0.self_attn.o_proj.weight", cfg, 0, size))
    assert o0.shape == (cfg.hidden_size, shard.num_heads * shard.head_dim)


def test_query_heads_read_their_own_kv_head_when_kv_heads_are_replicated():
    """8 query heads in 2 KV groups over 4 ranks: ranks 0-1 hold KV head 0, ranks 2-3 KV head 1,
    and each rank's 2 query heads belong to the group it holds."""
    cfg = config(heads=8, kv=2)
    k = rows(cfg, "k")
    for rank in range(4):
        got = take(k, cut("model.layers.0.self_attn.v_proj.weight", cfg, rank, 4))
        kv_head = rank // 2
        assert torch.equal(got[:, 0], torch.arange(kv_head * 4, kv_head * 4 + 4, dtype=torch.float32))
        q_heads = take(rows(cfg, "q"), cut("model.layers.0.self_attn.q_proj.weight", cfg, rank, 4))[::4, 0] // 4
        assert (q_heads // (cfg.num_heads // cfg.num_kv_heads) == kv_head).all()
    assert shard_config(cfg, 4).num_kv_heads == 1


def test_fused_qkv_and_gate_up_give_the_same_rows_as_the_separate_tensors():
    """Phi-3 stores q, k, v (and gate, up) stacked: a rank's piece of the stack is its q rows,
    then its k rows, then its v rows, as the shard's fused qkv_proj is laid out."""
    cfg = config()
    q, k, v = torch.randn(32, 16), torch.randn(16, 16), torch.randn(16, 16)
    gate, up = torch.randn(24, 16), torch.randn(24, 16)
    for rank in range(2):
        fused = take(torch.cat([q, k, v]), cut("model.layers.0.self_attn.qkv_proj.weight", cfg, rank, 2))
        apart = [
            take(t, cut(f"model.layers.0.self_attn.{n}.weight", cfg, rank, 2))
            for t, n in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj"))
        ]
        assert torch.equal(fused, torch.cat(apart))
        fused = take(torch.cat([gate, up]), cut("model.layers.0.mlp.gate_up_proj.weight", cfg, rank, 2))
        assert torch.equal(
            fused,
            torch.cat(
                [take(gate, cut("x.gate_proj.weight", cfg, rank, 2)), take(up, cut("x.up_proj.weight", cfg, rank, 2))]
            ),
        )


def test_biases_column_split_and_row_parallel_bias_added_once():
    cfg = config()
    q_bias = torch.arange(32.0)
    assert torch.equal(torch.cat([take(q_bias, cut("l.self_attn.q_proj.bias", cfg, r, 2)) for r in range(2)]), q_bias)
    o_bias = torch.randn(16)
    assert cut("l.self_attn.o_proj.bias", cfg, 0, 2) is None and cut("l.mlp.down_proj.bias", cfg, 1, 2) == ZERO
    assert torch.equal(sum(take(o_bias, cut("l.self_attn.o_proj.bias", cfg, r, 2)) for r in range(2)), o_bias)


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.input_layernorm.weight",
    ],
)
def test_embedding_head_and_norms_are_replicated(name):
    assert cut(name, config(), 1, 2) is None


def test_safetensors_slices_equal_the_whole_tensors_cut(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = config()
    tensors = {
        "model.layers.0.self_attn.qkv_proj.weight": torch.randn(64, 16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 24),
        "model.layers.0.self_attn.o_proj.bias": torch.randn(16),
        "model.embed_tokens.weight": torch.randn(50, 16),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        for key, whole in tensors.items():
            for rank in range(2):
                parts = cut(key, cfg, rank, 2)
                got = take_slice(lambda: f.get_slice(key), lambda: f.get_tensor(key), parts)
                assert torch.equal(got, take(whole, parts)), (key, rank)


@pytest.mark.parametrize(
    "cfg, size, needle",
    [
        (config(heads=6, kv=6), 4, "must divide the model's 6 attention heads; use one of 1, 2, 3, 6"),
        (config(heads=12, kv=3), 4, "model's 3 KV heads: one must divide the other"),
        (config(heads=8, kv=8, inter=30), 4, "must divide the model's intermediate_size 30"),
    ],
)
def test_models_that_do_not_split_are_refused(cfg, size, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        check_tensor_parallel(size, cfg)


def test_int4_needs_whole_groups_per_rank():
    cfg = config(heads=8, kv=8, head_dim=8, inter=64)
    check_tensor_parallel(2, cfg, "int4")  # 32 columns of each row-parallel input per rank
    with pytest.raises(ConfigError, match="whole groups of 32"):
        check_tensor_parallel(4, cfg, "int4")
    check_tensor_parallel(4, cfg, "none")


@pytest.mark.parametrize("flag", [["--tensor-parallel-size", "2"], ["--tensor_parallel_size=2"], ["-tp", "2"]])
def test_the_flag_in_every_spelling(flag):
    args = build_parser().parse_args(["serve", *flag])
    assert engine_config_from_args(args).parallel.tensor_parallel_size == 2
    assert EngineConfig.from_kwargs(tensor_parallel_size=2).parallel.tensor_parallel_size == 2


def test_a_size_below_one_is_refused():
    with pytest.raises(ConfigError, match="tensor_parallel_size=0: use at least 1"):
        EngineConfig.from_kwargs(tensor_parallel_size=0)


def test_serve_exits_2_naming_the_heads(tiny_llama, capsys):
    """Checked by the front before any process starts: 4 heads do not split over 3 ranks."""
    assert main(["serve", "--model", str(tiny_llama), "--tensor-parallel-size", "3"]) == 2
    assert (
        "tensor_parallel_size=3 must divide the model's 4 attention heads; use one of 1, 2, 4"
        in capsys.readouterr().err
    )


def test_serve_exits_2_with_more_ranks_than_cores(tiny_llama, capsys):
    import os

    cores = len(os.sched_getaffinity(0))
    size = next(n for n in (2, 4, 8, 16, 32, 64, 128) if n > cores)
    if 4 % size:  # the tiny model has 4 heads: only sizes that divide them reach the device check
        pytest.skip(f"{cores} cores: no size that splits 4 heads exceeds them")
    assert main(["serve", "--model", str(tiny_llama), "--tensor-parallel-size", str(size), "--device", "cpu"]) == 2
    assert f"needs a core per rank; this process may use {cores}" in capsys.readouterr().err


def test_pooling_and_encoder_tasks_refuse_tensor_parallelism(tmp_path, capsys):
    """Only generation is split over ranks; an encoder task is refused rather than served on one."""
    from task_models import write_bert

    model_dir = write_bert(tmp_path / "bert")
    assert main(["serve", "--model", str(model_dir), "--task", "text_embedding", "-tp", "2"]) == 2
    assert "tensor parallelism serves text_generation only" in capsys.readouterr().err


def test_encoder_tasks_refuse_the_decoder_engine_flags(tmp_path, capsys):
    """An encoder model runs through transformers: the decoder engine's flags are refused by name."""
    from task_models import write_bert

    model_dir = write_bert(tmp_path / "bert")
    for flags, named in (
        (["--num-scheduler-steps", "8"], "--num-scheduler-steps"),
        (["--quantization", "int4", "--load-format", "dummy"], "--quantization, --load-format"),
    ):
        assert main(["serve", "--model", str(model_dir), "--task", "text_embedding", *flags]) == 2
        assert f"runs an encoder model through transformers, which {named} do not apply to" in capsys.readouterr().err


def test_rank_reports_that_disagree_are_a_fault_and_agreeing_errors_are_the_pass():
    from stepserve.core.engine_core import EngineFaultError
    from stepserve.core.outputs import ModelRunnerOutput
    from stepserve.distributed.messages import PassDone
    from stepserve.executor.tensor_parallel import check_agreement, digest as _digest

    out = ModelRunnerOutput(((5, 6), (7,)), (), {})
    check_agreement([PassDone(_digest(out), None)] * 3, out, None)
    with pytest.raises(EngineFaultError, match="rank 2 sampled other tokens"):
        check_agreement(
            [PassDone(_digest(out), None), PassDone(_digest(ModelRunnerOutput(((5, 9), (7,)), (), {})), None)],
            out,
            None,
        )
    with pytest.raises(EngineFaultError, match="rank 1 raised RuntimeError, rank 0 completed it"):
        check_agreement([PassDone(None, "RuntimeError")], out, None)
    with pytest.raises(ValueError, match="bad request"):  # every rank failed alike: the pass's own error
        check_agreement([PassDone(None, "ValueError")], None, ValueError("bad request"))
    with pytest.raises(EngineFaultError, match="rank 1 raised DistBackendError, rank 0 raised ValueError"):
        check_agreement([PassDone(None, "DistBackendError")], None, ValueError("bad request"))


def test_passes_carry_only_new_tokens_and_rebuild_every_request_whole():
    """A pass sends each request's tokens once; the ranks rebuild the same token lists rank 0
    holds, through growth, a finished request and its id used again."""
    import pickle

    from stepserve.core.engine_core import EngineFaultError
    from stepserve.core.outputs import ScheduledRequest, SchedulerOutput
    from stepserve.executor.tensor_parallel import PassDecoder, PassEncoder
    from stepserve.sampling import SamplingParams

    params = {
        "a": SamplingParams(max_tokens=8).resolve(4, 64),
        "b": SamplingParams(max_tokens=5, temperature=0.5).resolve(4, 64),
    }

    def sched(tokens: dict[str, list[int]], finished=()):
        reqs = tuple(
            ScheduledRequest(rid, t, len(t) - 1, 1, [1, 2], params[rid], 3, True, 1) for rid, t in tokens.items()
        )
        return SchedulerOutput(reqs, 1, tuple(finished), len(reqs))

    encoder, decoder = PassEncoder(), PassDecoder()
    live = {"a": [1, 2, 3], "b": [7, 8, 9, 10]}
    passes = [sched(live)]
    live["a"].append(4)
    passes.append(sched(live))
    del live["b"]
    live["b"] = [5, 5, 5]  # a new request under a finished one's id, with other params
    params["b"] = SamplingParams(max_tokens=6, top_k=3).resolve(3, 64)
    passes.append(sched(live, finished=["b"]))
    for p in passes:
        message = pickle.loads(pickle.dumps(encoder.encode(p)))
        got = decoder.decode(message)
        assert [list(r.token_ids) for r in got.requests] == [list(r.token_ids) for r in p.requests]
        assert [r.start for r in got.requests] == [r.start for r in p.requests]
        assert [r.params for r in got.requests] == [r.params for r in p.requests]
    assert [len(r.token_ids) for r in encoder.encode(sched(live)).sched.requests] == [0, 0]  # nothing new
    with pytest.raises(EngineFaultError, match="holds 0 tokens, rank 0 sent from 3"):
        PassDecoder().decode(encoder.encode(sched({"b": [5, 5, 5, 6]})))
