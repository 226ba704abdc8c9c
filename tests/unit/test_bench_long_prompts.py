"""The long-prompt GPU benchmark's arithmetic: prefill FLOPs and MFU by hand, the requests it
sends, token counting of streamed text, and the decode windows on synthetic timestamps."""

import pytest

from stepserve.bench.gpu import SHAPES
from stepserve.bench.gpu_serve import (
    LONG_FLAGS,
    LongSizes,
    StreamTrace,
    completion_body,
    count_tokens,
    decode_figures,
    long_report,
    non_embedding_params,
    peak_bf16_flops,
    prefill_figures,
    prefill_flops,
    prompt_ids,
    steady_window,
    window_decode,
)

# hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP width 128
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=1000,
)


def test_params_by_hand():
    q_and_o = 2 * 64 * 64
    k_and_v = 2 * 64 * 32
    mlp = 3 * 64 * 128
    norms = 2 * 64
    assert non_embedding_params(TINY) == 2 * (q_and_o + k_and_v + mlp + norms) + 64 == 74048


def test_flops_by_hand():
    # 10 tokens: 2 * 10 * 74048 for the weights; QK^T and PV over the causal half of 10 x 10
    # scores, 2 FLOPs a multiply-add, per layer (2), head (4) and head dimension (16)
    attention = 2 * 2 * 50 * 2 * 4 * 16
    assert prefill_flops(TINY, 10) == 1_480_960 + attention == 1_506_560


def test_head_dim_defaults_to_hidden_over_heads():
    assert prefill_flops({k: v for k, v in TINY.items() if k != "head_dim"}, 10) == 1_506_560


def test_8b_shape_figures():
    config = SHAPES["8b"]
    assert config["max_position_embeddings"] >= 32768
    assert 6.9e9 < non_embedding_params(config) < 7.0e9  # Llama-3.1-8B: 8.03B less 2 x 525M of embeddings
    attention = 2 * 32767**2 * 32 * 32 * 128
    assert prefill_flops(config, 32767) == pytest.approx(2 * 32767 * non_embedding_params(config) + attention)


def test_peak_by_card():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") is None
    assert peak_bf16_flops("NVIDIA H200 NVL") is None
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") is None
    assert peak_bf16_flops(None) is None


def test_prefill_figures_use_the_second_run():
    flops = prefill_flops(TINY, 10)
    fig = prefill_figures(TINY, 10, [9.0, 0.5], peak=flops)  # the peak does it all in 1 s
    assert fig["ttft_s"] == [9.0, 0.5]
    assert fig["prefill_tok_s"] == 20.0
    assert fig["mfu"] == 2.0
    assert prefill_figures(TINY, 10, [1.0, 1.0], peak=None)["mfu"] is None


def test_requests():
    assert prompt_ids(300, 1) == prompt_ids(300, 1)
    assert prompt_ids(300, 1)[:16] != prompt_ids(300, 2)[:16]  # no shared prefix to cache
    assert len(prompt_ids(32767, 3)) == 32767
    assert all(1000 <= t < 128000 for t in prompt_ids(1000, 4))  # clear of the words, BOS and EOS
    body = completion_body([5, 6, 7], 1)
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == 1
    assert body["ignore_eos"] and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["skip_special_tokens"] is False


def test_sizes_fit_the_server():
    max_model_len = int(LONG_FLAGS[LONG_FLAGS.index("--max-model-len") + 1])
    sizes = LongSizes()
    assert max(sizes.prompt_lens) + 1 <= max_model_len  # the prompt and its one output token
    assert sizes.stream_prompt_len + sizes.stream_output_len <= max_model_len
    assert LONG_FLAGS[LONG_FLAGS.index("--max-num-batched-tokens") + 1] == "8192"


def test_count_tokens():
    assert count_tokens("") == 0
    assert count_tokens(" the") == 1
    assert count_tokens("the of") == 2
    assert count_tokens("<|reserved_77|><|reserved_5|> the<|end_of_text|><unk> of") == 6
    assert count_tokens("word<|reserved_1|>") == 2


def _trace(sent, times, tokens=None):
    tokens = tokens or [1] * len(times)
    return StreamTrace(sent, tuple(times), tuple(tokens), sum(tokens))


