"""EAGLE-3 heads (speculative decoding's method eagle3, models/eagle3.py): every proposal the
engine makes is the one a reference EAGLE-3 computes from scratch over the request's tokens
(transformers' Llama attention, MLP and norms; the target's hidden states from transformers'
``output_hidden_states``), in both file layouts and with the config's variants; the head's
cache stays whole while speculation pauses under load; bad heads are refused by name.

Greedy output with a head equals the output without one in test_speculative.py."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import write_eagle3_head, write_tiny_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from stepserve import LLM, SamplingParams
from stepserve.config import ConfigError

OPTIONS = dict(dtype="float32", max_model_len=256)
PROMPTS = [list(b"the cat sat on the mat; the cat"), list(b"abcabcabcab"), list(b"1 2 3 4 5 6 7 8 9 1")]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("eagle3") / "target", "llama", seed=3, num_hidden_layers=3)


class Reference:
    """EAGLE-3 from its definition, with no cache: each proposal recomputes the head over the
    whole sequence of (next token, hidden state) pairs."""

    def __init__(self, target_dir, head_dir):
        self.target = LlamaForCausalLM.from_pretrained(target_dir, torch_dtype=torch.float32).eval()
        config = json.loads((head_dir / "config.json").read_text())
        self.speculators = "speculators_model_type" in config
        layer = config["transformer_layer_config"] if self.speculators else config
        eagle = config.get("eagle_config", {})
        self.aux = config.get("eagle_aux_hidden_state_layer_ids") or eagle["eagle_aux_hidden_state_layer_ids"]
        self.norm_before_residual = config.get("norm_before_residual", self.speculators)
        self.norm_output = config.get("norm_output", False)
        w = {k.replace("midlayer.", "layers.0."): v for k, v in load_file(head_dir / "model.safetensors").items()}
        cfg = LlamaConfig(**{k: v for k, v in layer.items() if k != "model_type"})
        cfg._attn_implementation = "eager"
        self.attn = LlamaAttention(cfg, 0)
        hidden = cfg.hidden_size
        for name in ("q_proj", "k_proj", "v_proj"):  # the head's attention reads [embedding, hidden]
            out = w[f"layers.0.self_attn.{name}.weight"].shape[0]
            setattr(self.attn, name, torch.nn.Linear(2 * hidden, out, bias=False))
        self.mlp = LlamaMLP(cfg)
        self.norms = {n: LlamaRMSNorm(hidden, cfg.rms_norm_eps) for n in ("input", "hidden", "post", "final")}
        self.rope = LlamaRotaryEmbedding(cfg)
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(self.attn, name).weight.copy_(w[f"layers.0.self_attn.{name}.weight"])
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(self.mlp, name).weight.copy_(w[f"layers.0.mlp.{name}.weight"])
            for key, name in (
                ("input", "input_layernorm"),
                ("hidden", "hidden_norm"),
                ("post", "post_attention_layernorm"),
            ):
                self.norms[key].weight.copy_(w[f"layers.0.{name}.weight"])
            self.norms["final"].weight.copy_(w["norm.weight"])
        self.fc, self.lm_head = w["fc.weight"], w["lm_head.weight"]
        self.input_norm = w.get("input_norm.weight")
        self.fc_norms = [w[f"fc_norm.{i}.weight"] for i in range(len(self.aux))] if "fc_norm.0.weight" in w else None
        self.d2t = w.get("d2t", torch.zeros(self.lm_head.shape[0], dtype=torch.long))
        self.eps = cfg.rms_norm_eps

    def _rms(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    @torch.no_grad()
    def proposals(self, tokens: list[int], count: int) -> list[int]:
        """What the head proposes after ``tokens`` (the last one sampled, not yet computed)."""
        out = self.target(torch.tensor([tokens[:-1]]), output_hidden_states=True)
        # hidden_states[i] enters layer i (the last one, after the final norm, is never read here)
        states = list(out.hidden_states)
        aux = torch.cat([states[i] for i in self.aux], dim=-1)[0]
        if self.input_norm is not None:
            aux = self._rms(aux, self.input_norm)
        if self.fc_norms is not None:
            aux = torch.cat([self._rms(c, n) for c, n in zip(aux.chunk(len(self.aux), -1), self.fc_norms)], -1)
        inputs = list(tokens[1:])
        hidden = aux @ self.fc.T  # [n - 1, H]: position p holds (token p + 1, state p)
        proposed = []
        for _ in range(count):
            normed, fed_back = self._head(torch.tensor(inputs), hidden)
            best = int((normed[-1] @ self.lm_head.T).argmax())
            proposed.append(best + int(self.d2t[best]))
            inputs.append(proposed[-1])
            hidden = torch.cat([hidden, fed_back[-1:]])
        return proposed

    def _head(self, ids, hidden):
        n = ids.shape[0]
        embeds = self.norms["input"](self.target.model.embed_tokens(ids))
        if self.norm_before_residual:
            hidden = residual = self.norms["hidden"](hidden)
        else:
            residual, hidden = hidden, self.norms["hidden"](hidden)
        x = torch.cat([embeds, hidden], -1)[None]
        position_ids = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        attn, _ = self.attn(x, position_embeddings=self.rope(x, position_ids), attention_mask=mask)
        residual = attn[0] + residual
        residual = self.mlp(self.norms["post"](residual)) + residual
        normed = self.norms["final"](residual)
        return normed, normed if self.norm_output else residual


def _record_proposals(llm: LLM) -> list[tuple[list[int], list[int]]]:
    """(tokens, proposals) of every running request after each pass, as the scheduler keeps them."""
    scheduler = llm.core.scheduler
    seen = []
    update = scheduler.update

    def recording(sched, result):
        outputs = update(sched, result)
        for s in sched.requests:
            request = scheduler.requests.get(s.request_id)
            if request is not None and request.draft_token_ids and not request.is_finished:
                seen.append((list(request.token_ids), list(request.draft_token_ids)))
        return outputs

    scheduler.update = recording
    return seen


@pytest.mark.parametrize(
    ("layout", "draft_vocab", "flags"),
    [
        ("eagle", None, {}),
        ("eagle", 200, {}),  # a proposal vocabulary smaller than the target's, mapped by d2t
        ("speculators", 200, {}),
        ("eagle", None, {"norm_before_fc": True, "norm_output": True}),
        ("speculators", None, {"fc_norm": True}),
    ],
)
def test_every_proposal_is_the_reference_heads(target, tmp_path, layout, draft_vocab, flags):
    head = write_eagle3_head(tmp_path / "head", target, seed=7, layout=layout, draft_vocab=draft_vocab, **flags)
    config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 3}
    llm = LLM(model=str(target), speculative_config=config, **OPTIONS)
    seen = _record_proposals(llm)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm.generate(PROMPTS, greedy)
    reference = Reference(target, head)
    assert len(seen) > 10
    for tokens, proposals in seen:
        assert proposals == reference.proposals(tokens, len(proposals)), tokens


def test_the_head_keeps_up_while_speculation_pauses(target, tmp_path):
    """Two requests run with disable_by_batch_size=1: nothing is proposed until the short one
    ends; the head computed its cache over every pass meanwhile, so the long one's first
    proposals after that are the reference's (a head that skipped those passes proposes from a
    cache with holes)."""
    head = write_eagle3_head(tmp_path / "head", target, seed=11)
    config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 3, "disable_by_batch_size": 1}
    llm = LLM(model=str(target), speculative_config=config, **OPTIONS)
    seen = _record_proposals(llm)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 40)]
    llm.generate(PROMPTS[:2], params)
    reference = Reference(target, head)
    long = [len(t) - len(PROMPTS[1]) for t, _ in seen if t[: len(PROMPTS[1])] == PROMPTS[1]]
    # proposed after its prompt (both were prefilled in one pass), then only once the short one ended
    assert 1 in long and any(n > 12 for n in long) and not any(1 < n < 12 for n in long), long
    for tokens, proposals in seen:
        assert proposals == reference.proposals(tokens, len(proposals))


def test_a_draft_model_keeps_up_while_speculation_pauses(target):
    """The same for a draft model: the target drafting for itself has every proposal accepted,
    which it has only if its cache covers the passes without speculation."""
    config = {"method": "draft_model", "model": str(target), "num_speculative_tokens": 3, "disable_by_batch_size": 1}
    llm = LLM(model=str(target), speculative_config=config, **OPTIONS)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 40)]
    llm.generate(PROMPTS[:2], params)
    counters = llm.core.scheduler.spec_counters
    assert counters.num_draft_tokens > 0
    assert counters.num_accepted_tokens == counters.num_draft_tokens


def _edit(head, config=None, tensors=None):
    if config is not None:
        path = head / "config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if tensors is not None:
        save_file(tensors(load_file(head / "model.safetensors")), head / "model.safetensors")


BAD_HEADS = [
    (dict(config=lambda c: c | {"architectures": ["LlamaForCausalLM"]}), "name no EAGLE-3 head"),
    (dict(config=lambda c: c | {"hidden_size": 32}), "hidden size"),
    (dict(config=lambda c: c | {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 9]}}), "target layers"),
    (dict(config=lambda c: c | {"vocab_size": 300}), "vocabulary"),
    (dict(config=lambda c: c | {"num_hidden_layers": 2}), "one-layer heads"),
    (dict(tensors=lambda t: {k: v for k, v in t.items() if k != "fc.weight"}), "lacks fc.weight"),
    (dict(tensors=lambda t: t | {"extra.weight": torch.zeros(2)}), "'extra.weight'"),
    (dict(tensors=lambda t: {k: v for k, v in t.items() if k != "d2t"}), "no d2t"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_HEADS)
def test_bad_heads_are_refused_by_name(target, tmp_path, edit, message):
    head = write_eagle3_head(tmp_path / "head", target, draft_vocab=200)
    _edit(head, **edit)
    config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 2}
    with pytest.raises(ConfigError, match=message):
        LLM(model=str(target), speculative_config=config, **OPTIONS)


def test_a_gguf_or_missing_head_is_refused(target, tmp_path):
    from stepserve.checkpoint.source import embedded_model_path

    for model, message in (
        (str(embedded_model_path()), "not a GGUF"),
        (str(tmp_path), "nor a directory with config.json"),
    ):
        config = {"method": "eagle3", "model": model, "num_speculative_tokens": 2}
        with pytest.raises(ConfigError, match=message):
            LLM(model=str(target), speculative_config=config, **OPTIONS)
    config = {"method": "eagle3", "num_speculative_tokens": 2}
    with pytest.raises(ConfigError, match="needs a model"):
        LLM(model=str(target), speculative_config=config, **OPTIONS)
