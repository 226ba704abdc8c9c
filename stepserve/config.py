"""Frozen configuration, grouped by concern and validated once; CLI flags come from the fields.

Facts learned at run time (the model's context length, the number of KV blocks) are return
values of the code that learns them, never mutations of these objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from stepserve.errors import InvalidRequestError

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "int4", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")
LOAD_FORMATS = ("auto", "dummy")
DEVICES = ("auto", "cpu", "cuda")
SPARE_CORE_CHOICES = ("auto", "on", "off")  # --spare-core (engine/supervisor.py)
PREFIX_CACHING_HASH_ALGOS = ("auto", "builtin", "sha256", "sha256_cbor")  # core/block_hash.py
KV_EVENT_PUBLISHERS = ("null", "zmq")
SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle3")  # docs/speculative-decoding.md
SPECULATIVE_DRAFTERS = ("draft_model", "eagle3")  # methods whose proposals a second model makes, in the worker
# vLLM's other methods: refused by name (they need weights formats stepserve does not read yet).
SPECULATIVE_REFUSED = ("eagle", "medusa", "mlp_speculator", "suffix", "mtp", "deepseek_mtp", "qwen3_next_mtp")


class ConfigError(InvalidRequestError):
    """A configuration value is invalid; the message says what to change."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = field(
        default=None,
        metadata={
            "help": (
                "model directory or .gguf file; default: /mnt/models when it exists "
                "(KServe), else the embedded SmolLM2-135M-Instruct"
            )
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": (
                "weights and activations: auto (on GPU the checkpoint's float16 or bfloat16, "
                "float32 as bfloat16; on CPU bfloat16 where the CPU has it natively, "
                "unless the checkpoint is float32), float32, bfloat16, float16"
            )
        },
    )
    quantization: str = field(
        default="auto",
        metadata={
            "help": (
                "weights: none, int4 (CPU, weight-only, groups of 32), fp8 (CUDA, Hopper or later: "
                "e4m3 weights with per-channel scales, quantized at load), or auto (int4 for a 4-bit GGUF on "
                "a CPU; fp8 for an FP8 checkpoint on an FP8 GPU, which elsewhere runs dequantized)"
            )
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    max_model_len: int | None = field(default=None, metadata={"help": "context length; default: the model's"})
    seed: int = field(default=0, metadata={"help": "seed of the engine's generator for unseeded requests"})
    enforce_eager: bool = field(default=False, metadata={"help": "no CUDA graphs or compiled paths"})
    load_format: str = field(
        default="auto",
        metadata={
            "help": (
                "auto (the checkpoint's files) or dummy (random weights "
                "of the right shapes, no weight files read; for benchmarks)"
            )
        },
    )
    compilation_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": (
                "where compiled GPU kernels are kept across restarts; default: "
                "~/.cache/stepserve/compile (or $XDG_CACHE_HOME/stepserve/compile)"
            )
        },
    )
    generation_config: str = field(
        default="auto",
        metadata={
            "help": (
                "sampling defaults for fields a request leaves out: auto (the model's generation_config.json), "
                "vllm (none), or a directory holding a generation_config.json"
            )
        },
    )

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        _require(
            self.quantization in QUANTIZATIONS,
            f"quantization={self.quantization!r}: choose one of {', '.join(QUANTIZATIONS)}",
        )
        _require(
            self.load_format in LOAD_FORMATS,
            f"load_format={self.load_format!r}: choose one of {', '.join(LOAD_FORMATS)}",
        )
        _require(self.device in DEVICES, f"device={self.device!r}: choose one of {', '.join(DEVICES)}")
        _require(
            self.max_model_len is None or self.max_model_len >= 2, f"max_model_len={self.max_model_len}: use at least 2"
        )


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's ``--kv-events-config``, its JSON keys and defaults (docs/kv-events.md)."""

    enable_kv_cache_events: bool = False  # record and publish KV-cache events
    publisher: str | None = None  # "zmq" or "null"; None: zmq when enabled
    endpoint: str = "tcp://*:5557"  # the PUB socket: bound with a wildcard host or ipc://, else connected
    replay_endpoint: str | None = None  # a ROUTER socket (bound) that resends buffered batches from a sequence number
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # the PUB socket's high-water mark
    max_queue_size: int = 100_000  # batches waiting for the publisher thread at most
    topic: str | None = None  # the first frame; None: kv@<pod ip>@<model>, as llm-d's indexer reads it

    @classmethod
    def parse(cls, text: str | None) -> KVEventsConfig:
        if not text:
            return cls()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"kv_events_config is not JSON ({exc}): give an object such as '{{\"enable_kv_cache_events\": true}}'"
            ) from None
        _require(isinstance(values, dict), "kv_events_config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        _require(not unknown, f"kv_events_config: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values)

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and (self.publisher or "zmq") == "zmq"

    def __post_init__(self) -> None:
        _require(
            isinstance(self.enable_kv_cache_events, bool),
            f"kv_events_config enable_kv_cache_events={self.enable_kv_cache_events!r}: use true or false",
        )
        _require(
            self.publisher is None or self.publisher in KV_EVENT_PUBLISHERS,
            f"kv_events_config publisher={self.publisher!r}: choose one of {', '.join(KV_EVENT_PUBLISHERS)}",
        )
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"kv_events_config {name}={value!r}: use an integer >= 1")
        _require(
            isinstance(self.endpoint, str) and "://" in self.endpoint,
            f"kv_events_config endpoint={self.endpoint!r}: use a ZMQ address such as tcp://*:5557",
        )
        _require(self.topic is None or isinstance(self.topic, str), f"kv_events_config topic={self.topic!r}: a string")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``--speculative-config``, its JSON keys and defaults (docs/speculative-decoding.md)."""

    method: str | None = None  # ngram, draft_model or eagle3; None: draft_model when a model is named
    num_speculative_tokens: int | None = None  # tokens proposed per step at most (required)
    model: str | None = None  # the draft model or EAGLE-3 head; "[ngram]" is vLLM's old spelling of ngram
    prompt_lookup_min: int | None = None  # ngram: the shortest suffix matched (default: prompt_lookup_max)
    prompt_lookup_max: int | None = None  # ngram: the longest suffix matched (default: prompt_lookup_min, else 5)
    disable_by_batch_size: int | None = None  # no proposals while more requests than this run (default 8)

    @classmethod
    def parse(cls, text: str | None) -> SpeculativeConfig | None:
        if not text:
            return None
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"speculative_config is not JSON ({exc}): give an object such as "
                '\'{"method": "ngram", "num_speculative_tokens": 4}\''
            ) from None
        _require(isinstance(values, dict), "speculative_config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        _require(
            not unknown, f"speculative_config: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
        return cls(**values).resolved()

    def resolved(self) -> SpeculativeConfig:
        """vLLM's defaults filled in: the method from the model, the n-gram bounds from each other."""
        method, model = self.method, self.model
        if method is None and model in ("[ngram]", "ngram"):
            method, model = "ngram", None
        elif method is None and model is not None:
            method = "draft_model"
        _require(method is not None, "speculative_config: give a method (ngram or draft_model), or a draft model")
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if method == "ngram":
            low, high = low or high or 5, high or low or 5
        batch = 8 if self.disable_by_batch_size is None else self.disable_by_batch_size
        return dataclasses.replace(
            self, method=method, model=model, prompt_lookup_min=low, prompt_lookup_max=high, disable_by_batch_size=batch
        )

    def __post_init__(self) -> None:
        m = self.method
        _require(
            m is None or m not in SPECULATIVE_REFUSED,
            f"speculative_config method={m!r} is not supported yet; use one of {', '.join(SPECULATIVE_METHODS)}",
        )
        _require(
            m is None or m in SPECULATIVE_METHODS,
            f"speculative_config method={m!r}: choose one of {', '.join(SPECULATIVE_METHODS)}",
        )
        k = self.num_speculative_tokens
        _require(
            isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 16,
            f"speculative_config num_speculative_tokens={k!r}: give an integer from 1 to 16",
        )
        for name in ("prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                f"speculative_config {name}={value!r}: use an integer >= 1",
            )
        if m == "ngram":
            _require(self.model is None, "speculative_config: method ngram takes no model")
            low, high = self.prompt_lookup_min, self.prompt_lookup_max
            _require(
                low is None or high is None or low <= high,
                f"speculative_config prompt_lookup_min={low} is above prompt_lookup_max={high}",
            )
        if m in SPECULATIVE_DRAFTERS:
            given = [n for n in ("prompt_lookup_min", "prompt_lookup_max") if getattr(self, n) is not None]
            _require(not given, f"speculative_config: {', '.join(given)} apply to method ngram, not {m}")
            what = "a directory or .gguf file" if m == "draft_model" else "the EAGLE-3 head's directory"
            _require(
                isinstance(self.model, str) and self.model != "",
                f"speculative_config: method {m} needs a model ({what})",
            )

    @property
    def drafter(self) -> bool:
        """Whether a second model proposes (in the worker, after each pass) rather than the scheduler."""
        return self.method in SPECULATIVE_DRAFTERS


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata={"help": "tokens per KV cache block"})
    num_blocks: int | None = field(default=None, metadata={"help": "KV cache blocks; default: sized from memory"})
    cpu_kv_cache_gib: float = field(default=2.0, metadata={"help": "KV cache size on CPU, GiB"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "share of GPU memory stepserve may use"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks of shared prompt prefixes"})
    kv_cache_dtype: str = field(
        default="auto",
        metadata={
            "help": (
                "auto (the activations' dtype; float32 on CPU) or fp8 (e4m3 pages "
                "with per-tensor scales, 1.0 unless set: half the bytes of bfloat16)"
            )
        },
    )
    prefix_caching_hash_algo: str = field(
        default="auto",
        metadata={
            "help": (
                "how prefix-cache blocks are hashed: builtin (Python's hash(), this process only), "
                "sha256 or sha256_cbor (vLLM's, seeded by PYTHONHASHSEED, so that an indexer can recompute "
                "them from the tokens); auto: sha256 when KV events are published, else builtin"
            )
        },
    )
    kv_events_config: str | None = field(
        default=None,
        metadata={
            "help": (
                "publish KV-cache events over ZMQ as vLLM does, a JSON object with vLLM's keys: "
                '\'{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557", "topic": "kv@POD_IP@MODEL"}\' '
                "(also publisher, replay_endpoint, buffer_steps, hwm, max_queue_size; docs/kv-events.md)"
            )
        },
    )

    @property
    def kv_events(self) -> KVEventsConfig:
        return KVEventsConfig.parse(self.kv_events_config)

    @property
    def hash_algo(self) -> str:
        """The block hash in use: ``auto`` resolved (vLLM's default, sha256, when events are published)."""
        if self.prefix_caching_hash_algo != "auto":
            return self.prefix_caching_hash_algo
        return "sha256" if self.kv_events.enabled else "builtin"

    def __post_init__(self) -> None:
        _require(
            self.prefix_caching_hash_algo in PREFIX_CACHING_HASH_ALGOS,
            f"prefix_caching_hash_algo={self.prefix_caching_hash_algo!r}: "
            f"choose one of {', '.join(PREFIX_CACHING_HASH_ALGOS)}",
        )
        try:
            events = self.kv_events
        except TypeError as exc:  # a value of the wrong kind, or a field given twice
            raise ConfigError(f"kv_events_config: {exc}") from None
        _require(
            not events.enabled or self.hash_algo != "builtin",
            "KV events need block hashes an indexer can recompute: use --prefix-caching-hash-algo sha256 "
            "or sha256_cbor (or auto)",
        )
        _require(
            not events.enabled or self.enable_prefix_caching,
            "KV events describe the prefix cache: drop --no-enable-prefix-caching, or the events",
        )
        _require(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
            f"block_size={self.block_size}: use a power of two up to 128",
        )
        _require(self.num_blocks is None or self.num_blocks >= 1, f"num_blocks={self.num_blocks}: use at least 1")
        _require(self.cpu_kv_cache_gib > 0, f"cpu_kv_cache_gib={self.cpu_kv_cache_gib}: must be positive")
        _require(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            f"kv_cache_dtype={self.kv_cache_dtype!r}: choose one of {', '.join(KV_CACHE_DTYPES)}",
        )
        _require(
            0 < self.gpu_memory_utilization <= 1,
            f"gpu_memory_utilization={self.gpu_memory_utilization}: use a value in (0, 1]",
        )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=256, metadata={"help": "requests computed together at most"})
    max_num_batched_tokens: int = field(
        default=4096, metadata={"help": "tokens per scheduler pass at most (prefill chunks)"}
    )
    long_prefill_token_threshold: int = field(
        default=0,
        metadata={
            "help": (
                "prompt tokens one request computes in a pass at most (0: --max-num-batched-tokens bounds it); "
                "a smaller chunk keeps running streams' inter-token time short while a long prompt prefills"
            )
        },
    )
    num_scheduler_steps: int = field(default=1, metadata={"help": "decode steps per scheduler pass (multi-step)"})
    adaptive_steps: bool = field(
        default=True, metadata={"help": "run single steps while requests wait, so their prefill is not held back"}
    )
    async_scheduling: bool = field(
        default=False,
        metadata={
            "help": (
                "schedule and prepare the next pass while the device runs the current one (tokens are the same; "
                "passes that need the last tokens on the host, for penalties or structured output, wait for them)"
            )
        },
    )

    speculative_config: str | None = field(
        default=None,
        metadata={
            "help": (
                "speculative decoding as vLLM spells it, a JSON object: "
                '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\' (prompt lookup) or '
                '\'{"method": "draft_model", "model": DIR, "num_speculative_tokens": 4}\' (a small model of the same '
                "tokenizer; method eagle3 with an EAGLE-3 head's DIR likewise); also prompt_lookup_min "
                "and disable_by_batch_size (docs/speculative-decoding.md)"
            )
        },
    )

    @property
    def speculative(self) -> SpeculativeConfig | None:
        return SpeculativeConfig.parse(self.speculative_config)

    def __post_init__(self) -> None:
        try:
            self.speculative  # noqa: B018 - validated once, here
        except TypeError as exc:  # a value of the wrong kind
            raise ConfigError(f"speculative_config: {exc}") from None
        _require(self.max_num_seqs >= 1, f"max_num_seqs={self.max_num_seqs}: use at least 1")
        _require(
            self.max_num_batched_tokens >= 1, f"max_num_batched_tokens={self.max_num_batched_tokens}: use at least 1"
        )
        _require(
            self.long_prefill_token_threshold >= 0,
            f"long_prefill_token_threshold={self.long_prefill_token_threshold}: use 0 (off) or a positive count",
        )
        _require(1 <= self.num_scheduler_steps <= 64, f"num_scheduler_steps={self.num_scheduler_steps}: use 1 to 64")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": (
                "ranks the model is split over by tensor parallelism within this host "
                "(one process per rank; one GPU each on CUDA, NCCL; gloo on CPU)"
            )
        },
    )

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, f"tensor_parallel_size={self.tensor_parallel_size}: use at least 1")


