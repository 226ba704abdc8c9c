"""The worker's LoRA adapters: ``--max-loras`` slots on the device, adapters read from their
folders into host memory (``--max-cpu-loras`` of them, least recently used forgotten first) and
copied into a slot when a pass needs one that is not resident (the least recently used slot no
row of the pass uses gives way). The scheduler never puts more than ``max_loras`` adapters in a
pass, so a pass always finds its slots.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from stepserve.checkpoint.lora import read_adapter_config
from stepserve.core.outputs import LoraRef, SchedulerOutput
from stepserve.models.lora import adapted_layers, read_adapter_weights

log = logging.getLogger("stepserve")


class LoraSlots:
    def __init__(self, model, max_loras: int, max_rank: int, max_cpu_loras: int | None, shard=None) -> None:
        self.model = model
        self.shard = shard  # tensor parallelism: this rank's share of a pair (read_adapter_weights)
        self.layers = adapted_layers(model)
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_cpu = max_cpu_loras or max_loras
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self._host: OrderedDict[int, list] = OrderedDict()  # adapter id -> its tensors per layer
        self.loads = 0  # adapters copied into a slot (swaps included)

    def rows(self, sched: SchedulerOutput) -> list[int]:
        """The slot of each request of the pass (-1: the base model), adapters made resident."""
        wanted = {r.lora.id: r.lora for r in sched.requests if r.lora is not None}
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a pass holds {len(wanted)} adapters; the worker has {self.max_loras} slots")
        for lora_id, ref in wanted.items():
            if lora_id in self._slot_of:
                self._slot_of.move_to_end(lora_id)
            else:
                self._load(ref, self._free_slot(set(wanted)))
        return [self._slot_of[r.lora.id] if r.lora is not None else -1 for r in sched.requests]

    def _free_slot(self, needed: set[int]) -> int:
        used = set(self._slot_of.values())
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        victim = next(i for i in self._slot_of if i not in needed)  # least recently used, not in this pass
        return self._slot_of.pop(victim)

    def _load(self, ref: LoraRef, slot: int) -> None:
        weights = self._host.get(ref.id)
        if weights is None:
            config = read_adapter_config(ref.path, self.max_rank)
            weights = read_adapter_weights(config, self.layers, self.shard)
            self._host[ref.id] = weights
            while len(self._host) > self.max_cpu:
                self._host.popitem(last=False)
        self._host.move_to_end(ref.id)
        for per_layer, linears in zip(weights, self.layers):
            for target, linear in linears.items():
                linear.load(slot, per_layer.get(target) or [None] * len(linear.slices))
        self._slot_of[ref.id] = slot
        self.loads += 1
        log.info("lora: adapter %r in slot %d", ref.name, slot)

    def step_slots(self, sched: SchedulerOutput, rows: list[int], device: torch.device):
        """(first step's slot per computed token, later steps' slot per request), on the device;
        (None, None) when no row has an adapter."""
        if all(s < 0 for s in rows):
            return None, None
        per_row = torch.tensor(rows, dtype=torch.int32)
        counts = torch.tensor([r.num_new_tokens for r in sched.requests])
        first = per_row.repeat_interleave(counts)
        return first.to(device, non_blocking=True), per_row.to(device, non_blocking=True)
