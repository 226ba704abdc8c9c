"""CUDA graphs of the decode step, one per batch-size bucket, with the multi-step advance inside.

Each graph reads static input buffers (token ids, positions, slots, context lengths, block
tables), runs the model and the LM head, and then advances positions, context lengths and slots
by one token in place, so replaying it again is the next step of a multi-step pass. Inside the
graph too: the finite check of every row's logits (a flag per row, kept over the pass) and the
greedy token, written into the ids buffer as the next step's input, so a pass of plain greedy
rows replays the graph N times with nothing in between (``greedy``).

Sampling has graphs of its own, one per bucket and in the same memory pool, replayed right after
the step's graph: they read its logits and the pass's sampling parameters from static buffers
(temperature, top-k, top-p, min-p, greedy rows, noise keys and output indices), draw with the
sampler's own code (``sampler.sample``: the sort-free kernel ``triton_sampling.filtered_race``),
write the tokens over the greedy ones and advance the noise index.
Passes with logits processors (bias, penalties, min_tokens) or grammars sample eagerly from the
graph's logits and write their tokens over the greedy ones (``feed``).

Rows beyond the real batch (bucket padding) hold one token of context in the null block 0 and
never touch a real block; they sample greedily with neutral parameters.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from stepserve.attention.base import AttentionMetadata
from stepserve.worker import sampler as S

log = logging.getLogger("stepserve")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (padding wastes < 16 rows)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs + 16, 16))
    return sorted({min(b, max_num_seqs) for b in sizes})


def _span(sizes: list[int]) -> str:
    return f"{sizes[0]} to {sizes[-1]}" if len(sizes) > 1 else str(sizes[0])


class CudaGraphs:
    """Captured decode steps of ``runner``'s model, replayed for pure-decode passes."""

    def __init__(self, runner, batch_sizes: list[int], max_positions: int) -> None:
        self.runner = runner
        self.sizes = sorted(batch_sizes)
        self.block_size = runner.block_size
        self.width = -(-max_positions // self.block_size)
        self.max_positions = max_positions
        dev, n = runner.device, self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.zeros(n, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.nonfinite = torch.zeros(n, dtype=torch.bool, device=dev)  # per row, over the loaded pass
        self.argmax = torch.zeros(n, dtype=torch.long, device=dev)  # the last replay's greedy tokens
        # The sampling parameters of the loaded pass, padding rows neutral (``load_sampling``).
        self.vocab_size = runner.vocab_size
        self.temperature = torch.ones(n, device=dev)
        self.greedy_rows = torch.ones(n, dtype=torch.bool, device=dev)
        self.top_k = torch.full((n,), self.vocab_size, dtype=torch.long, device=dev)
        self.top_p = torch.ones(n, device=dev)
        self.min_p = torch.zeros(n, device=dev)
        self.noise_keys = torch.zeros(n, dtype=torch.long, device=dev)
        self.noise_index = torch.zeros(n, dtype=torch.long, device=dev)
        self.sampled = torch.zeros(n, dtype=torch.long, device=dev)  # the last sampling replay's tokens
        # LoRA: each row's adapter slot (-1: the base), read by the adapted projections in the graph
        self.lora_state = getattr(runner.model, "lora_state", None)
        self.lora_slots = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.sampling_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # The logits of every bucket are views of one buffer [largest bucket, vocab], made by the
        # first (largest) warm-up outside the graphs' pool: a tensor each graph kept as its own
        # output would hold sum(buckets) rows for good (17 GB at 1,024 sequences of a 128k vocabulary).
        self.logits_buffer: torch.Tensor | None = None
        self.logits: dict[int, torch.Tensor] = {}
        self.batch = self.size = 0  # the loaded pass: real rows, bucket
        self._capture()

    def _capture(self) -> None:
        log.info(
            "capturing CUDA graphs of the decode step for %d batch sizes (%s); this takes a while",
            len(self.sizes),
            _span(self.sizes),
        )
        start = time.monotonic()
        before = torch.cuda.memory_reserved(self.runner.device)
        pool = None
        for size in reversed(self.sizes):
            meta = self._meta(size)
            self._step(size, meta)  # compiles the kernels and settles allocations
            self._reset(0)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._step(size, meta)
            pool = graph.pool()
            self.graphs[size] = graph
        decode_s = time.monotonic() - start
        self._sample(self.sizes[-1])  # compiles the race kernel
        torch.cuda.synchronize()
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._sample(size)
            self.sampling_graphs[size] = graph
        self.noise_index.zero_()
        torch.cuda.synchronize()
        log.info(
            "captured %d CUDA graphs for decode batch sizes %s in %.1fs, and %d of sampling in %.1fs; "
            "%.2f GiB more reserved",
            len(self.sizes),
            self.sizes,
            decode_s,
            len(self.sampling_graphs),
            time.monotonic() - start - decode_s,
            (torch.cuda.memory_reserved(self.runner.device) - before) / 2**30,
        )

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size],
            positions=self.positions[:size],
            query_start_loc=self.query_start[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.tables[:size],
            max_query_len=1,
            max_seq_len=self.max_positions,  # a bound: the kernels read the real lengths
            block_size=self.block_size,
            is_decode=True,
        )

    def _step(self, size: int, meta: AttentionMetadata) -> torch.Tensor:
        r = self.runner
        r.backend.prepare(meta)
        if self.lora_state is not None:
            self.lora_state.slots = self.lora_slots[:size]
        hidden = r.model(self.input_ids[:size], meta.positions, r.kv_caches, meta, r.backend)
        if self.logits_buffer is None:  # the first warm-up, of the largest bucket, outside any graph
            logits = r.model.compute_logits(hidden)
            self.logits_buffer = torch.empty(self.sizes[-1], logits.shape[1], dtype=logits.dtype, device=logits.device)
        logits = r.model.compute_logits(hidden, out=self.logits_buffer[:size])
        # A NaN or inf anywhere in a row makes its sum non-finite: one reduction per step.
        self.nonfinite[:size] |= ~torch.isfinite(logits.sum(dim=-1))
        torch.argmax(logits, dim=-1, out=self.argmax[:size])
        self.input_ids[:size] = self.argmax[:size]  # the next step's input, unless ``feed`` overwrites it
        # Advance to the next step of a multi-step pass: its token sits right after this one.
        self.positions[:size] += 1
        self.seq_lens[:size] += 1
        pos = self.positions[:size]
        column = (pos // self.block_size).clamp_(max=self.width - 1)
        blocks = self.tables[:size].gather(1, column[:, None]).squeeze(1).long()
        self.slots[:size] = blocks * self.block_size + pos % self.block_size
        return logits

    def _sample(self, size: int) -> None:
        """Draw the step's tokens from its logits; they become the next step's inputs."""
        batch = S.SamplingBatch(
            temperature=self.temperature[:size],
            greedy=self.greedy_rows[:size],
            all_greedy=False,
            top_k=self.top_k[:size],
            top_p=self.top_p[:size],
            min_p=self.min_p[:size],
            noise_keys=self.noise_keys[:size],
            noise_index=self.noise_index[:size],
            num_logprobs=-1,
        )
        tokens = S.sample(self.logits[size], batch)
        self.sampled[:size] = tokens
        self.input_ids[:size] = tokens
        self.noise_index[:size] += 1

    def _reset(self, start: int) -> None:
        """Rows from ``start`` on become padding: one token of context in the null block."""
        self.positions[start:].zero_()
        self.slots[start:].zero_()
        self.seq_lens[start:].fill_(1)
        self.tables[start:].zero_()
        self.lora_slots[start:].fill_(-1)

    def load(self, inputs, lora_rows: torch.Tensor | None = None) -> CudaGraphs | None:
        """Copy a pure-decode pass's first-step inputs (and its rows' adapter slots) into the
        buffers; None if no graph fits."""
        meta = inputs.meta
        batch = meta.seq_lens.shape[0]
        if not meta.is_decode or batch > self.sizes[-1] or meta.block_tables.shape[1] > self.width:
            return None
        size = self.sizes[bisect.bisect_left(self.sizes, batch)]
        self.input_ids[:batch].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:batch].copy_(meta.positions, non_blocking=True)
        self.slots[:batch].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:batch].copy_(meta.seq_lens, non_blocking=True)
        self.tables[:batch, : meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)
        if lora_rows is not None:
            self.lora_slots[:batch].copy_(lora_rows, non_blocking=True)
        else:
            self.lora_slots[:batch].fill_(-1)
        if size > batch:
            self._reset(batch)
        self.nonfinite.zero_()
        self.batch, self.size = batch, size
        return self

    @property
    def samples(self) -> bool:
        """Sampling graphs were captured (a benchmark may drop them to time eager sampling)."""
        return bool(self.sampling_graphs)

    def load_sampling(self, batch: S.SamplingBatch) -> None:
        """Copy the loaded pass's sampling parameters (no logits processors) into the buffers."""
        n = self.batch
        self.temperature[:n].copy_(batch.temperature)
        self.greedy_rows[:n].copy_(batch.greedy)
        self._copy_or_fill(self.top_k, batch.top_k, self.vocab_size)
        self._copy_or_fill(self.top_p, batch.top_p, 1.0)
        self._copy_or_fill(self.min_p, batch.min_p, 0.0)
        self.noise_keys[:n].copy_(batch.noise_keys)
        self.noise_index[:n].copy_(batch.noise_index)
        if self.size > n:  # padding rows: greedy, neutral
            self.temperature[n:].fill_(1.0)
            self.greedy_rows[n:].fill_(True)

    def _copy_or_fill(self, buffer: torch.Tensor, values: torch.Tensor | None, neutral) -> None:
        if values is None:
            buffer.fill_(neutral)
        else:
            buffer[: self.batch].copy_(values)
            buffer[self.batch :].fill_(neutral)

    def replay(self) -> torch.Tensor:
        """Run one step of the loaded pass; logits of the real rows (valid until the next replay)."""
        self.graphs[self.size].replay()
        return self.logits[self.size][: self.batch]

    def greedy(self) -> torch.Tensor:
        """The greedy tokens of the last replay's real rows (a copy); the graph has already made
        them the next step's inputs."""
        return self.argmax[: self.batch].clone()

    def sample(self) -> torch.Tensor:
        """Run the loaded pass's sampling graph over the last replay's logits; its tokens (a
        copy), which are now the next step's inputs."""
        self.sampling_graphs[self.size].replay()
        return self.sampled[: self.batch].clone()

    def nonfinite_rows(self) -> torch.Tensor:
        """Per real row: did any step of the loaded pass produce a non-finite logit."""
        return self.nonfinite[: self.batch]

    def feed(self, tokens: torch.Tensor) -> None:
        """The sampled tokens are the next step's inputs (over the graph's greedy ones)."""
        self.input_ids[: self.batch].copy_(tokens)
