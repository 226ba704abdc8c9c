"""Speculative decoding in the worker: the verify pass's layout and acceptance, and the draft model.

A verify pass computes each speculating row's last token and its k proposals in one forward (as
a prefill chunk of k + 1 tokens), takes logits at all k + 1 positions, and samples each position
as if the proposals before it had been accepted: position j uses the request's sampling
parameters and its own noise for output token index + j. The row keeps the longest run of
proposals equal to the tokens sampled before them, plus the token sampled after that run.

That is the standard accept/resample rule for a proposal that does not itself sample (an n-gram
continuation, a draft model's argmax): proposal d is accepted with the target's probability
p(d) and otherwise the target's token is drawn from p without d. Because the draw at each
position is the same one the target would make without speculation (same noise, same logits),
greedy and seeded requests give the very tokens they give without it, and unseeded ones the
same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stepserve.attention.base import AttentionMetadata
from stepserve.core.outputs import SchedulerOutput


def slots_of(tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """The cache slot of each (row, position): its block from the row's table, then the offset."""
    blocks = tables[rows, positions // block_size].long()
    return blocks * block_size + positions % block_size


@dataclass
class VerifyLayout:
    """Where each row's verified positions are, on the device (B rows, M logits rows, K the
    most proposals of a row)."""

    logits_index: torch.Tensor  # [M] long: the packed token whose logits each position takes
    row_of: torch.Tensor  # [M] long: its row
    offset: torch.Tensor  # [M] long: its place in the row's run, 0..k_r
    grid_index: torch.Tensor  # [B, K + 1] long: the M-row of each (row, place); 0 past the row's run
    drafts: torch.Tensor  # [B, K] long: each row's proposals, -1 past them (never a token)
    first: list[int]  # per row, its first M-row (host)
    width: int  # K + 1


def verify_layout(sched: SchedulerOutput, query_start: list[int], upload) -> VerifyLayout:
    """The verify pass's index tensors, built on the host and sent with ``upload`` (the runner's
    one-copy uploader: lists of int64 values in, device tensors out)."""
    width = 1 + max(len(r.draft_token_ids) for r in sched.requests)
    logits_index, row_of, offset, grid, drafts, first = [], [], [], [], [], []
    for b, r in enumerate(sched.requests):
        k = len(r.draft_token_ids)
        end = query_start[b + 1]
        first.append(len(logits_index))
        grid.extend(len(logits_index) + j if j <= k else 0 for j in range(width))
        logits_index.extend(range(end - 1 - k, end))
        row_of.extend([b] * (k + 1))
        offset.extend(range(k + 1))
        drafts.extend(list(r.draft_token_ids) + [-1] * (width - 1 - k))
    tensors = upload([logits_index, row_of, offset, grid, drafts])
    b = len(sched.requests)
    return VerifyLayout(
        tensors[0], tensors[1], tensors[2], tensors[3].view(b, width), tensors[4].view(b, width - 1), first, width
    )


def accept(tokens: torch.Tensor, layout: VerifyLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """From the tokens sampled at every position [M]: each row's tokens by place [B, K + 1] and
    how many proposals it accepted [B] (its output is places 0..accepted)."""
    grid = tokens[layout.grid_index]
    matches = (grid[:, :-1] == layout.drafts).long()
    accepted = matches.cumprod(dim=1).sum(dim=1)
    return grid, accepted


@dataclass
class DraftInputs:
    """What a drafter reads after a pass, on the device (T the pass's tokens, B its rows)."""

    input_ids: torch.Tensor  # [T] the tokens the target computed
    meta: AttentionMetadata  # the target's layout of them
    next_ids: torch.Tensor | None  # [T] the token after each (EAGLE-3 only; None for a draft model)
    last: torch.Tensor  # [B] each row's last accepted token in the packed batch
    newest: torch.Tensor  # [B] each row's newest token (sampled by this pass, not computed yet)
    positions: torch.Tensor  # [B] its position
    tables: torch.Tensor  # [B, W] each row's block table
    max_seq_len: int  # a bound on the rows' lengths with their newest token (their proposals counted)


def next_ids(input_ids: torch.Tensor, sample_index: torch.Tensor, sampled: torch.Tensor, known) -> torch.Tensor:
    """The token after each of the pass's tokens: the next input where the row goes on, the
    sampled token where the pass sampled (a verify pass samples after every proposal: where the
    proposal was accepted the two agree), and ``known`` = (index, token) for chunks whose next
    token is the prompt's own (a prompt chunk that is not its last samples nothing that counts)."""
    out = torch.empty_like(input_ids)
    out[:-1] = input_ids[1:]
    out[-1] = 0
    out[sample_index] = sampled
    if known is not None:
        out[known[0]] = known[1]
    return out


class DraftModel:
    """A small model of the target's tokenizer that proposes tokens. Its KV cache has the
    target's blocks: one block id addresses a block of each, so the block manager serves both.

    Every pass it computes its KV over the very tokens the target computed (the catch-up: a
    prompt chunk, or a row's last token and its proposals; also while the batch is too large to
    speculate), so its cache is whole wherever the target's is, prefix-cache hits included;
    then, when asked, from each row's newest token it decodes ``count`` tokens greedily, which
    are the row's proposals for the next pass."""

    needs_next_ids = False

    def __init__(self, model, kv_caches: list[torch.Tensor], backend, block_size: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size

    def after_pass(self, d: DraftInputs, count: int) -> torch.Tensor | None:
        self.backend.prepare(d.meta)
        self.model(d.input_ids, d.meta.positions, self.kv_caches, d.meta, self.backend)
        if not count:
            return None
        out = []
        tokens, positions = d.newest, d.positions
        for step in range(count):
            hidden = self._step(tokens, positions, d.tables, d.max_seq_len + step)
            tokens = self.model.compute_logits(hidden).argmax(dim=-1)
            out.append(tokens)
            positions = positions + 1
        return torch.stack(out, dim=1)

    def _step(self, tokens, positions, tables, max_seq_len, hidden=None):
        """One decode step of every row, one token each, at ``positions``."""
        batch = tokens.shape[0]
        meta = AttentionMetadata(
            slot_mapping=slots_of(tables, torch.arange(batch, device=tokens.device), positions, self.block_size),
            positions=positions,
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=tokens.device),
            seq_lens=(positions + 1).int(),
            block_tables=tables,
            max_query_len=1,
            max_seq_len=max_seq_len,
            block_size=self.block_size,
            is_decode=True,
        )
        self.backend.prepare(meta)
        if hidden is None:
            return self.model(tokens, positions, self.kv_caches, meta, self.backend)
        return self.model(tokens, positions, hidden, self.kv_caches, meta, self.backend)


class Eagle3Drafter(DraftModel):
    """An EAGLE-3 head (``models/eagle3.py``) over the target's kept hidden states
    (``DecoderForCausalLM.keep_aux_states``). Its KV cache has the target's blocks, as a draft
    model's does. At position p the head takes the target's states at p and the token at p + 1,
    so its catch-up reads each token's successor (``next_ids``); the catch-up's output at a row's
    last accepted token gives its first proposal, and each further one feeds the head's own
    state back, one position on."""

    needs_next_ids = True

    def __init__(self, head, target, kv_caches: list[torch.Tensor], backend, block_size: int) -> None:
        super().__init__(head, kv_caches, backend, block_size)
        self.target = target

    def after_pass(self, d: DraftInputs, count: int) -> torch.Tensor | None:
        head = self.model
        states = head.combine(self.target.aux_states[: d.input_ids.shape[0]])
        self.backend.prepare(d.meta)
        normed, fed_back = head(d.next_ids, d.meta.positions, states, self.kv_caches, d.meta, self.backend)
        if not count:
            return None
        tokens = head.greedy(normed[d.last])
        hidden = fed_back[d.last]
        out = [tokens]
        positions = d.positions  # the first proposal's input sits where the newest token does
        for step in range(1, count):
            normed, hidden = self._step(tokens, positions, d.tables, d.max_seq_len + step - 1, hidden)
            tokens = head.greedy(normed)
            out.append(tokens)
            positions = positions + 1
        return torch.stack(out, dim=1)
