"""The CUDA graphs' buffer logic on the CPU: ``CudaGraphs`` with its captures replaced by the
same Python steps run eagerly, so that loading a pass, the in-graph greedy tokens, the sampling
buffers (padding rows neutral, top-k and top-p or not) and the noise index advancing replay by
replay are checked against the plain runner here; the real captures are tested on the GPU."""

import random

import pytest

from stepserve import LLM, SamplingParams
from stepserve.worker.cuda_graphs import CudaGraphs


class Replay:
    def __init__(self, run):
        self.replay = run


class EagerGraphs(CudaGraphs):
    """Every 'graph' is its Python step, run when replayed."""

    def _capture(self) -> None:
        for size in self.sizes:
            meta = self._meta(size)
            self.logits[size] = None

            def step(size=size, meta=meta):
                self.logits[size] = self._step(size, meta)

            self.graphs[size] = Replay(step)
            self.sampling_graphs[size] = Replay(lambda size=size: self._sample(size))

    def replay(self):
        self.graphs[self.size].replay()
        return self.logits[self.size][: self.batch]


PARAMS = [
    SamplingParams(temperature=0.9, seed=1),
    SamplingParams(temperature=1.2, min_p=0.05, seed=2),
    SamplingParams(temperature=0.8, top_k=20, seed=3),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0, top_p=0.9, seed=4, logprobs=2),
    SamplingParams(temperature=0.7, repetition_penalty=1.2, seed=5),  # a logits processor: eager sampling
]


def run(tiny_llama, graphs: bool, steps: int, params, count: int):
    llm = LLM(
        model=str(tiny_llama),
        dtype="float32",
        max_model_len=256,
        num_blocks=512,
        block_size=4,
        max_num_seqs=8,
        num_scheduler_steps=steps,
    )
    if graphs:
        llm.core.worker.graphs = EagerGraphs(llm.core.worker, [1, 2, 4, 8], 256 + steps)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 200) for _ in range(12)] for _ in range(count)]
    params = [p.replace(max_tokens=20, ignore_eos=True) for p in params]
    outs = llm.generate(prompts, params)
    return [(o.outputs[0].token_ids, [round(lp.logprob, 4) for lp in o.outputs[0].logprobs or []]) for o in outs], llm


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("case", ["sampled", "both", "greedy", "processor", "padded"])
def test_graph_paths_equal_the_eager_runner(tiny_llama, steps, case, monkeypatch):
    replays = []
    original = CudaGraphs.sample
    monkeypatch.setattr(CudaGraphs, "sample", lambda self: replays.append(self.size) or original(self))
    params, count = {
        "sampled": (PARAMS[:5] + PARAMS[:3], 8),  # a full bucket, every sampling kind, each filter on its own row
        "both": (PARAMS[:4] + [PARAMS[2].replace(top_p=0.8, seed=6)], 5),  # top-k and top-p on one row
        "greedy": ([PARAMS[3]] * 8, 8),
        "processor": (PARAMS, 6),
        "padded": (PARAMS[:2] * 2 + PARAMS[:1], 5),  # 5 rows in the bucket of 8, no top-k or top-p
    }[case]
    want, _ = run(tiny_llama, False, steps, params, count)
    got, llm = run(tiny_llama, True, steps, params, count)
    assert got == want
    if case == "sampled":
        assert set(replays) == {8}
    elif case in ("both", "padded"):
        assert 8 in replays
    else:
        assert not replays  # plain greedy takes the step's own tokens; processors sample eagerly
    assert llm.core.stats().kv_cache_usage == 0.0


@pytest.mark.parametrize("divisor, softcap", [(1.0, 0.0), (4.0, 0.0), (1.0, 3.0), (2.0, 5.0)])
def test_logits_into_the_graphs_buffer_equal_fresh_logits(tiny_llama, divisor, softcap):
    """``compute_logits(out=)``, the graphs' one buffer, gives the fresh tensor's values bit for
    bit, with Granite's divisor and Gemma 2's softcap applied in place."""
    import dataclasses

    import torch

    from stepserve.models.loader import build_model
    from stepserve.models.registry import decoder_config

    hf = __import__("json").loads((tiny_llama / "config.json").read_text())
    model = build_model(decoder_config(hf, 64), None, torch.float32, torch.device("cpu"), 64, None, seed=3)
    model.cfg = dataclasses.replace(model.cfg, logits_divisor=divisor, final_softcap=softcap)
    hidden = torch.randn(5, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    buffer = torch.full((8, model.cfg.vocab_size), float("nan"))
    want = hidden @ model.embed_tokens.weight.T if model.lm_head is None else hidden @ model.lm_head.weight.T
    want = want.float() / divisor
    if softcap:
        want = torch.tanh(want / softcap) * softcap
    fresh = model.compute_logits(hidden)
    got = model.compute_logits(hidden, out=buffer[:5])
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, fresh)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert buffer[5:].isnan().all()
