"""Tensor parallelism on CPU with gloo, 2 ranks (the NCCL path is the same code with another
backend, and was not run here): greedy tokens with TP=2 equal TP=1's and transformers', single-
and multi-step, for the families whose sharding differs (q/k/v bias, fused qkv/gate_up, q/k norm
with tied embeddings, replicated KV heads, mixtures of experts with and without a shared
expert), also speculating (n-gram, a draft model, an EAGLE-3 head); a served request through
``stepserve serve --tensor-parallel-size 2``; and a killed rank, or a killed rank 0, bringing the
group back whole with no rank left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from live_server import alive, core_pid, rank_pids, read_metric, restarted, start_server, wait_for
from stepserve import LLM, SamplingParams
from stepserve.core.engine_core import EngineFaultError
from stepserve.models.cpu_linear import cpu_has_bf16
from tiny_gguf import write_gguf
from tiny_models import write_eagle3_head, write_tiny_family, write_tiny_model

PROMPTS = ["Hello", "The quick brown fox jumps over", "Once upon a time, in a land far away, there lived", "1 2 3 4 5"]
NEW_TOKENS = 24
LOGPROB_TOL = 1e-4  # float32 on both sides; the all-reduce splits the o/down sums in two
ENGINE = dict(num_blocks=128, block_size=4, max_model_len=128, dtype="float32")


pytestmark = pytest.mark.usefixtures("one_thread")


def transformers_greedy(model_dir: Path, prompt_ids: list[list[int]]) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in prompt_ids:
        gen = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        out.append(gen[0, len(ids) :].tolist())
    return out


@contextlib.contextmanager
def engine(model: Path, tp: int, steps: int, **options):
    llm = LLM(model=str(model), tensor_parallel_size=tp, num_scheduler_steps=steps, **(ENGINE | options))
    try:
        if tp > 1:  # rank 0 holds its shard only
            shard = llm.core.worker.runner.model.cfg
            assert (shard.num_heads * tp, shard.intermediate_size * tp) == (4, 128)  # the tiny models'
            assert len(llm.core.worker.rank_pids) == tp - 1
        yield llm
    finally:
        if tp > 1:
            llm.core.worker.close()


def greedy(llm: LLM) -> tuple[list[list[int]], list[list[float]], list[list[int]]]:
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    outs = [o.outputs[0] for o in llm.generate(prompt_ids, params)]
    return [o.token_ids for o in outs], [[lp.logprob for lp in o.logprobs] for o in outs], prompt_ids


def generate(model: Path, tp: int, steps: int, **options):
    with engine(model, tp, steps, **options) as llm:
        return greedy(llm)


def phi3_gguf(directory: Path) -> tuple[Path, Path]:
    """Phi-3 as a GGUF: its fused attn_qkv and ffn_up (gate and up) tensors, cut per rank."""
    model_dir = write_tiny_family(directory, "phi3", seed=4)
    return write_gguf(model_dir, directory.parent / "phi3.gguf"), model_dir


CASES = {  # name -> (writer: (engine's model, transformers' directory), scheduler steps)
    "qwen2-qkv-bias": (lambda d: (write_tiny_model(d, "qwen2", seed=1),) * 2, 1),
    "phi3-gguf-fused-qkv-gate-up": (phi3_gguf, 8),
    "gemma3-qk-norm-tied": (lambda d: (write_tiny_family(d, "gemma3", seed=4),) * 2, 8),
    # mixtures of experts: each rank holds every expert's share of its inner width
    "qwen3-moe": (lambda d: (write_tiny_family(d, "qwen3-moe", seed=4),) * 2, 8),
    "qwen2-moe-shared-expert": (lambda d: (write_tiny_family(d, "qwen2-moe", seed=4),) * 2, 1),
    "mixtral": (lambda d: (write_tiny_family(d, "mixtral", seed=4),) * 2, 8),
}  # the served test below covers Llama with replicated KV heads


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_equals_tp1_and_transformers(case, tmp_path):
    write, steps = CASES[case]
    model, hf_dir = write(tmp_path / case)
    tokens2, logprobs2, prompt_ids = generate(model, 2, steps)
    tokens1, logprobs1, _ = generate(model, 1, steps)
    assert tokens2 == tokens1
    assert tokens2 == transformers_greedy(hf_dir, prompt_ids)
    assert torch.allclose(torch.tensor(logprobs2), torch.tensor(logprobs1), atol=LOGPROB_TOL)


SPECULATION = {
    "ngram": lambda d: {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3},
    "draft_model": lambda d: {"method": "draft_model", "model": str(d / "target")},  # the target drafts for itself
    "eagle3": lambda d: {"method": "eagle3", "model": str(write_eagle3_head(d / "head", d / "target", seed=2))},
}


@pytest.mark.parametrize("method", list(SPECULATION))
def test_tp2_speculates_with_the_tokens_of_tp1(method, tmp_path):
    """Speculation over two ranks: rank 0 alone runs a drafter, every rank verifies the
    proposals the scheduler sends; greedy tokens and logprobs are TP=1's without speculation."""
    target = write_tiny_model(tmp_path / "target", "llama", seed=6)
    config = SPECULATION[method](tmp_path) | {"num_speculative_tokens": 3}
    tokens1, logprobs1, _ = generate(target, 1, 1)
    with engine(target, 2, 1, speculative_config=config) as llm:
        tokens2, logprobs2, _ = greedy(llm)
        counters = llm.core.scheduler.spec_counters
    assert tokens2 == tokens1
    assert torch.allclose(torch.tensor(logprobs2), torch.tensor(logprobs1), atol=LOGPROB_TOL)
    assert counters.num_drafts > 0
    if method == "draft_model":
        assert counters.num_accepted_tokens == counters.num_draft_tokens


