"""A reference EAGLE-3 head for the tests: the head from its definition, over transformers'
Llama attention, MLP, norms and rotary, recomputed over the whole sequence for every proposal;
the target's hidden states from transformers' ``output_hidden_states``."""

import json

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding


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
        # hidden_states[i] enters layer i, but the last is after the final norm: the stream that
        # leaves the last layer (what a head reading layer id L takes) is the final norm's input
        leaving = []
        hook = self.target.model.norm.register_forward_hook(lambda module, args, out: leaving.append(args[0]))
        try:
            out = self.target(torch.tensor([tokens[:-1]]), output_hidden_states=True)
        finally:
            hook.remove()
        states = [*out.hidden_states[:-1], leaving[0]]
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


def record_proposals(llm) -> list[tuple[list[int], list[int]]]:
    """(tokens, proposals) of every running request of ``llm`` (a stepserve LLM) after each pass, as its
    scheduler keeps them."""
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