def test_window_covers_the_gaps_around_it():
    # chunks every 10 ms of 2 tokens each, then a 100 ms stall, then 10 ms again
    times = [0.00, 0.01, 0.02, 0.03, 0.13, 0.14, 0.15]
    trace = _trace(0.0, times, [1, 2, 2, 2, 2, 2, 2])
    w = window_decode([trace], 0.035, 0.125)  # inside the stall: from 0.03 to 0.13, 2 tokens
    assert w["streams"] == 1
    assert w["tpot_ms"] == pytest.approx(50.0)
    assert w["itl_p99_ms"] == pytest.approx(100.0) and w["itl_max_ms"] == pytest.approx(100.0)
    w = window_decode([trace], 0.01, 0.14)  # chunks at the edges count as covering them
    assert w["tpot_ms"] == pytest.approx(1e3 * 0.13 / 8)


def test_window_leaves_out_streams_that_do_not_cover_it():
    early = _trace(0.0, [0.0, 0.1, 0.2])  # done before the window ends
    late = _trace(0.5, [0.6, 0.7, 0.8])  # not streaming when it starts
    covering = _trace(0.0, [0.0, 0.3, 0.6, 0.9])
    w = window_decode([early, late, covering], 0.25, 0.65)
    assert w["streams"] == 1
    assert w["tpot_ms"] == pytest.approx(1e3 * 0.9 / 3)  # its chunks at 0.0 and 0.9 bound the window
    assert window_decode([early, late], 0.25, 0.65) == {
        "streams": 0,
        "tpot_ms": None,
        "itl_p99_ms": None,
        "itl_max_ms": None,
    }


def test_mean_is_over_streams_and_p99_over_gaps():
    fast = _trace(0.0, [0.01 * i for i in range(101)])  # 10 ms a token
    slow = _trace(0.0, [0.03 * i for i in range(101)])  # 30 ms a token
    w = window_decode([fast, slow], 0.0, 0.9)
    assert w["tpot_ms"] == pytest.approx(20.0)
    assert w["itl_p99_ms"] == pytest.approx(30.0)


def test_decode_figures_on_synthetic_streams():
    # 4 streams at 10 ms a token; in the busy run a prompt sent at 1.0 s gets its first token at
    # 1.4 s, and the streams' tokens come 100 ms apart from 1.0 s to 1.4 s
    alone = [_trace(0.0, [0.05 + 0.01 * i for i in range(200)]) for _ in range(4)]
    busy_times = [round(0.05 + 0.01 * i, 2) for i in range(96)] + [1.1, 1.2, 1.3, 1.4]
    busy_times += [round(1.41 + 0.01 * i, 2) for i in range(100)]
    busy = [_trace(0.0, busy_times) for _ in range(4)]
    prompt = _trace(1.0, [1.4])
    d = decode_figures(alone, busy, prompt)
    assert d["alone"]["streams"] == 4 and d["alone"]["tpot_ms"] == pytest.approx(10.0)
    loaded = d["during_prefill"]
    assert loaded["streams"] == 4 and loaded["prompt_ttft_s"] == pytest.approx(0.4)
    # from the chunk at 1.0 (the last at or before the send) to the one at 1.4: 4 tokens
    assert loaded["tpot_ms"] == pytest.approx(100.0) and loaded["itl_max_ms"] == pytest.approx(100.0)
    assert d["tpot_ratio"] == pytest.approx(10.0)
    assert d["token_counts_match_usage"]


def test_steady_window_is_while_every_stream_runs():
    a = _trace(0.0, [0.1, 0.2, 0.9])
    b = _trace(0.0, [0.3, 0.4, 0.7])
    assert steady_window([a, b]) == (0.3, 0.7)


def test_counted_checks_usage():
    assert StreamTrace(0.0, (0.1, 0.2), (8, 8), 16).counted
    assert not StreamTrace(0.0, (0.1, 0.2), (8, 7), 16).counted


def test_report_has_a_line_per_figure():
    alone = [_trace(0.0, [0.05 + 0.01 * i for i in range(50)])]
    busy = [_trace(0.0, [0.05 + 0.1 * i for i in range(50)])]
    decode = decode_figures(alone, busy, _trace(1.0, [1.5]))
    results = {
        "sizes": {"prompt_lens": [8192, 32767]},
        "prefill": {
            "8192": prefill_figures(TINY, 8192, [2.0, 1.0], None),
            "32767": prefill_figures(TINY, 32767, [2.0, 1.0], 1e9),
        },
        "decode": decode,
        "decode_first_run": decode,
    }
    lines = long_report(results)
    assert len(lines) == 5
    assert "MFU unknown" in lines[0] and "MFU" in lines[1] and "32767-token prompt prefills" in lines[3]
