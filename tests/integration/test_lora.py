"""LoRA adapters (docs/lora.md) on tiny random base models, with adapters made by ``peft`` in the
test (ranks 4, 8 and 16, attention-only, MLP-only and every projection, rsLoRA), on dense models
(Phi-3's fused projections too) and mixtures of experts (whose MLP targets are a shared expert,
or the stacked experts): each adapter's greedy tokens equal peft's merged model, alone and in
one batch with the other adapters and the base, at --num-scheduler-steps 1 and 8, and over two
tensor-parallel ranks; under --max-loras 1 the adapters take turns in the one slot and every
answer stays right; the prefix cache never lends one adapter's KV to another."""

import pytest
from lora_adapters import ADAPTERS, merged_greedy, write_adapter
from tiny_models import write_tiny_family, write_tiny_model

from stepserve import LLM, LoRARequest, SamplingParams

PROMPTS = [list(b"Hello there"), list(b"The quick brown fox jumps over"), list(b"a"), list(b"1 2 3 4 5 6 7 8")]
NEW_TOKENS = 16
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


# qwen2-moe: peft puts the MLP targets on its shared expert (and, from peft 0.22, on its stacked
# experts too); qwen3-moe: on its stacked experts (peft's target_parameters, gate and up fused into
# one adapter of twice the rank)
# (phi3: its fused qkv_proj and gate_up_proj, one pair over the slices)
@pytest.fixture(scope="module", params=["llama", "qwen3", "phi3", "qwen2-moe", "qwen3-moe"])
def models(request, tmp_path_factory):
    """(base directory, adapter name -> directory, expected tokens per adapter and for the base)."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    if request.param == "llama":
        base = write_tiny_model(root / "base", "llama", seed=3)
    else:
        base = write_tiny_family(root / "base", request.param, seed=3)
    # peft cannot adapt the stacked gate without up (they are one tensor; peft 0.22 refuses it on
    # Qwen2-MoE too)
    names = [n for n in ADAPTERS if not (request.param.endswith("-moe") and n == "mlp-r4")]
    adapters = {name: write_adapter(base, root / name, name, seed=i) for i, name in enumerate(names)}
    expected = {name: merged_greedy(base, path, PROMPTS, NEW_TOKENS) for name, path in adapters.items()}
    expected[None] = merged_greedy(base, None, PROMPTS, NEW_TOKENS)
    for name in adapters:
        assert expected[name] != expected[None], name  # each adapter really changes the answers
    return base, adapters, expected


def _requests(adapters) -> dict:
    return {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}


def _check_mixed_batch(llm, adapters, expected) -> None:
    """One batch: every prompt under every adapter and the base, interleaved; each answer peft's."""
    requests = _requests(adapters)
    names = [None, *requests]
    prompts = [p for p in PROMPTS for _ in names]
    loras = [requests.get(n) for _ in PROMPTS for n in names]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, lora_request=loras)]
    for k, name in enumerate(names):
        assert got[k :: len(names)] == expected[name], name


@pytest.mark.parametrize("steps", [1, 8])
def test_each_adapter_equals_peft_merged_alone_and_mixed(models, steps):
    base, adapters, expected = models
    llm = LLM(
        model=str(base), dtype="float32", max_model_len=128, num_scheduler_steps=steps, enable_lora=True, max_loras=3
    )
    for name, lora in _requests(adapters).items():  # alone
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, lora_request=lora)] == expected[name]
    _check_mixed_batch(llm, adapters, expected)


def test_one_slot_swaps_adapters_and_keeps_answers_right(models):
    base, adapters, expected = models
    llm = LLM(model=str(base), dtype="float32", max_model_len=128, enable_lora=True, max_loras=1, max_cpu_loras=1)
    requests = _requests(adapters)
    names = [*requests, None, *reversed(requests)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, lora_request=[requests.get(n) for n in names])]
    for i, name in enumerate(names):
        assert got[i] == expected[name][i % len(PROMPTS)], (i, name)
    # each adapter took the one slot in turn (the scheduler runs a waiting adapter's requests together)
    assert llm.core.worker.lora.loads >= len(requests)


