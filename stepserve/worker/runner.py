"""The model runner: turns a SchedulerOutput into model inputs, runs its steps, samples.

Multi-step: the first step computes each request's scheduled tokens; every later step feeds
back the tokens just sampled, advancing positions, slots and context lengths with tensor ops on
the device. Slots past a request's allowed steps map to the null block: what is computed there
is discarded by the core's stop check, so it never reaches a request's real blocks.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from stepserve.attention.base import AttentionBackend, AttentionMetadata
from stepserve.core.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprob
from stepserve.models.llama import LlamaForCausalLM
from stepserve.worker import sampler as S


def kv_cache_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


def allocate_kv_cache(model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype, device) -> list[torch.Tensor]:
    cfg = model.cfg
    shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]


@dataclass
class StepInputs:
    """Model inputs of one step, on the device."""

    input_ids: torch.Tensor  # [T]
    meta: AttentionMetadata  # positions, slots, lengths, block tables
    logits_index: torch.Tensor  # [B]: each request's last token in the packed batch


class ModelRunner:
    """Runs the model over the paged KV cache; keeps per-request sampling generators."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        backend: AttentionBackend,
        eos_token_ids: Collection[int],
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = device
        self.vocab_size = model.cfg.vocab_size
        self.shared_generator = torch.Generator(device=device).manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    # -- the pass ------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in sched.finished_request_ids:
            self._generators.pop(request_id, None)
        requests = sched.requests
        inputs = self._prepare(sched)
        batch = S.build_sampling_batch(requests, self._row_generators(sched), self.eos_token_ids, self.vocab_size, self.device)
        steps: list[torch.Tensor] = []
        logprobs: list[tuple] = []
        errors: dict[str, str] = {}
        for step in range(sched.num_steps):
            if step > 0:
                self._advance(inputs, steps[-1])
            logits = self._forward(inputs)
            self._check_finite(logits, requests, errors)
            tokens = S.sample(S.apply_logits_processors(logits, batch), batch, self.shared_generator)
            if batch.num_logprobs >= 0:
                logprobs.append(S.top_logprobs(logits, tokens, batch.num_logprobs))
            S.advance(batch, tokens)
            steps.append(tokens)
        return self._output(sched, steps, logprobs, errors)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        self.backend.prepare(inputs.meta)
        hidden = self.model(inputs.input_ids, inputs.meta.positions, self.kv_caches, inputs.meta, self.backend)
        return self.model.compute_logits(hidden[inputs.logits_index])

    def _check_finite(self, logits: torch.Tensor, requests, errors: dict[str, str]) -> None:
        bad = (~torch.isfinite(logits).all(dim=-1)).nonzero().flatten().tolist()
        for row in bad:
            errors.setdefault(requests[row].request_id, "the model produced non-finite logits for this request")

    def _row_generators(self, sched: SchedulerOutput) -> list[torch.Generator | None]:
        rows = []
        for r in sched.requests:
            if r.params.seed is None:
                rows.append(None)
                continue
            gen = self._generators.get(r.request_id)
            if gen is None:
                gen = torch.Generator(device=self.device).manual_seed(r.params.seed)
                self._generators[r.request_id] = gen
            rows.append(gen)
        return rows

    # -- inputs --------------------------------------------------------------------------

    def _prepare(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        query_start = [0]
        seq_lens = []
        for r in sched.requests:
            end = r.start + r.num_new_tokens
            input_ids.extend(r.token_ids[r.start : end])
            positions.extend(range(r.start, end))
            query_start.append(len(input_ids))
            seq_lens.append(end)
        # Wide enough for every position the pass may touch; padding is the null block 0.
        width = max(-(-(n + sched.num_steps - 1) // bs) for n in seq_lens)
        tables = [list(r.block_ids[:width]) + [0] * (width - min(len(r.block_ids), width)) for r in sched.requests]
        dev = self.device
        qsl = torch.tensor(query_start, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            query_start_loc=qsl,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            max_query_len=max(r.num_new_tokens for r in sched.requests),
            max_seq_len=max(seq_lens),
            block_size=bs,
            is_decode=all(r.num_new_tokens == 1 for r in sched.requests),
        )
        token_rows = torch.repeat_interleave(
            torch.arange(len(seq_lens), device=dev), (qsl[1:] - qsl[:-1]).long()
        )
        meta.slot_mapping = self._slots(meta.block_tables, token_rows, meta.positions)
        return StepInputs(torch.tensor(input_ids, dtype=torch.long, device=dev), meta, qsl[1:].long() - 1)

    def _slots(self, tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        blocks = tables[rows, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size

    def _advance(self, inputs: StepInputs, tokens: torch.Tensor) -> None:
        """Next decode step of a multi-step pass, computed on the device (one token per request)."""
        meta = inputs.meta
        batch = tokens.shape[0]
        inputs.input_ids = tokens
        meta.positions = meta.seq_lens.long()  # the new token sits right after the context
        meta.seq_lens = meta.seq_lens + 1
        meta.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=self.device)
        meta.max_query_len = 1
        meta.max_seq_len += 1
        meta.is_decode = True
        meta.slot_mapping = self._slots(meta.block_tables, torch.arange(batch, device=self.device), meta.positions)
        inputs.logits_index = torch.arange(batch, device=self.device)

    # -- outputs -------------------------------------------------------------------------

    def _output(self, sched: SchedulerOutput, steps, logprobs, errors) -> ModelRunnerOutput:
        tokens = torch.stack(steps, dim=1).tolist()  # the pass's one host sync
        sampled = tuple(tuple(row) if r.sample else () for r, row in zip(sched.requests, tokens))
        return ModelRunnerOutput(sampled, self._logprobs(sched, tokens, logprobs), errors)

    def _logprobs(self, sched: SchedulerOutput, tokens: list[list[int]], logprobs) -> tuple:
        if not logprobs:
            return ()
        per_step = [(c.tolist(), i.tolist(), v.tolist()) for c, i, v in logprobs]
        out = []
        for row, r in enumerate(sched.requests):
            k = r.params.logprobs
            if k is None or not r.sample:
                out.append(None)
                continue
            out.append(tuple(
                TokenLogprob(tokens[row][step], chosen[row], tuple(zip(ids[row][:k], values[row][:k])))
                for step, (chosen, ids, values) in enumerate(per_step)
            ))
        return tuple(out)
