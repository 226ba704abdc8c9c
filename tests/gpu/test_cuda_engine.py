"""The CUDA engine against its slow twins: eager vs CUDA graphs, single-step vs multi-step,
Triton kernels vs the SDPA reference, on a tiny random model. Skipped without CUDA."""

import gc
import random

import pytest
import torch

from stepserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NEW_TOKENS = 40


def prompts(count=8, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(5, 120))] for _ in range(count)]


def greedy(model_dir, dtype="bfloat16", prompt_ids=None, **options):
    llm = LLM(
        model=str(model_dir), dtype=dtype, device="cuda", max_model_len=512, max_num_seqs=16, num_blocks=1024, **options
    )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out = [o.outputs[0].token_ids for o in llm.generate(prompt_ids or prompts(), params)]
    del llm
    gc.collect()  # the runner and its CUDA graphs refer to each other
    torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_graphs_equal_eager(tiny_llama, dtype):
    # 8 requests finishing together: every decode batch is exactly a graph bucket, so both paths
    # run the same matmul shapes and the comparison is exact.
    assert greedy(tiny_llama, dtype, enforce_eager=False) == greedy(tiny_llama, dtype, enforce_eager=True)


SAMPLED = [  # every graph path: temperature alone, with min-p, sorted (top-k, top-p), greedy rows beside
    SamplingParams(temperature=0.9, seed=1),
    SamplingParams(temperature=1.2, min_p=0.05, seed=2),
    SamplingParams(temperature=0.8, top_k=20, seed=3),
    SamplingParams(temperature=1.0, top_p=0.9, min_p=0.02, seed=4),
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, top_k=50, top_p=0.95, seed=5, logprobs=2),
    SamplingParams(temperature=1.5, seed=6),
    SamplingParams(temperature=0),
]


@pytest.mark.parametrize("steps", [1, 8])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sampling_graphs_equal_eager(tiny_llama, dtype, steps, monkeypatch):
    """Seeded temperature, top-k, top-p and min-p rows drawn inside the sampling graphs give
    the eager path's tokens and logprobs; the graph path really replays them (counted)."""
    from stepserve.worker.cuda_graphs import CudaGraphs

    replays = []
    original = CudaGraphs.sample
    monkeypatch.setattr(CudaGraphs, "sample", lambda self: replays.append(self.size) or original(self))
    outs = {}
    for enforce_eager in (False, True):
        llm = LLM(
            model=str(tiny_llama),
            dtype=dtype,
            device="cuda",
            max_model_len=512,
            max_num_seqs=16,
            num_blocks=1024,
            num_scheduler_steps=steps,
            enforce_eager=enforce_eager,
        )
        for label, params in (("mixed", SAMPLED), ("temperature", SAMPLED[:2] * 4), ("filters", SAMPLED[:4] * 2)):
            params = [p.replace(max_tokens=NEW_TOKENS, ignore_eos=True) for p in params]
            outs[enforce_eager, label] = [
                (o.outputs[0].token_ids, [round(lp.logprob, 4) for lp in o.outputs[0].logprobs or []])
                for o in llm.generate(prompts(), params)
            ]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert outs[False, "mixed"] == outs[True, "mixed"]
    assert outs[False, "temperature"] == outs[True, "temperature"]
    assert outs[False, "filters"] == outs[True, "filters"]
    assert set(replays) == {8}
    tokens = [t for t, _ in outs[False, "mixed"]]
    assert tokens[4] != tokens[6] and len({tuple(t) for t in tokens}) == 8  # sampled, not all greedy


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_tied"])
def test_multi_step_equals_single_step(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    assert greedy(model_dir, num_scheduler_steps=8) == greedy(model_dir, num_scheduler_steps=1)


def test_cuda_float32_equals_cpu(tiny_llama):
    """Triton kernels and graphs in float32 give the CPU reference path's greedy tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = LLM(model=str(tiny_llama), device="cpu", max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in cpu.generate(prompts(), params)]
    assert greedy(tiny_llama, "float32", num_scheduler_steps=4) == want


def test_uneven_batches_and_sampling_run(tiny_llama):
    """Requests of different lengths finishing at different times (graph padding, mixed
    prefill/decode steps, multi-step lookahead past a stop), with seeded sampling and logprobs."""
    llm = LLM(
        model=str(tiny_llama),
        device="cuda",
        max_model_len=512,
        max_num_seqs=16,
        num_scheduler_steps=8,
        gpu_memory_utilization=0.3,
    )
    ids = prompts(13, seed=3)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i, max_tokens=5 + 7 * i, ignore_eos=True, logprobs=2)
        for i in range(len(ids))
    ]
    first = llm.generate(ids, params)
    again = llm.generate(ids, params)
    for i, (a, b) in enumerate(zip(first, again)):
        assert len(a.outputs[0].token_ids) == 5 + 7 * i
        assert a.outputs[0].token_ids == b.outputs[0].token_ids  # per-request seeds reproduce


def test_async_scheduling_equals_sync(tiny_llama):
    """Asynchronous scheduling on CUDA (graphs, placeholders filled on the device, results
    copied behind an event): the synchronous loop's tokens, float32, uneven lengths, stops and
    seeded rows inside multi-step windows."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = prompts(13, seed=5)
    params = [
        SamplingParams(temperature=0.9, seed=i, max_tokens=5 + 5 * i, ignore_eos=True, logprobs=1)
        if i % 2
        else SamplingParams(temperature=0, max_tokens=5 + 5 * i, ignore_eos=True, stop_token_ids=[7, 11])
        for i in range(len(ids))
    ]
    outs = {}
    for asynchronous in (False, True):
        llm = LLM(
            model=str(tiny_llama),
            dtype="float32",
            device="cuda",
            max_model_len=512,
            max_num_seqs=16,
            num_blocks=1024,
            num_scheduler_steps=8,
            async_scheduling=asynchronous,
        )
        outs[asynchronous] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(ids, params)]
        assert llm.core.stats().kv_cache_usage == 0.0
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_non_finite_logits_in_a_decode_step_fail_only_their_request(tiny_llama, enforce_eager):
    """The finite check runs inside the captured graph (greedy tokens too): a request whose
    decode input turns its logits into NaN is aborted, the others of the same passes keep their
    tokens, on the graph path and on its eager twin."""
    llm = LLM(
        model=str(tiny_llama),
        device="cuda",
        max_model_len=512,
        max_num_seqs=16,
        num_blocks=1024,
        num_scheduler_steps=4,
        enforce_eager=enforce_eager,
    )
    ids = [p[:16] for p in prompts()]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    clean = [o.outputs[0].token_ids for o in llm.generate(ids, params)]

    def candidates():  # (request, step k >= 1, token): a token only that request sees, first at k
        for r, out in enumerate(clean):
            others = {t for i, (p, o) in enumerate(zip(ids, clean)) if i != r for t in p + o}
            for k, t in enumerate(out):
                if k >= 1 and t not in others and t not in ids[r] + out[:k]:
                    yield r, k, t

    r, k, token = next(candidates())
    with torch.no_grad():
        llm.core.worker.model.embed_tokens.weight[token] = float("nan")
    out = [o.outputs[0] for o in llm.generate(ids, params)]
    assert out[r].finish_reason == "abort"
    assert out[r].token_ids == clean[r][: len(out[r].token_ids)] and len(out[r].token_ids) <= k + 1
    assert [o.token_ids for i, o in enumerate(out) if i != r] == [c for i, c in enumerate(clean) if i != r]
    assert llm.core.stats().kv_cache_usage == 0.0
    del llm
    gc.collect()
    torch.cuda.empty_cache()