def test_ranks_that_disagree_end_the_group(tiny_qwen2):
    """Every rank samples for itself, so their generators must agree: reseed rank 0's alone and
    the first random pass is caught (rank 1 reports other tokens). Then a pass that fails on
    rank 1 alone, before the collective rank 0 waits in (here: rank 0's record of what rank 1
    holds is made wrong): the group ends within seconds, not after the collective's timeout."""
    with engine(tiny_qwen2, 2, 1) as llm:
        assert greedy(llm)[0]  # the group works
        llm.core.worker.runner.reseed(1234)  # rank 0 only
        with pytest.raises(EngineFaultError, match="rank 1 sampled other tokens than rank 0"):
            llm.generate(["Hello"] * 4, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))
        sent = llm.core.worker.encoder.sent
        sent[next(iter(sent))] += 1  # one of the requests still in flight
        started = time.monotonic()
        with pytest.raises(EngineFaultError, match="rank 1 raised EngineFaultError, rank 0 raised"):
            llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4))
        assert time.monotonic() - started < 60
        assert "while rank 0 is still in the pass" in llm.core.worker.ranks.dead


def test_int4_tp2_agrees_with_tp1_within_bfloat16_noise(tmp_path):
    """--quantization int4 over two ranks: each rank's row-parallel input slice holds whole groups
    of 32 weights, so both ranks quantize the same groups as one process does. The activations
    are bfloat16 (float32 on a CPU without native bfloat16), whose partial sums round differently
    split in two, so greedy paths may part at a near tie; the first token's logprobs (the
    prefill) agree within bfloat16's noise, where a wrong cut would be off by whole nats."""
    model_dir = write_tiny_model(tmp_path / "llama", "llama", seed=3)
    int4 = dict(dtype="bfloat16" if cpu_has_bf16() else "float32", quantization="int4")
    _, logprobs2, _ = generate(model_dir, 2, 1, **int4)
    _, logprobs1, _ = generate(model_dir, 1, 1, **int4)
    first = lambda lps: torch.tensor([row[0] for row in lps])  # noqa: E731
    assert torch.allclose(first(logprobs2), first(logprobs1), atol=0.1)


# -- served, and killed -------------------------------------------------------------------------


def complete(http: httpx.Client, prompt: str) -> str:
    response = http.post(
        "/v1/completions",
        json={"model": "tp", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_served_tp2_and_a_killed_rank_restarts_the_whole_group(tmp_path):
    """One KV head for two ranks: each rank holds a copy of it (vLLM's replication)."""
    model_dir = write_tiny_model(tmp_path / "llama-one-kv-head", "llama", seed=3, num_key_value_heads=1)
    llm = LLM(model=str(model_dir), num_scheduler_steps=8, **ENGINE)
    want = [
        o.outputs[0].text
        for o in llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    ]
    args = [
        "--model",
        str(model_dir),
        "--model_name",
        "tp",
        "--tensor-parallel-size",
        "2",
        "--num-scheduler-steps",
        "8",
        "--num-blocks",
        "128",
        "--block-size",
        "4",
        "--max-model-len",
        "128",
        "--dtype",
        "float32",
        "--restart-backoff-s",
        "0.1",
    ]
    server = start_server(args, tmp_path / "server.log")
    http = httpx.Client(base_url=server.url, timeout=60)
    last = None
    try:
        assert [complete(http, p) for p in PROMPTS[:2]] == want
        core = core_pid(server)
        (rank1,) = rank_pids(core)

        os.kill(rank1, signal.SIGKILL)  # a non-zero rank dies: the core ends, the group restarts
        wait_for(lambda: not alive(core), 30, "the engine core to end after its rank died")
        wait_for(lambda: restarted(server, http, core), 120, "the restarted group")
        assert [complete(http, p) for p in PROMPTS[:2]] == want
        assert "tensor-parallel rank 1" in server.log() and "exited with code -9" in server.log()

        assert read_metric(http, "stepserve:engine_restarts_total", model_name="tp") == 1

        core = core_pid(server)
        (last,) = rank_pids(core)
        os.kill(core, signal.SIGKILL)  # rank 0 dies: its rank must not outlive it
        wait_for(lambda: not alive(last), 30, "rank 1 to die with its core")
    finally:
        server.stop()
    wait_for(lambda: last is None or not alive(last), 30, "no rank left after the server stopped")
