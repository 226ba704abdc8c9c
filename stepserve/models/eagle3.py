"""EAGLE-3 draft heads (speculative decoding's method ``eagle3``).

A head is one decoder layer that reads the target's own hidden states: the residual stream
entering three of the target's layers (by default 2, L/2 and L-3; the head's config may name
them) is concatenated and projected by ``fc`` to the head's width. At position p the layer takes
that projection and the embedding of the token at p + 1 (both normed, concatenated: its q/k/v
projections are twice as wide as its hidden size), attends over its own KV cache, and predicts
the token at p + 2 in a small vocabulary that ``d2t`` maps into the target's (target id =
draft id + d2t[draft id]). Its next proposal feeds its own pre-norm output back as the hidden
state. The embedding is the target's unless the head carries one.

Two file layouts are read, as vLLM reads them: the EAGLE authors' (``config.json`` naming an
``...Eagle3`` architecture, weights under ``midlayer.``) and the ``speculators`` one
(``speculators_model_type: eagle3``, the layer's config under ``transformer_layer_config``,
weights under ``layers.0.``); weights in safetensors or, from a local directory, ``pytorch_model.bin``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.attention.base import AttentionBackend, AttentionMetadata
from stepserve.config import ConfigError
from stepserve.models.config import DecoderConfig
from stepserve.models.decoder import DecoderForCausalLM
from stepserve.models.layers import Attention, GatedMLP, RMSNorm
from stepserve.models.rope import Rotary


@dataclass(frozen=True)
class Eagle3Spec:
    """What an EAGLE-3 head's config says beyond its layer's shape."""

    layer: dict  # the decoder layer's config (a Llama config.json's keys)
    aux_layers: tuple[int, ...]  # the target layers whose entering residual stream the head reads
    target_hidden_size: int
    draft_vocab_size: int
    norm_before_residual: bool  # the residual is the normed hidden state (speculators' default)
    norm_before_fc: bool  # one RMSNorm over the concatenated target states before fc
    fc_norm: bool  # an RMSNorm per target state before fc
    norm_output: bool  # the state fed back is the normed output, not the pre-norm one


def read_eagle3_spec(hf: dict, target_layers: int, target_hidden: int) -> Eagle3Spec:
    """The head's settings from its config.json (either layout), checked against the target."""
    if hf.get("speculators_model_type") is not None:
        kind = hf["speculators_model_type"]
        if kind != "eagle3":
            raise ConfigError(f"the speculator is of type {kind!r}; method eagle3 reads eagle3 speculators")
        layer = dict(hf.get("transformer_layer_config") or {})
        if not layer:
            raise ConfigError("the eagle3 speculator's config has no transformer_layer_config")
        outer, before_residual = hf, True
    else:
        archs = hf.get("architectures") or []
        if not any("Eagle3" in a for a in archs):
            raise ConfigError(
                f"the model's architectures {archs} name no EAGLE-3 head (LlamaForCausalLMEagle3, "
                "Eagle3LlamaForCausalLM, or a speculators eagle3 config): method eagle3 needs one"
            )
        layer, outer, before_residual = hf, hf, False
    model_type = layer.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"EAGLE-3 heads of model_type {model_type!r} are not supported; supported: llama")
    if layer.get("num_hidden_layers", 1) != 1:
        raise ConfigError(f"the EAGLE-3 head has {layer['num_hidden_layers']} layers; stepserve reads one-layer heads")
    eagle = outer.get("eagle_config") or layer.get("eagle_config") or {}
    if eagle.get("use_aux_hidden_state") is False:
        raise ConfigError("the EAGLE-3 head sets use_aux_hidden_state=false (an EAGLE-1 style head): not supported")
    ids = outer.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
    aux = tuple(ids) if ids else (2, target_layers // 2, target_layers - 3)
    bad = [i for i in aux if not (isinstance(i, int) and 0 <= i <= target_layers)]
    if bad or len(set(aux)) != len(aux):
        raise ConfigError(f"the EAGLE-3 head reads target layers {list(aux)}; the target has {target_layers}")
    hidden = layer.get("hidden_size")
    target_hidden_size = outer.get("target_hidden_size") or layer.get("target_hidden_size") or hidden
    if target_hidden_size != target_hidden:
        raise ConfigError(
            f"the EAGLE-3 head was made for a target of hidden size {target_hidden_size}; "
            f"this target's is {target_hidden}"
        )

    def flag(name: str, default: bool) -> bool:
        return bool(eagle.get(name, outer.get(name, layer.get(name, default))))

    return Eagle3Spec(
        layer=layer,
        aux_layers=aux,
        target_hidden_size=target_hidden_size,
        draft_vocab_size=outer.get("draft_vocab_size") or layer.get("draft_vocab_size") or layer["vocab_size"],
        norm_before_residual=flag("norm_before_residual", before_residual),
        norm_before_fc=flag("norm_before_fc", False),
        fc_norm=flag("fc_norm", False),
        norm_output=flag("norm_output", False),
    )


def head_weights(directory: Path):
    """The head's ``(name, tensor)`` pairs: safetensors, else a local ``pytorch_model.bin``."""
    from stepserve.models.weights import safetensors_weights

    if any(directory.glob("*.safetensors")):
        return safetensors_weights(directory)
    bin_file = directory / "pytorch_model.bin"
    if bin_file.exists():
        return iter(torch.load(bin_file, map_location="cpu", weights_only=True).items())
    raise ConfigError(f"the EAGLE-3 head in {directory} has no .safetensors files and no pytorch_model.bin")


def read_head_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise ConfigError(f"the EAGLE-3 head in {directory} has no config.json")
    return json.loads(path.read_text())


class Eagle3Layer(nn.Module):
    """The head's decoder layer: attention over [norm(embedding), norm(hidden)], then the MLP."""

    def __init__(self, cfg: DecoderConfig, norm_before_residual: bool) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = Attention(cfg, 0)
        attn = self.self_attn
        self.self_attn.qkv_proj = nn.Linear(2 * cfg.hidden_size, attn.q_size + 2 * attn.kv_size, bias=cfg.qkv_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = GatedMLP(cfg)
        self.norm_before_residual = norm_before_residual

    def forward(self, embeds, hidden, rope, kv_cache, meta, backend):
        embeds = self.input_layernorm(embeds)
        if self.norm_before_residual:
            hidden = residual = self.hidden_norm(hidden)
        else:
            residual, hidden = hidden, self.hidden_norm(hidden)
        h = self.self_attn(torch.cat([embeds, hidden], dim=-1), rope, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Eagle3Head(nn.Module):
    """An EAGLE-3 head on the target's device and in its dtype. ``cfg`` is its layer's
    ``DecoderConfig`` (one layer: ``allocate_kv_cache`` sizes its cache from it)."""

    STACKED = DecoderForCausalLM.STACKED  # the checkpoint's q/k/v and gate/up folded into fused projections

    def __init__(self, cfg: DecoderConfig, spec: Eagle3Spec, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        n, width = len(spec.aux_layers), spec.target_hidden_size
        self.input_norm = RMSNorm(n * width, cfg.rms_norm_eps) if spec.norm_before_fc else None
        self.fc_norm = nn.ModuleList(RMSNorm(width, cfg.rms_norm_eps) for _ in range(n)) if spec.fc_norm else None
        self.fc = nn.Linear(n * width, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(cfg, spec.norm_before_residual)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, spec.draft_vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, max_positions)
        self.embed_tokens: nn.Embedding | None = None  # the target's, unless the checkpoint has one
        # target id = draft id + d2t[draft id]; the identity when the vocabularies are one
        self.register_buffer("d2t", torch.zeros(spec.draft_vocab_size, dtype=torch.long))

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's states [T, n * width] projected to the head's width."""
        if self.input_norm is not None:
            aux = self.input_norm(aux)
        if self.fc_norm is not None:
            chunks = aux.chunk(len(self.fc_norm), dim=-1)
            aux = torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(aux)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed output for the logits, the state the next proposal step takes) per token."""
        rope = self.rotary.step(positions, hidden.dtype)
        h, residual = self.layers[0](self.embed_tokens(input_ids), hidden, rope, kv_caches[0], meta, backend)
        normed, prenorm = self.norm(h, residual)
        return normed, normed if self.spec.norm_output else prenorm

    def greedy(self, normed: torch.Tensor) -> torch.Tensor:
        """The most likely next token of each row, as a target token id."""
        best = F.linear(normed, self.lm_head.weight).argmax(dim=-1)
        return best + self.d2t[best]

    def load_weights(self, weights, target_embedding: nn.Embedding) -> None:
        """Fill every parameter from the checkpoint; a name the head does not know, or a
        parameter no tensor filled, is an error naming it."""
        params = dict(self.named_parameters())
        sizes = {
            "qkv_proj": (
                self.layers[0].self_attn.q_size,
                self.layers[0].self_attn.kv_size,
                self.layers[0].self_attn.kv_size,
            ),
            "gate_up_proj": (self.cfg.intermediate_size, self.cfg.intermediate_size),
        }
        filled: set[str] = set()
        own_embedding = None
        mapped = False
        for name, tensor in weights:
            name = name.removeprefix("model.").replace("midlayer.", "layers.0.")
            if name == "t2d":
                continue  # the inverse map: d2t says all of it
            if name == "d2t":
                _check_shape(name, tensor, self.d2t.shape)
                self.d2t.copy_(tensor.to(torch.long))
                mapped = True
                continue
            if name == "embed_tokens.weight":
                own_embedding = tensor
                continue
            target, shard = name, None
            for src, dst, idx in self.STACKED:
                if f".{src}." in name:
                    target, shard = name.replace(f".{src}.", f".{dst}."), idx
                    break
            if target not in params:
                raise ConfigError(f"the EAGLE-3 head's checkpoint has a tensor {name!r} the head does not use")
            param = params[target]
            if shard is None:
                place = param.data
            else:
                kind = target.rsplit(".", 2)[-2]
                start = sum(sizes[kind][:shard])
                place = param.data[start : start + sizes[kind][shard]]
            _check_shape(name, tensor, place.shape)
            place.copy_(tensor)
            filled.add(target if shard is None else f"{target}#{shard}")
        missing = [
            n for n, p in params.items() if n not in filled and not all(f"{n}#{i}" in filled for i in range(_shards(n)))
        ]
        if missing:
            raise ConfigError(f"the EAGLE-3 head's checkpoint lacks {', '.join(sorted(missing))}")
        if not mapped and self.spec.draft_vocab_size != target_embedding.num_embeddings:
            raise ConfigError(
                f"the EAGLE-3 head proposes from {self.spec.draft_vocab_size} tokens but has no d2t map into the "
                f"target's {target_embedding.num_embeddings}"
            )
        if own_embedding is not None:
            _check_shape("embed_tokens.weight", own_embedding, (target_embedding.num_embeddings, self.cfg.hidden_size))
            embedding = nn.Embedding(*own_embedding.shape, _weight=torch.empty(own_embedding.shape))
            self.embed_tokens = embedding.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
            self.embed_tokens.weight.data.copy_(own_embedding)
        else:
            self.share_embedding(target_embedding)

    def share_embedding(self, target_embedding: nn.Embedding) -> None:
        """Embed with the target's table, which must be as wide as the head."""
        if target_embedding.embedding_dim != self.cfg.hidden_size:
            raise ConfigError(
                f"the EAGLE-3 head is {self.cfg.hidden_size} wide and has no embedding of its own; the target's "
                f"is {target_embedding.embedding_dim} wide"
            )
        self.embed_tokens = target_embedding


def _check_shape(name: str, tensor: torch.Tensor, shape) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConfigError(
            f"the EAGLE-3 head's tensor {name!r} has shape {list(tensor.shape)}; the head needs {list(shape)}"
        )


def _shards(name: str) -> int:
    return 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else 1


def build_eagle3_head(
    directory: Path | None,
    spec: Eagle3Spec,
    cfg: DecoderConfig,
    target_embedding: nn.Embedding,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    seed: int,
) -> Eagle3Head:
    """The head filled from ``directory``, or (``None``: ``--load-format dummy``) with random
    weights, N(0, 0.02) matrices and unit norms, the vocabularies one."""
    with torch.device("meta"):
        head = Eagle3Head(cfg, spec, max_positions)
    head = head.to(dtype).to_empty(device=device)
    head.d2t.zero_()
    head.rotary.cos_sin = head.rotary.cos_sin.float()
    head.rotary.fill()
    if directory is not None:
        head.load_weights(head_weights(directory), target_embedding)
        return head.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, device=device).mul_(0.02))
    head.share_embedding(target_embedding)
    return head.eval()
