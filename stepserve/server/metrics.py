"""Prometheus metrics with vLLM's names under the ``stepserve:`` prefix (docs/architecture.md, invariant 5).

Per-request counters and histograms are fed by the async engine's ``FinishedRequest``s;
gauges of the engine's state are read from its stats snapshot at scrape time. The gauges the
Gateway API Inference Extension's endpoint picker reads (its model-server protocol; the table in
docs/kv-events.md) are also written under ``vllm:`` with ``--metrics-compat vllm``, so that a
picker set up for vLLM reads stepserve unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stepserve.core.engine_core import EngineStats
from stepserve.engine.async_engine import FinishedRequest

PREFIX = "stepserve:"
COMPAT_PREFIXES = {"none": (PREFIX,), "vllm": (PREFIX, "vllm:")}  # --metrics-compat: the picker's gauges' names
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so dashboards built for it read the same.
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0)
# fmt: on


class _EngineStateCollector(Collector):
    """Gauges and counters read from the engine's latest stats snapshot."""

    def __init__(
        self,
        model_name: str,
        stats: Callable[[], EngineStats],
        restarts: Callable[[], int],
        max_loras: int = 0,
        prefixes: tuple[str, ...] = (PREFIX,),
    ) -> None:
        self.model_name = model_name
        self.stats = stats
        self.restarts = restarts
        self.max_loras = max_loras  # 0: no adapters served, no lora_requests_info
        self.prefixes = prefixes  # the names the picker's gauges are written under

    def collect(self):
        s, now = self.stats(), time.time()
        for prefix in self.prefixes:
            yield from self._picker_gauges(prefix, s, now)
        yield self._family(CounterMetricFamily, "num_preemptions", "Preemptions by the scheduler.", s.num_preemptions)
        yield self._family(
            CounterMetricFamily,
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            s.prefix_cache_queries,
        )
        yield self._family(
            CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits
        )
        yield self._family(CounterMetricFamily, "engine_restarts", "Restarts of the engine core.", self.restarts())
        if s.speculative is not None:
            for prefix in self.prefixes:
                yield from self._speculative(prefix, s)

    def _speculative(self, prefix: str, s: EngineStats):
        """vLLM's speculative decoding counters (docs/speculative-decoding.md)."""
        spec = s.speculative
        yield self._family(
            CounterMetricFamily, "spec_decode_num_drafts", "Proposals verified.", spec.num_drafts, prefix
        )
        yield self._family(
            CounterMetricFamily,
            "spec_decode_num_draft_tokens",
            "Tokens proposed and verified.",
            spec.num_draft_tokens,
            prefix,
        )
        yield self._family(
            CounterMetricFamily,
            "spec_decode_num_accepted_tokens",
            "Proposed tokens accepted.",
            spec.num_accepted_tokens,
            prefix,
        )
        family = CounterMetricFamily(
            prefix + "spec_decode_num_accepted_tokens_per_pos",
            "Proposed tokens accepted, by their position in the proposal.",
            labels=["model_name", "position"],
        )
        for position, count in enumerate(spec.accepted_per_pos):
            family.add_metric([self.model_name, str(position)], count)
        yield family

    def _picker_gauges(self, prefix: str, s: EngineStats, now: float):
        """What the endpoint picker reads: queue, batch, KV usage, the cache's shape and LoRA."""
        yield self._family(
            GaugeMetricFamily, "num_requests_running", "Requests in the running batch.", s.num_running, prefix
        )
        yield self._family(
            GaugeMetricFamily, "num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting, prefix
        )
        yield self._family(
            GaugeMetricFamily, "kv_cache_usage_perc", "KV cache usage, 1 means 100 percent.", s.kv_cache_usage, prefix
        )
        if s.num_kv_blocks:  # known once the core is built
            yield self._cache_info(prefix, s)
        if self.max_loras:
            yield self._lora_info(prefix, s, now)

    @staticmethod
    def _cache_info(prefix: str, s: EngineStats):
        """vLLM's ``cache_config_info``: value 1, the KV cache's shape as labels (the picker's
        prefix scorer reads ``block_size`` and ``num_gpu_blocks``, the null block included)."""
        family = GaugeMetricFamily(
            prefix + "cache_config_info",
            "The KV cache's configuration, as labels.",
            labels=["block_size", "num_gpu_blocks"],
        )
        family.add_metric([str(s.block_size), str(s.num_kv_blocks)], 1.0)
        return family

    def _lora_info(self, prefix: str, s: EngineStats, now: float):
        """vLLM's ``lora_requests_info``, which the inference gateway's endpoint picker reads for
        LoRA affinity: the adapters of running and of waiting requests (comma-separated) and the
        slots, as labels; the value is the time of the snapshot, as vLLM sets it."""
        family = GaugeMetricFamily(
            prefix + "lora_requests_info",
            "Running and waiting LoRA adapters, and the adapters resident at once.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        family.add_metric([",".join(s.running_loras), ",".join(s.waiting_loras), str(self.max_loras)], now)
        return family

    def _family(self, kind, name: str, doc: str, value: float, prefix: str = PREFIX):
        family = kind(prefix + name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family


class ServerMetrics:
    """The server's registry; ``observe`` is the async engine's ``on_finish`` callback."""

    def __init__(
        self,
        model_name: str,
        stats: Callable[[], EngineStats],
        restarts: Callable[[], int] = lambda: 0,
        max_loras: int = 0,
        compat: str = "none",
    ) -> None:
        """``compat``: ``--metrics-compat``; ``vllm`` also writes the picker's gauges under ``vllm:``."""
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(model_name, stats, restarts, max_loras, COMPAT_PREFIXES[compat]))
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", labels, registry=r)
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.", labels + ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token.", labels, buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Time per output token after the first.",
            labels,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )

    def observe(self, done: FinishedRequest) -> None:
        name = self.model_name
        self.prompt_tokens.labels(name).inc(done.num_prompt_tokens)
        self.generation_tokens.labels(name).inc(done.num_generation_tokens)
        self.request_success.labels(name, done.finish_reason).inc()
        self.e2e.labels(name).observe(done.finish_time - done.arrival_time)
        if done.first_token_time is None:
            return
        self.ttft.labels(name).observe(done.first_token_time - done.arrival_time)
        if done.num_generation_tokens > 1:
            per_token = (done.finish_time - done.first_token_time) / (done.num_generation_tokens - 1)
            self.tpot.labels(name).observe(per_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)
