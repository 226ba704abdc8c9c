"""Tensor parallelism over NCCL: two ranks on two GPUs (CUDA graphs capturing the all-reduce,
Triton kernels, the fused MoE kernel on each rank's share of the experts) against the one-process
CPU reference, which tests/integration holds equal to transformers: float32 greedy tokens equal
with 1 and 8 scheduler steps, speculating, and with LoRA adapters; served, a rank killed with SIGKILL under load
brings the whole group back. Skipped without two GPUs; it has not run yet (no multi-GPU machine
was available when it was written). tests/gpu/test_nccl_one_rank.py runs the NCCL path on one GPU."""

import gc
import os
import signal
import threading

import httpx
import pytest
import torch

from live_server import alive, core_pid, rank_pids, read_metric, restarted, start_server, wait_for
from stepserve import LLM, SamplingParams
from tiny_models import write_tiny_family, write_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")

PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(5 + 13 * i)] for i in range(8)]  # 5..96 tokens


def greedy(model_dir, device, lora_request=None, **options):
    """Greedy tokens of PROMPTS (``lora_request``: one per prompt, as ``LLM.generate`` takes it)."""
    llm = LLM(
        model=str(model_dir),
        device=device,
        dtype="float32",
        max_model_len=128,
        num_blocks=512,
        block_size=16,
        **options,
    )
    try:
        return [
            o.outputs[0].token_ids
            for o in llm.generate(
                PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), lora_request=lora_request
            )
        ]
    finally:
        if options.get("tensor_parallel_size", 1) > 1:
            llm.core.worker.close()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3", "qwen3-moe", "qwen2-moe", "mixtral"])
def test_nccl_tp2_equals_cpu(family, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = write_tiny_family(tmp_path / family, family, seed=9)
    want = greedy(model_dir, "cpu")
    assert greedy(model_dir, "cuda", tensor_parallel_size=2, num_scheduler_steps=1) == want
    assert greedy(model_dir, "cuda", tensor_parallel_size=2, num_scheduler_steps=8) == want


@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
def test_nccl_tp2_lora_equals_cpu(family, tmp_path):
    """Adapters over two GPUs: each rank's share of every pair (models.lora, cut_adapter), the
    Triton LoRA kernels and the experts' adapters in the fused MoE kernel on each rank, the
    partial deltas summed by the NCCL all-reduce; adapters and the base mixed in one batch give
    the one-process CPU reference's tokens."""
    from lora_adapters import base_and_requests

    torch.backends.cuda.matmul.allow_tf32 = False
    base, requests = base_and_requests(tmp_path, family)
    loras = [None, *requests]
    every = [loras[i % len(loras)] for i in range(len(PROMPTS))]
    lora = dict(lora_request=every, enable_lora=True, max_loras=4)
    want = greedy(base, "cpu", **lora)
    assert greedy(base, "cuda", tensor_parallel_size=2, num_scheduler_steps=8, **lora) == want


@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle3"])
def test_nccl_tp2_speculates_with_the_cpu_tokens(method, tmp_path):
    """Speculation over two GPUs: the drafter on rank 0, verify passes replaying the decode
    graphs on both ranks; the tokens are the CPU's without speculation."""
    from tiny_models import write_eagle3_head

    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = write_tiny_model(tmp_path / "llama", "llama", seed=6)
    config = {"method": method, "num_speculative_tokens": 3}
    if method == "ngram":
        config |= {"prompt_lookup_min": 1, "prompt_lookup_max": 3}
    else:
        drafter = model_dir if method == "draft_model" else write_eagle3_head(tmp_path / "head", model_dir, seed=2)
        config["model"] = str(drafter)
    want = greedy(model_dir, "cpu")
    assert greedy(model_dir, "cuda", tensor_parallel_size=2, speculative_config=config) == want


def test_served_nccl_tp2_and_a_rank_killed_under_load_restarts_the_group(tmp_path):
    """Two ranks behind ``stepserve serve`` on two GPUs, CUDA graphs and 8 scheduler steps: while
    requests stream, rank 1 dies by SIGKILL; the in-flight requests fail fast, the engine core
    ends, the supervisor brings the whole group back, and the answers are the same as before."""
    model_dir = write_tiny_model(tmp_path / "llama", "llama", seed=3, max_position_embeddings=4096)
    args = ["--model", str(model_dir), "--model_name", "tp", "--tensor-parallel-size", "2", "--dtype", "float32"]
    args += ["--num-scheduler-steps", "8", "--max-model-len", "4096", "--restart-backoff-s", "0.1"]
    server = start_server(args, tmp_path / "server.log")
    http = httpx.Client(base_url=server.url, timeout=120)
    prompts = ["Hello", "The quick brown fox"]

    def complete(prompt: str, tokens: int = 24) -> httpx.Response:
        body = {"model": "tp", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        return http.post("/v1/completions", json=body)

    try:
        want = [complete(p).json()["choices"][0]["text"] for p in prompts]
        core = core_pid(server)
        (rank1,) = rank_pids(core)
        codes: list[int] = []
        load = [threading.Thread(target=lambda p=p: codes.append(complete(p, 3000).status_code)) for p in prompts]
        for thread in load:
            thread.start()
        wait_for(lambda: read_metric(http, "stepserve:num_requests_running", model_name="tp") >= 1, 30, "the load")
        os.kill(rank1, signal.SIGKILL)
        for thread in load:
            thread.join(60)
        assert not any(t.is_alive() for t in load) and any(code >= 500 for code in codes), codes  # failed fast
        wait_for(lambda: not alive(core), 30, "the engine core to end after its rank died")
        wait_for(lambda: restarted(server, http, core), 180, "the restarted group")
        assert [complete(p).json()["choices"][0]["text"] for p in prompts] == want
        assert read_metric(http, "stepserve:engine_restarts_total", model_name="tp") == 1
    finally:
        server.stop()