# vLLM's short spelling.
PARALLEL_ALIASES = {"tensor_parallel_size": "-tp"}


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the base model (vLLM's flags; docs/lora.md)."""

    enable_lora: bool = field(default=False, metadata={"help": "serve LoRA adapters on the base model"})
    max_loras: int = field(
        default=1, metadata={"help": "adapters resident on the device at once (one batch mixes them)"}
    )
    max_lora_rank: int = field(
        default=16, metadata={"help": "the largest adapter rank served (an adapter above it is refused)"}
    )
    max_cpu_loras: int | None = field(
        default=None, metadata={"help": "adapters kept in host memory for swapping in (default: max_loras)"}
    )

    def __post_init__(self) -> None:
        _require(self.max_loras >= 1, f"max_loras={self.max_loras}: use at least 1")
        _require(1 <= self.max_lora_rank <= 512, f"max_lora_rank={self.max_lora_rank}: use 1 to 512")
        _require(
            self.max_cpu_loras is None or self.max_cpu_loras >= self.max_loras,
            f"max_cpu_loras={self.max_cpu_loras} must be at least max_loras={self.max_loras}",
        )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Build from flat keyword arguments (``LLM(max_model_len=..., block_size=...)``)."""
        groups = {
            "model": ModelConfig,
            "cache": CacheConfig,
            "scheduler": SchedulerConfig,
            "parallel": ParallelConfig,
            "lora": LoraConfig,
        }
        parts = {}
        for name, group in groups.items():
            names = {f.name for f in dataclasses.fields(group)}
            parts[name] = group(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        _require(not kwargs, f"unknown engine options: {', '.join(sorted(kwargs))}")
        return cls(**parts)


ENGINE_GROUPS = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, LoraConfig)


class _StoreTuple(argparse.Action):
    """Store a flag's values as a tuple, so a frozen config holds no list."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, tuple(values))


def add_dataclass_args(parser: argparse.ArgumentParser, group_cls: type, aliases: dict[str, str] | None = None) -> None:
    """Add one flag per field, spelled with '-' and with '_' (and any KServe or vLLM alias)."""
    aliases = aliases or {}
    for f in dataclasses.fields(group_cls):
        names = {f"--{f.name.replace('_', '-')}", f"--{f.name}"}
        if f.name in aliases:
            names.add(aliases[f.name])
        help_ = f.metadata.get("help", "")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(
                *sorted(names), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_
            )
            continue
        if isinstance(default, tuple):  # one or more values after the flag: a tuple of strings
            parser.add_argument(*sorted(names), dest=f.name, nargs="+", action=_StoreTuple, default=default, help=help_)
            continue
        kind = {int: int, float: float}.get(type(default), str)
        if f.type in ("int | None",):
            kind = int
        if f.type in ("float | None",):
            kind = float
        parser.add_argument(*sorted(names), dest=f.name, type=kind, default=default, help=help_)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    values = vars(args)
    parts = []
    for group in ENGINE_GROUPS:
        parts.append(group(**{f.name: values[f.name] for f in dataclasses.fields(group) if f.name in values}))
    return EngineConfig(*parts)