def test_prefix_cache_is_keyed_by_adapter(models):
    """The same long prompt under the base, then an adapter, then the base again: the adapter's
    answer is its own (not computed on the base's cached KV), and the base's second answer reuses
    the base's blocks."""
    base, adapters, expected = models
    llm = LLM(model=str(base), dtype="float32", max_model_len=128, enable_lora=True, block_size=4)
    lora = _requests(adapters)["attn-r8"]
    prompt = PROMPTS[1]
    first = llm.generate([prompt], PARAMS)[0]
    adapted = llm.generate([prompt], PARAMS, lora_request=lora)[0]
    again = llm.generate([prompt], PARAMS)[0]
    assert adapted.num_cached_tokens == 0
    assert adapted.outputs[0].token_ids == expected["attn-r8"][1]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_the_server_checks_accept_each_peft_adapter(models):
    """What the front checks before serving an adapter (``--lora-modules``, ``load_lora_adapter``):
    each adapter peft wrote passes against the base's layer shapes, its stacked experts named."""
    import json

    from stepserve.checkpoint.lora import layer_shapes, read_adapter_config
    from stepserve.models.registry import decoder_config

    base, adapters, _ = models
    cfg = decoder_config(json.loads((base / "config.json").read_text()), 128)
    for name, path in adapters.items():
        config = read_adapter_config(path, 16, layer_shapes(cfg))
        mlp = {"gate_proj", "up_proj", "down_proj"} & set(ADAPTERS[name][2])
        # peft adapts the stacked experts (target_parameters) on Qwen3-MoE, and from 0.22 on Qwen2-MoE
        stacked = json.loads((path / "adapter_config.json").read_text()).get("target_parameters")
        if cfg.moe is not None and mlp and (stacked or cfg.moe.shared_intermediate_size == 0):
            assert set(config.modules) >= {"experts.gate_up_proj", "experts.down_proj"}, config.modules


def test_tensor_parallel_ranks_serve_the_adapters(models):
    """Two ranks over gloo: each holds its share of every pair (``B``'s rows of q/k/v and gate/up,
    ``A``'s columns of o and down, the stacked experts' and the shared expert's alike), and the
    all-reduce after o and down adds the ranks' partial deltas: every adapter's greedy tokens,
    mixed in one batch with the others and the base, equal peft's merged model."""
    base, adapters, expected = models
    llm = LLM(
        model=str(base),
        dtype="float32",
        max_model_len=128,
        num_scheduler_steps=8,
        tensor_parallel_size=2,
        enable_lora=True,
        max_loras=3,
    )
    try:
        assert len(llm.core.worker.rank_pids) == 1
        _check_mixed_batch(llm, adapters, expected)
    finally:
        llm.core.worker.close()


@pytest.mark.parametrize("family", ["mistral", "qwen2-window", "gemma2", "gemma3", "granite", "mixtral"])
def test_every_other_family_serves_peft_adapters(family, tmp_path):
    """The registry's other families (the fixture above covers Llama, Qwen3, Phi-3 and two
    mixtures): an adapter on every projection peft finds (Mixtral: the attention, as its MLP
    targets match no module) gives peft's merged tokens, mixed in one batch with the base."""
    base = write_tiny_family(tmp_path / "base", family, seed=3)
    adapter = write_adapter(base, tmp_path / "adapter", "all-r16-rslora", seed=1)
    want, want_base = merged_greedy(base, adapter, PROMPTS, NEW_TOKENS), merged_greedy(base, None, PROMPTS, NEW_TOKENS)
    assert want != want_base
    llm = LLM(model=str(base), dtype="float32", max_model_len=128, num_scheduler_steps=8, enable_lora=True)
    lora = LoRARequest("adapter", 1, str(adapter))
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS * 2, PARAMS, lora_request=[lora] * 4 + [None] * 4)]
    assert got == want + want_base
