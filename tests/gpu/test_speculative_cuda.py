"""Speculative decoding on CUDA: with n-gram proposals and with a draft model, greedy and seeded
tokens equal those without speculation, CUDA graphs on (the verify pass replays the decode
graphs, one row per token: counted) and off. Skipped without CUDA."""

import gc
import json
import random

import pytest
import torch

from stepserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def prompts(count=6, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        motif = [rng.randrange(3, 250) for _ in range(rng.randint(2, 6))]
        out.append((motif * 12)[: rng.randint(12, 60)])  # repeats: n-gram proposals find matches
    return out


def run(model_dir, params, dtype="float32", **options):
    llm = LLM(model=str(model_dir), dtype=dtype, device="cuda", max_model_len=256, max_num_seqs=16, **options)
    out = [o.outputs[0].token_ids for o in llm.generate(prompts(), params)]
    counters = llm.core.scheduler.spec_counters
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out, counters


PARAMS = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 3 + [
    SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=40, ignore_eos=True) for i in range(3)
]


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculation_keeps_the_tokens(tiny_llama, method, eager, monkeypatch):
    from stepserve.worker.cuda_graphs import CudaGraphs

    replays = []
    original = CudaGraphs.replay
    monkeypatch.setattr(CudaGraphs, "replay", lambda self: replays.append(self.batch) or original(self))
    want, _ = run(tiny_llama, PARAMS, enforce_eager=eager)
    replays.clear()
    config = {"method": method, "num_speculative_tokens": 3}
    config |= {"prompt_lookup_min": 1, "prompt_lookup_max": 3} if method == "ngram" else {"model": str(tiny_llama)}
    got, counters = run(tiny_llama, PARAMS, enforce_eager=eager, speculative_config=json.dumps(config))
    assert got == want
    assert counters.num_accepted_tokens > 0
    if not eager:  # verify passes (more rows than requests) replayed the decode graphs
        assert max(replays) > len(PARAMS)
