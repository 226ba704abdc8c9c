"""The GPU benchmark's greedy check, end to end on the CPU: stepserve in bf16 on a tiny random
Llama, its greedy tokens and teacher-forced prompt logprobs, judged against transformers in
float32 (the bf16 weights upcast) with transformers in bf16 as the measure of noise."""

import torch
import transformers
from tiny_models import write_tiny_model

from stepserve import LLM, SamplingParams
from stepserve.bench.gpu import GREEDY_CHECK_REQUESTS, greedy_verdict, teacher_forced_logprobs

PROMPTS = ["Hello", "The quick brown fox jumps over", "1 2 3 4 5", "Once upon a time, there lived"]
NEW_TOKENS = 24


def hf_logprobs(model, seqs: list[list[int]], starts: list[int]) -> torch.Tensor:
    with torch.no_grad():
        rows = [
            model(torch.tensor([s])).logits[0, start:].float().log_softmax(dim=-1) for s, start in zip(seqs, starts)
        ]
    return torch.cat(rows)


def test_stepserve_bf16_passes_the_greedy_check(tmp_path):
    model_dir = write_tiny_model(tmp_path / "llama", "llama", seed=5, num_hidden_layers=4)
    llm = LLM(model=str(model_dir), dtype="bfloat16", num_blocks=128, block_size=8)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]

    # Teacher-forced: prompt + outputs as one prompt; entry p of prompt_logprobs is token p's.
    forced = llm.generate(
        [p + out for p, out in zip(prompts, outputs)], SamplingParams(prompt_logprobs=20, max_tokens=1)
    )
    entries = [lp for p, f in zip(prompts, forced) for lp in f.prompt_logprobs[len(p) :]]
    tokens = torch.tensor([t for out in outputs for t in out])
    assert [lp.token_id for lp in entries] == tokens.tolist()
    ours = torch.tensor([lp.logprob for lp in entries])

    seqs = [p + out[:-1] for p, out in zip(prompts, outputs)]
    starts = [len(p) - 1 for p in prompts]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    hf = hf_logprobs(model, seqs, starts)
    ref = hf_logprobs(model.float(), seqs, starts)  # the same bf16 weights, float32 arithmetic

    verdict = greedy_verdict(ref, hf, tokens, ours, [NEW_TOKENS] * len(prompts))
    assert verdict["passed"], verdict
    assert verdict["real_differences"] == 0 and verdict["tokens"] == NEW_TOKENS * len(prompts)
    assert verdict["noise_max"] > 0  # bf16 did move the logprobs: the bound is not the floor alone

    # The benchmark's own collector, driving the engine core as the GPU benchmark does, keeps the
    # same entries: one per output token, from the position that chose it.
    assert len(PROMPTS) == GREEDY_CHECK_REQUESTS
    collected = teacher_forced_logprobs(llm.core, prompts, dict(enumerate(outputs)))
    assert [lp for i in range(len(prompts)) for lp in collected[i]] == entries
