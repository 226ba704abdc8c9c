"""The model runner: turns a SchedulerOutput into model inputs, runs its steps, samples.

Multi-step: the first step computes each request's scheduled tokens; every later step feeds
back the tokens just sampled, advancing positions, slots and context lengths with tensor ops on
the device. Slots past a request's allowed steps map to the null block: what is computed there
is discarded by the core's stop check, so it never reaches a request's real blocks.

On CUDA a pure-decode pass replays a captured graph (``cuda_graphs.py``) that runs the forward
and advances positions, slots and context lengths for the next step; its argmax serves plain
greedy rows, and a sampling graph draws the tokens of any other pass but those with logits
processors or grammars, which sample outside the graphs. Inputs go up in one pinned, non-blocking
copy; the pass ends with its one host sync.

``submit`` starts a pass and returns at once (its results are copied to pinned host memory
behind an event); ``collect`` waits for them. Between the two the core schedules the next pass,
whose decode rows may have a PLACEHOLDER input: the token this pass sampled last for the
request, filled in on the device from this pass's tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass

import torch

from stepserve.attention.base import AttentionBackend, AttentionMetadata
from stepserve.core.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprob
from stepserve.core.request import PLACEHOLDER
from stepserve.models.decoder import DecoderForCausalLM
from stepserve.structured.bitmask import GrammarMatchers, GrammarPass
from stepserve.worker import sampler as S
from stepserve.worker.cuda_graphs import CudaGraphs
from stepserve.worker.pooling import PoolingRows
from stepserve.worker.speculative import DraftInputs, DraftModel, accept, next_ids, slots_of, verify_layout


def kv_cache_bytes_per_block(model: DecoderForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


def allocate_kv_cache(model: DecoderForCausalLM, num_blocks: int, block_size: int, dtype, device) -> list[torch.Tensor]:
    cfg = model.cfg
    shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]


@torch.inference_mode()
def profile_run(
    model: DecoderForCausalLM, backend: AttentionBackend, block_size: int, num_tokens: int, num_seqs: int, device
) -> None:
    """The largest pass the scheduler may send (``num_tokens`` prompt tokens over ``num_seqs``
    sequences, logits and sorting for every row) over a scratch KV cache, so that the caller can
    read peak activation memory before sizing the real cache."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    per_seq = max(1, num_tokens // num_seqs)
    blocks_per_seq = -(-per_seq // block_size)
    cache = allocate_kv_cache(model, num_seqs * blocks_per_seq + 1, block_size, model.embed_tokens.weight.dtype, device)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    tables = [[1 + s * blocks_per_seq + b for b in range(blocks_per_seq)] for s in range(num_seqs)]
    slots = [tables[s][p // block_size] * block_size + p % block_size for s in range(num_seqs) for p in range(per_seq)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        positions=torch.arange(per_seq, device=device).repeat(num_seqs),
        query_start_loc=i32([s * per_seq for s in range(num_seqs + 1)]),
        seq_lens=i32([per_seq] * num_seqs),
        block_tables=i32(tables),
        max_query_len=per_seq,
        max_seq_len=per_seq,
        block_size=block_size,
        is_decode=per_seq == 1,
        prefill_rows=None if per_seq == 1 else i32(list(range(num_seqs))),
    )
    backend.prepare(meta)
    hidden = model(
        torch.zeros(num_seqs * per_seq, dtype=torch.long, device=device), meta.positions, cache, meta, backend
    )
    logits = model.compute_logits(hidden[per_seq - 1 :: per_seq])
    logits.softmax(dim=-1).sort(dim=-1, descending=True)  # the sampler's largest temporaries (top-p)
    del cache


def _prompt_logprob_span(r) -> int:
    """How many of this chunk's positions predict a prompt token whose logprob the request wants."""
    if r.params.prompt_logprobs is None:
        return 0
    return max(0, min(r.start + r.num_new_tokens, r.num_prompt_tokens - 1) - r.start)


@dataclass
class PendingPass:
    """A submitted pass: its results on their way to the host."""

    sched: SchedulerOutput  # what was run
    # [B, N + 1] on the host: the sampled tokens, then the non-finite flag. A verify pass's has
    # the tokens by place (K + 1), the number of proposals accepted, then the flag; the draft
    # model's proposals come last but one.
    rows: torch.Tensor
    logprobs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per step (or place), on the host
    prompt_logprobs: dict[str, tuple[TokenLogprob, ...]]  # computed with their own sync
    done: torch.cuda.Event | None  # recorded after the copies to the host; None on the CPU
    verify: bool = False  # a verify pass (speculative decoding): rows hold the accepted count
    num_proposals: int = 0  # the draft model's proposals per row in ``rows``


@dataclass
class StepInputs:
    """Model inputs of one step, on the device."""

    input_ids: torch.Tensor  # [T]
    meta: AttentionMetadata  # positions, slots, lengths, block tables
    logits_index: torch.Tensor  # [B]: each request's last token in the packed batch
    query_start: list[int] | None = None  # on the host: where each request's tokens start in the batch


class ModelRunner:
    """Runs the model over the paged KV cache and samples; keeps no per-request state."""

    def __init__(
        self,
        model: DecoderForCausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        backend: AttentionBackend,
        eos_token_ids: Collection[int],
        device: torch.device,
        seed: int = 0,
        grammars: GrammarMatchers | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = device
        self.vocab_size = model.cfg.vocab_size
        self.shared_generator = torch.Generator().manual_seed(seed)  # on the host: keys unseeded rows' noise
        self.graphs: CudaGraphs | None = None  # set by capture_cuda_graphs
        self.grammars = grammars  # constrained decoding; None: every request is free text
        self.pooling = PoolingRows()  # folds of prefill-only pooling requests, chunk by chunk
        self.lora = None  # worker.lora_slots.LoraSlots when adapters are served
        self.draft: DraftModel | None = None  # speculative decoding's drafter (draft_model, eagle3)
        self._lora_steps: tuple = (None, None)  # this pass's slots: per token of the first step, per row after
        self._last_pass: tuple[SchedulerOutput, torch.Tensor] | None = (
            None  # the last submitted pass, its tokens [B, N]
        )

    # -- the pass ------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.pooling.drop(sched.finished_request_ids)
        if any(r.pooling is not None for r in sched.requests):
            return self.pooling.execute(self, sched)  # prefill-only pooling requests: worker/pooling.py
        return self.collect(self.submit(sched))

    @torch.inference_mode()
    def submit(self, sched: SchedulerOutput) -> PendingPass:
        """Start the pass; nothing waits for the device (except prompt logprobs and grammars).
        Pooling requests never come here: the core runs their passes through ``execute``."""
        grammar = self._grammar_pass(sched)
        requests = sched.requests
        verify = any(r.draft_token_ids for r in requests)
        # A verify pass of decoding rows only runs as a decode step of one row per token.
        flat = verify and all(r.num_new_tokens - len(r.draft_token_ids) == 1 for r in requests)
        inputs = self._prepare(sched, flat)
        self._lora_steps = (None, None)
        if self.lora is not None:
            self._lora_steps = self.lora.step_slots(sched, self.lora.rows(sched), self.device)
        batch = S.build_sampling_batch(
            requests, self.eos_token_ids, self.vocab_size, self.device, self.shared_generator
        )
        if verify:
            return self._verify(sched, inputs, batch, grammar, flat)
        eager = any(_prompt_logprob_span(r) for r in requests)  # prompt logprobs need the hidden states
        graph = self.graphs.load(inputs, self._lora_steps[1]) if self.graphs is not None and not eager else None
        prompt_logprobs: dict[str, tuple[TokenLogprob, ...]] = {}
        steps: list[torch.Tensor] = []
        logprobs: list[tuple] = []
        # The graphs sample a pass without logits processors or grammars: plain greedy rows take
        # the step graph's own tokens (nothing runs between replays), others a sampling graph.
        in_graph = (
            graph is not None
            and grammar is None
            and not S.has_logits_processors(batch)
            and (batch.all_greedy or graph.samples)
        )
        if in_graph and not batch.all_greedy:
            graph.load_sampling(batch)
        # A graph checks its own rows (``nonfinite_rows``); an eager pass here.
        nonfinite = torch.zeros(len(requests), dtype=torch.bool, device=self.device) if graph is None else None
        for step in range(sched.num_steps):
            logits, found = self._step_logits(sched, inputs, graph, step, steps[-1] if steps else None)
            prompt_logprobs |= found
            if nonfinite is not None:
                # A NaN or inf anywhere in a row makes its sum non-finite: one reduction, no sync.
                nonfinite |= ~torch.isfinite(logits.sum(dim=-1))
            if in_graph:
                tokens = graph.greedy() if batch.all_greedy else graph.sample()
            else:
                processed = S.apply_logits_processors(logits, batch)
                if grammar is not None:  # constrained rows only; the others pay nothing
                    processed = grammar.mask(processed, logits)
                tokens = S.sample(processed, batch)
                if grammar is not None and step + 1 < sched.num_steps:
                    grammar.accept(tokens, step)  # the next step's masks follow this step's tokens
                if graph is not None:
                    graph.feed(tokens)
                S.advance(batch, tokens)
            if batch.num_logprobs >= 0:
                logprobs.append(S.top_logprobs(logits, tokens, batch.num_logprobs))
            steps.append(tokens)
        if graph is not None:
            nonfinite = graph.nonfinite_rows()
        sampled = torch.stack(steps, dim=1)
        self._last_pass = (sched, sampled)  # the next pass's placeholders come from here
        columns = [sampled]
        if self.draft is not None:
            zero = torch.zeros(len(requests), dtype=torch.long, device=self.device)
            columns += self._draft_pass(sched, inputs, sampled[:, -1], zero, inputs.logits_index, sampled[:, 0])
        rows = torch.cat([*columns, nonfinite[:, None].long()], dim=1)
        host_rows, host_logprobs, done = self._to_host(rows, logprobs)
        proposals = sched.num_proposals if self.draft is not None else 0
        return PendingPass(sched, host_rows, host_logprobs, prompt_logprobs, done, num_proposals=proposals)

    def _verify(
        self, sched: SchedulerOutput, inputs: StepInputs, batch: S.SamplingBatch, grammar, flat: bool
    ) -> PendingPass:
        """A pass in which rows verify their proposals (``worker/speculative.py``): one forward
        (a decode graph's when ``flat`` and one fits), logits at each row's last token and after
        each proposal, every position sampled, the longest run of proposals equal to the sampled
        tokens accepted."""
        layout = verify_layout(sched, inputs.query_start, lambda lists: self._upload(lists, [])[0])
        graph = self.graphs.load(inputs, self._lora_steps[0]) if self.graphs is not None and flat else None
        prompt_logprobs = {}
        if graph is not None:
            logits = graph.replay()  # one row per token: the layout's logits index is the identity
        else:
            state = getattr(self.model, "lora_state", None)
            if state is not None:
                state.slots = self._lora_steps[0]
            hidden = self._hidden(inputs)
            if any(map(_prompt_logprob_span, sched.requests)):
                prompt_logprobs = self._prompt_logprobs(sched, hidden)
            logits = self.model.compute_logits(hidden[layout.logits_index])
        expanded = S.expand(batch, layout.row_of, layout.offset)
        processed = S.apply_logits_processors(logits, expanded)
        if grammar is not None:
            drafts = [r.draft_token_ids for r in sched.requests]
            processed = grammar.mask_drafts(processed, logits, drafts, layout.first)
        tokens = S.sample(processed, expanded)
        grid, accepted = accept(tokens, layout)
        bad = (~torch.isfinite(logits.sum(dim=-1))).long()
        nonfinite = torch.zeros(len(sched.requests), dtype=torch.long, device=self.device).index_add_(
            0, layout.row_of, bad
        )
        logprobs = []
        if batch.num_logprobs >= 0:
            chosen, ids, values = S.top_logprobs(logits, tokens, batch.num_logprobs)
            logprobs = [(chosen[at], ids[at], values[at]) for at in layout.grid_index.unbind(dim=1)]
        self._last_pass = (sched, grid)  # never read: a pass after a verify pass has no placeholders
        columns = [grid, accepted[:, None]]
        if self.draft is not None:
            newest = grid.gather(1, accepted[:, None]).squeeze(1)
            columns += self._draft_pass(sched, inputs, newest, accepted, layout.logits_index, tokens)
        rows = torch.cat([*columns, (nonfinite > 0)[:, None].long()], dim=1)
        host_rows, host_logprobs, done = self._to_host(rows, logprobs)
        proposals = sched.num_proposals if self.draft is not None else 0
        return PendingPass(sched, host_rows, host_logprobs, prompt_logprobs, done, True, proposals)

    def _draft_pass(
        self,
        sched: SchedulerOutput,
        inputs: StepInputs,
        newest: torch.Tensor,
        accepted: torch.Tensor,
        sample_index: torch.Tensor,
        sampled: torch.Tensor,
    ) -> list[torch.Tensor]:
        """The drafter's turn after a pass (a single step): its KV over the pass's tokens, every
        pass, so that it is whole when speculation resumes; then, when the scheduler asks, its
        proposals [B, num_proposals] from each row's newest token, which sits right after the
        row's accepted tokens. ``sampled`` are the tokens the pass sampled at ``sample_index``."""
        requests = sched.requests
        ends = [r.start + r.num_new_tokens - len(r.draft_token_ids) for r in requests]
        lasts = [q - 1 - len(r.draft_token_ids) for q, r in zip(inputs.query_start[1:], requests)]
        known = [
            (q - 1, r.token_ids[r.start + r.num_new_tokens])
            for q, r in zip(inputs.query_start[1:], requests)
            if not r.sample
        ]
        (positions, last, firsts, known_at, known_ids), _ = self._upload(
            [ends, lasts, inputs.query_start[:-1], [i for i, _ in known], [t for _, t in known]], []
        )
        tables = inputs.meta.block_tables
        if tables.shape[0] != len(ends):  # a flat verify pass: one table row per token
            tables = tables[firsts]
        after = None
        if self.draft.needs_next_ids:
            after = next_ids(inputs.input_ids, sample_index, sampled, (known_at, known_ids) if known else None)
        longest = max(e + len(r.draft_token_ids) for e, r in zip(ends, requests)) + 1
        drafts = DraftInputs(
            inputs.input_ids, inputs.meta, after, last + accepted, newest, positions + accepted, tables, longest
        )
        proposals = self.draft.after_pass(drafts, sched.num_proposals)
        return [] if proposals is None else [proposals]

    def _to_host(self, rows: torch.Tensor, logprobs: list) -> tuple[torch.Tensor, list, torch.cuda.Event | None]:
        """Non-blocking copies into pinned memory and an event behind them (on CUDA)."""
        if self.device.type != "cuda":
            return rows, logprobs, None

        def host(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return out.copy_(t, non_blocking=True)

        rows = host(rows)
        logprobs = [tuple(host(t) for t in step) for step in logprobs]
        done = torch.cuda.Event()
        done.record()
        return rows, logprobs, done

    def collect(self, pending: PendingPass) -> ModelRunnerOutput:
        """Wait for a submitted pass and return its results."""
        if pending.done is not None:
            pending.done.synchronize()  # this pass only: the next one may already be running
        output = self._output(pending.sched, pending.rows, pending.logprobs, pending.verify, pending.num_proposals)
        return (
            dataclasses.replace(output, prompt_logprobs=pending.prompt_logprobs) if pending.prompt_logprobs else output
        )

    def _grammar_pass(self, sched: SchedulerOutput) -> GrammarPass | None:
        """The pass's constrained rows, matchers synced; None when there are none."""
        if self.grammars is None:
            return None
        self.grammars.drop(sched.finished_request_ids)
        return self.grammars.start_pass(sched)

    def _step_logits(
        self, sched: SchedulerOutput, inputs: StepInputs, graph, step: int, last_tokens
    ) -> tuple[torch.Tensor, dict]:
        """One step's logits (the graph's, or an eager forward) and the prompt logprobs the first
        step's chunks give, for the requests that ask."""
        if graph is not None:
            return graph.replay(), {}  # the graph advances its own inputs for the next step
        if step > 0:
            self._advance(inputs, last_tokens)
        state = getattr(self.model, "lora_state", None)
        if state is not None:
            state.slots = self._lora_steps[0 if step == 0 else 1]
        if step == 0 and any(_prompt_logprob_span(r) for r in sched.requests):
            hidden = self._hidden(inputs)
            return self.model.compute_logits(hidden[inputs.logits_index]), self._prompt_logprobs(sched, hidden)
        return self._forward(inputs), {}

    def hidden_states(self, sched: SchedulerOutput) -> torch.Tensor:
        """The final hidden states of every token the pass computes, packed in request order
        (the base model's: pooling requests take no adapter)."""
        state = getattr(self.model, "lora_state", None)
        if state is not None:
            state.slots = None
        return self._hidden(self._prepare(sched))

    def _hidden(self, inputs: StepInputs) -> torch.Tensor:
        self.backend.prepare(inputs.meta)
        return self.model(inputs.input_ids, inputs.meta.positions, self.kv_caches, inputs.meta, self.backend)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        return self.model.compute_logits(self._hidden(inputs)[inputs.logits_index])

    def _prompt_logprobs(self, sched: SchedulerOutput, hidden: torch.Tensor) -> dict[str, tuple[TokenLogprob, ...]]:
        """Logprobs of the prompt tokens this pass's chunks predict (position p predicts token
        p + 1), for the requests that ask; one host sync, paid only by them."""
        out = {}
        offset = 0
        for r in sched.requests:
            span = _prompt_logprob_span(r)
            if span:
                k = r.params.prompt_logprobs
                logprobs = self.model.compute_logits(hidden[offset : offset + span]).float().log_softmax(dim=-1)
                targets = torch.tensor(r.token_ids[r.start + 1 : r.start + 1 + span], device=logprobs.device)
                chosen = logprobs.gather(1, targets[:, None])
                ranks = (logprobs > chosen).sum(dim=1) + 1
                values, ids = logprobs.topk(max(k, 1), dim=-1)
                rows = zip(
                    targets.tolist(),
                    chosen.squeeze(1).tolist(),
                    ranks.tolist(),
                    ids[:, :k].tolist(),
                    values[:, :k].tolist(),
                )
                out[r.request_id] = tuple(TokenLogprob(t, c, tuple(zip(i, v)), rank) for t, c, rank, i, v in rows)
            offset += r.num_new_tokens
        return out

    def idle(self) -> None:
        """The engine has had nothing to do for a while: start what may run in the background."""
        self.grammars.start_tokenizer()

    def reseed(self, seed: int) -> None:
        """Restart the shared generator of unseeded requests (after warm-up)."""
        self.shared_generator.manual_seed(seed)

    @torch.inference_mode()
    def capture_cuda_graphs(self, batch_sizes: list[int], max_model_len: int, max_steps: int) -> None:
        """Capture the decode step for each batch size (largest first, sharing one memory pool)."""
        self.graphs = CudaGraphs(self, batch_sizes, max_model_len + max_steps)

    # -- inputs --------------------------------------------------------------------------

    def _prepare(self, sched: SchedulerOutput, flat: bool = False) -> StepInputs:
        """Packed inputs of the pass's first step, built on the host and sent in one copy.

        ``flat``: a verify pass whose rows each compute one token of their own and their
        proposals, laid out as a decode step with one row per token (its own position, context
        length and a copy of its request's block table). Every decode path (the CPU kernels,
        the decode graphs) then runs it, and each position's logits are computed exactly as a
        decode step would compute them."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens = []
        for r in sched.requests:
            end = r.start + r.num_new_tokens
            input_ids.extend(r.token_ids[r.start : end - len(r.draft_token_ids)])
            input_ids.extend(r.draft_token_ids)
            positions.extend(range(r.start, end))
            blocks = r.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(r.start, end))
            query_start.append(len(input_ids))
            if flat:
                seq_lens.extend(range(r.start + 1, end + 1))
            else:
                seq_lens.append(end)
        # Wide enough for every position the pass may touch; padding is the null block 0.
        # Rounded up to 16 blocks: the kernels take the row stride as an argument, and Triton
        # specializes on its divisibility by 16, so one width class means one compiled variant.
        lookahead = sched.num_steps - 1 + sched.num_proposals
        width = -(-max(-(-(n + lookahead) // bs) for n in seq_lens) // 16) * 16
        tables: list[int] = []
        for r in sched.requests:
            row = list(r.block_ids[:width])
            tables.extend((row + [0] * (width - len(row))) * (r.num_new_tokens if flat else 1))
        q_lens = [1] * len(input_ids) if flat else [r.num_new_tokens for r in sched.requests]
        is_decode = all(n == 1 for n in q_lens)
        decode_rows = [] if is_decode else [i for i, n in enumerate(q_lens) if n == 1]
        prefill_rows = [] if is_decode else [i for i, n in enumerate(q_lens) if n > 1]
        logits_index = [q - 1 for q in query_start[1:]]
        holes, sources = self._placeholders(sched, query_start)
        longs, ints = self._upload(
            [input_ids, positions, slots, logits_index, holes, sources],
            [list(range(len(input_ids) + 1)) if flat else query_start, seq_lens, tables, decode_rows, prefill_rows],
        )
        ids, pos, slot, logits_idx, hole_idx, source_idx = longs
        if holes:  # on the device, after the previous pass's sampling (same stream)
            ids[hole_idx] = self._last_pass[1].flatten()[source_idx]
        qsl, lens, flat_tables, d_rows, p_rows = ints
        meta = AttentionMetadata(
            slot_mapping=slot,
            positions=pos,
            query_start_loc=qsl,
            seq_lens=lens,
            block_tables=flat_tables.view(len(seq_lens), width),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            block_size=bs,
            is_decode=is_decode,
            decode_rows=d_rows if decode_rows else None,
            prefill_rows=None if is_decode else p_rows,
        )
        return StepInputs(ids, meta, logits_idx, query_start)

    def _placeholders(self, sched: SchedulerOutput, query_start: list[int]) -> tuple[list[int], list[int]]:
        """Input positions holding a PLACEHOLDER, and where each one's token is in the last
        submitted pass's tokens [B, N] (flattened): the last token it sampled for the request."""
        holes = [
            i for i, r in enumerate(sched.requests) if r.num_new_tokens == 1 and r.token_ids[r.start] == PLACEHOLDER
        ]
        if not holes:
            return [], []
        if self._last_pass is None:
            raise RuntimeError("a placeholder input with no pass submitted before it")
        previous, sampled = self._last_pass
        rows = {s.request_id: (row, s.num_steps) for row, s in enumerate(previous.requests) if s.sample}
        sources = []
        for i in holes:
            found = rows.get(sched.requests[i].request_id)
            if found is None:
                raise RuntimeError(
                    f"request {sched.requests[i].request_id}: a placeholder input its last pass did not sample"
                )
            sources.append(found[0] * sampled.shape[1] + found[1] - 1)
        return [query_start[i] for i in holes], sources

    def _upload(self, longs: list[list[int]], ints: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Device tensors (int64, int32) of the given lists: one pinned non-blocking copy per dtype."""
        out = []
        for lists, dtype in ((longs, torch.long), (ints, torch.int32)):
            # Each list starts 16-byte aligned: Triton specializes kernels on pointer alignment,
            # so unaligned views would compile new variants mid-traffic (see engine/warmup.py).
            align = 16 // torch.empty((), dtype=dtype).element_size()
            padded = [xs + [0] * (-len(xs) % align) for xs in lists]
            flat = torch.tensor([x for xs in padded for x in xs], dtype=dtype)
            if self.device.type == "cuda":
                flat = flat.pin_memory().to(self.device, non_blocking=True)
            out.append([part[: len(xs)] for part, xs in zip(flat.split([len(xs) for xs in padded]), lists)])
        return out[0], out[1]

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
        meta.decode_rows = meta.prefill_rows = None
        meta.slot_mapping = slots_of(
            meta.block_tables, torch.arange(batch, device=self.device), meta.positions, self.block_size
        )
        inputs.logits_index = torch.arange(batch, device=self.device)

    # -- outputs -------------------------------------------------------------------------

    def _output(
        self, sched: SchedulerOutput, host_rows: torch.Tensor, logprobs, verify: bool = False, num_proposals: int = 0
    ) -> ModelRunnerOutput:
        rows = host_rows.tolist()
        end = -1 - num_proposals
        if verify:  # the tokens by place, then the accepted count: places 0..accepted are the output
            tokens = [row[: row[end - 1] + 1] for row in rows]
        else:
            tokens = [row[:end] for row in rows]
        errors = {
            r.request_id: "the model produced non-finite logits for this request"
            for r, row in zip(sched.requests, rows)
            if row[-1]
        }
        sampled = tuple(tuple(row) if r.sample else () for r, row in zip(sched.requests, tokens))
        proposals = ()
        if num_proposals:
            proposals = tuple(tuple(row[end:-1]) if r.sample else () for r, row in zip(sched.requests, rows))
        return ModelRunnerOutput(sampled, self._logprobs(sched, tokens, logprobs), errors, draft_token_ids=proposals)

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
            out.append(
                tuple(
                    TokenLogprob(tokens[row][step], chosen[row], tuple(zip(ids[row][:k], values[row][:k])))
                    for step, (chosen, ids, values) in enumerate(per_step[: len(tokens[row])])
                )
            )
        return tuple(out)
