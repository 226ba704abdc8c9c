"""Speculative decoding on CUDA: with n-gram proposals, a draft model and an EAGLE-3 head, greedy
(and, but for the head, seeded) tokens equal those without speculation, CUDA graphs on (the verify
pass replays the decode graphs, one row per token: counted) and off. Skipped without CUDA."""

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


@pytest.mark.parametrize("eager", [False, True])
def test_an_eagle3_head_proposes_as_the_reference_and_keeps_the_tokens(tiny_llama, tmp_path, eager, monkeypatch):
    """The head reads the target's states from the buffer the decode graphs write on replay:
    its proposals are the reference head's (``tests/eagle3_reference.py``, on the CPU), and the
    tokens are those without speculation."""
    from eagle3_reference import Reference, record_proposals
    from tiny_models import write_eagle3_head

    from stepserve.worker.cuda_graphs import CudaGraphs

    torch.backends.cuda.matmul.allow_tf32 = False  # against a float32 reference on the CPU
    head = write_eagle3_head(tmp_path / "head", tiny_llama, seed=7, draft_vocab=200)
    replays = []
    original = CudaGraphs.replay
    monkeypatch.setattr(CudaGraphs, "replay", lambda self: replays.append(self.batch) or original(self))
    greedy = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * len(prompts())
    want, _ = run(tiny_llama, greedy, enforce_eager=eager)
    replays.clear()
    config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 3}
    llm = LLM(
        model=str(tiny_llama),
        dtype="float32",
        device="cuda",
        max_model_len=256,
        max_num_seqs=16,
        enforce_eager=eager,
        speculative_config=config,
    )
    seen = record_proposals(llm)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts(), greedy)]
    assert got == want
    reference = Reference(tiny_llama, head)
    assert len(seen) > 10
    for i, (tokens, proposals) in enumerate(seen):
        assert proposals == reference.proposals(tokens, len(proposals)), (i, len(tokens))
    if not eager:
        assert replays  # decode passes and verify passes replayed the graphs
