"""Every supported family against transformers on a tiny random model of its own config class:
greedy tokens equal for 32 tokens on 8 prompts of different lengths (most longer than the
sliding window of the windowed models), with 1 and 8 scheduler steps, and the chosen tokens'
logprobs agree within LOGPROB_TOL."""

import pytest
import torch
import transformers

from stepserve import LLM, SamplingParams
from tiny_models import WINDOW, write_tiny_family

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over",
    "a",
    "Once upon a time, in a land far away, there lived",
    "1 2 3 4 5",
    "héllo wörld 日本",
    "What is the capital of France? The capital of France is",
    "xyz" * 20,
]
NEW_TOKENS = 32
LOGPROB_TOL = 1e-3  # float32 on both sides; the difference is summation order

_REFERENCE: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    dirs = {}

    def get(family: str):
        if family not in dirs:
            dirs[family] = write_tiny_family(tmp_path_factory.mktemp("arch") / family, family, seed=4)
        return dirs[family]

    return get


def reference(model_dir, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' greedy tokens and their logprobs: one left-padded batch (positions and
    masks follow the padding, so each row is computed as if alone)."""
    key = str(model_dir), tuple(map(tuple, prompt_ids))
    if key not in _REFERENCE:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        width = max(map(len, prompt_ids))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompt_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        gen = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new = gen.sequences[:, width:]
        steps = torch.stack(gen.logits, dim=1).float().log_softmax(-1)  # [B, NEW_TOKENS, V]
        _REFERENCE[key] = new.tolist(), steps.gather(2, new[:, :, None])[:, :, 0].tolist()
    return _REFERENCE[key]


FAMILIES = ["mistral", "qwen2-window", "qwen3", "gemma2", "gemma3", "gemma3-hd256", "phi3", "granite"]
FAMILIES += ["qwen3-moe", "qwen3-moe-top8", "qwen2-moe", "mixtral"]


@pytest.mark.parametrize("steps", [1, 8])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_equals_transformers(family, steps, family_dir):
    model_dir = family_dir(family)
    # Phi-3's longrope: a served context within the original 128 positions uses the short factors,
    # as transformers does for sequences that short.
    max_len = 128 if family == "phi3" else 256
    llm = LLM(
        model=str(model_dir),
        num_blocks=256,
        block_size=4,
        num_scheduler_steps=steps,
        max_model_len=max_len,
        dtype="float32",
    )
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    assert sum(len(p) > WINDOW for p in prompt_ids) >= 5
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    outs = [o.outputs[0] for o in llm.generate(prompt_ids, params)]
    want_tokens, want_logprobs = reference(model_dir, prompt_ids)
    assert [o.token_ids for o in outs] == want_tokens
    got = torch.tensor([[lp.logprob for lp in o.logprobs] for o in outs])
    assert torch.allclose(got, torch.tensor(want_logprobs), atol=LOGPROB_TOL)


def test_phi3_long_context_uses_the_long_factors(family_dir):
    """Served context beyond the original 128 positions: stepserve uses longrope's long factors
    for every token; transformers does too once a sequence is longer than 128, so prompts past
    it agree."""
    model_dir = family_dir("phi3")
    llm = LLM(model=str(model_dir), num_blocks=400, block_size=4, max_model_len=512, dtype="float32")
    prompts = [("The long prompt number %d goes on and on. " % i) * (4 + i) for i in range(3)]
    prompt_ids = [llm.tokenizer.encode(p) for p in prompts]
    assert min(map(len, prompt_ids)) > 128
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    outs = [o.outputs[0] for o in llm.generate(prompt_ids, params)]
    want_tokens, want_logprobs = reference(model_dir, prompt_ids)
    assert [o.token_ids for o in outs] == want_tokens
    got = torch.tensor([[lp.logprob for lp in o.logprobs] for o in outs])
    assert torch.allclose(got, torch.tensor(want_logprobs), atol=LOGPROB_TOL)


def test_all_windowed_model_hands_back_blocks_outside_the_window(family_dir):
    """Mistral windows every layer: blocks before the window go back to the pool as requests
    advance, so 8 requests run in a cache too small to hold them whole (it preempts without the
    release), and the answers stay transformers'."""
    model_dir = family_dir("mistral")
    llm = LLM(
        model=str(model_dir), num_blocks=48, block_size=4, num_scheduler_steps=8, max_model_len=128, dtype="float32"
    )
    assert llm.core.scheduler.window == WINDOW
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params)]
    assert outs == reference(model_dir, prompt_ids)[0]
    assert llm.core.scheduler.num_preemptions == 0
    assert llm.core.scheduler.blocks.num_free_blocks == 47  # everything came back once finished


def test_partly_windowed_model_keeps_its_blocks(family_dir):
    llm = LLM(model=str(family_dir("gemma2")), num_blocks=64, block_size=4, max_model_len=128, dtype="float32")
    assert llm.core.scheduler.window == 0  # its global layers see the whole context


def test_load_model_from_a_bare_source(family_dir):
    """The entry for code that loads a decoder outside the engine (pooling tasks)."""
    from stepserve.models.loader import load_model, read_hf_config, resolve_source

    source = resolve_source(str(family_dir("qwen3")))
    model = load_model(source, read_hf_config(source), torch.float32, torch.device("cpu"), max_positions=64)
    assert model.cfg.qk_norm and model.layers[0].self_attn.q_norm is not None


def test_a_mixture_runs_with_int4_projections(family_dir):
    """The CPU's int4 path packs the attention and dense projections and leaves the routers and
    the stacked experts in the activations' dtype: a mixture runs there and writes every token
    it is asked for, in bfloat16 where the CPU has it natively and in float32 (the ``auto`` dtype)
    elsewhere. A CPU without native bfloat16 (AVX2) refuses bfloat16 int4 with an error that
    says what to use."""
    from stepserve.config import ConfigError
    from stepserve.models.cpu_linear import cpu_has_bf16

    if not cpu_has_bf16():
        with pytest.raises(ConfigError, match="int4 needs float32 activations, or bfloat16 on a CPU with AVX512-BF16"):
            LLM(model=str(family_dir("qwen2-moe")), max_model_len=128, dtype="bfloat16", quantization="int4")
    dtype = "bfloat16" if cpu_has_bf16() else "float32"
    llm = LLM(model=str(family_dir("qwen2-moe")), max_model_len=128, dtype=dtype, quantization="int4")
    assert (llm.info.dtype, llm.info.quantization) == (dtype, "int4")
    out = llm.generate([list(b"Hello")], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (12, "length")
