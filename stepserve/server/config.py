"""The server's own settings (the engine's live in ``stepserve.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stepserve.config import SPARE_CORE_CHOICES, ConfigError
from stepserve.structured.reasoning import PARSERS as REASONING_PARSERS
from stepserve.structured.tool_parsers import PARSERS

METRICS_COMPAT = ("none", "vllm")  # server/metrics.py COMPAT_PREFIXES

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 inside a container)"})
    http_port: int = field(default=8080, metadata={"help": "HTTP port"})
    model_name: str | None = field(
        default=None, metadata={"help": "name clients use for the model; default: the model's"}
    )
    model_aliases: tuple[str, ...] = field(
        default=(),
        metadata={"help": "more names clients may use for the model (responses carry --model_name)"},
    )
    default_max_tokens: int | None = field(
        default=None, metadata={"help": "cap on max_tokens when a request leaves it out"}
    )
    max_tokens_limit: int | None = field(default=None, metadata={"help": "largest max_tokens a request may ask for"})
    max_queue_len: int = field(
        default=1024, metadata={"help": "completions waiting beyond the running batch before new requests get 429"}
    )
    request_timeout_s: float | None = field(
        default=None, metadata={"help": "abort a request after this many seconds (504)"}
    )
    max_restarts: int = field(default=5, metadata={"help": "engine core restarts before liveness fails"})
    restart_backoff_s: float = field(
        default=1.0,
        metadata={"help": "wait before the second engine restart (the first is at once), doubled for each one after"},
    )
    shutdown_grace_s: float = field(
        default=30.0, metadata={"help": "on SIGTERM, how long in-flight requests may finish"}
    )
    spare_core: str = field(
        default="auto",
        metadata={
            "help": (
                "keep a spare engine core process waiting with the engine imported (and, "
                "on CUDA, its context made), so that a restart after a crash only "
                "builds the engine: auto (on when the engine runs on CUDA), on, off"
            )
        },
    )
    engine_in_process: bool = field(
        default=False, metadata={"help": "run the engine core in a thread of the server process (no restarts)"}
    )
    header_timeout_s: float = field(
        default=30.0,
        metadata={"help": "close a connection whose request headers are not complete after this many seconds (408)"},
    )
    body_timeout_s: float = field(
        default=60.0,
        metadata={"help": "answer 408 when a request body is not complete this many seconds after its headers"},
    )
    stream_stall_timeout_s: float = field(
        default=60.0,
        metadata={
            "help": "abort a response (and its engine request) when the client reads nothing for this many seconds"
        },
    )
    disable_playground: bool = field(default=False, metadata={"help": "do not serve the chat playground at GET /"})
    metrics_compat: str = field(
        default="none",
        metadata={
            "help": (
                "none, or vllm: also write the gauges the inference gateway's endpoint picker reads under vLLM's "
                "names (vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc, "
                "vllm:cache_config_info, vllm:lora_requests_info; docs/kv-events.md)"
            )
        },
    )
    log_stats_interval: float = field(
        default=10.0, metadata={"help": "seconds between stats lines (throughput, queue, KV cache)"}
    )
    disable_log_stats: bool = field(default=False, metadata={"help": "no periodic stats line"})
    uvicorn_log_level: str = field(
        default="info", metadata={"help": "level of uvicorn's own log lines: " + ", ".join(UVICORN_LOG_LEVELS)}
    )
    allow_unknown_fields: bool = field(
        default=False,
        metadata={
            "help": (
                "ignore request fields stepserve does not know (logged once per name), "
                "as vLLM does, instead of a 400 naming them"
            )
        },
    )
    tool_call_parser: str | None = field(
        default=None,
        metadata={"help": "parser of the model's own tool calls for tool_choice=auto: hermes, llama3_json or mistral"},
    )
    enable_auto_tool_choice: bool = field(
        default=False,
        metadata={"help": "let the model decide when to call tools (tool_choice=auto); needs --tool-call-parser"},
    )
    reasoning_parser: str | None = field(
        default=None,
        metadata={
            "help": (
                "split a reasoning model's thinking from its answer (reasoning_content, reasoning items, "
                "thinking blocks) and start output constraints after it: " + ", ".join(REASONING_PARSERS)
            )
        },
    )
    enable_lora_runtime_updates: bool = field(
        default=False,
        metadata={"help": "allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (guard them with --api-key)"},
    )
    structured_strict_default: bool = field(
        default=False,
        metadata={
            "help": (
                "treat an unstated additionalProperties as false in every JSON schema constraint, as in "
                "strict ones (tools and response_format strict=true always are); vLLM's xgrammar default"
            )
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port={self.http_port}: use 0 to 65535")
        if self.max_queue_len < 0 or self.max_restarts < 0:
            raise ConfigError("max_queue_len and max_restarts must be 0 or more")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ConfigError(f"request_timeout_s={self.request_timeout_s}: use a positive number, or leave it out")
        if self.restart_backoff_s < 0 or self.shutdown_grace_s < 0:
            raise ConfigError("restart_backoff_s and shutdown_grace_s must be 0 or more")
        for name in ("header_timeout_s", "body_timeout_s", "stream_stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)}: use a positive number of seconds")
        if self.log_stats_interval <= 0:
            raise ConfigError(f"log_stats_interval={self.log_stats_interval}: use a positive number of seconds")
        if not all(self.model_aliases):
            raise ConfigError("model_aliases: a served name may not be empty")
        if self.uvicorn_log_level not in UVICORN_LOG_LEVELS:
            raise ConfigError(f"uvicorn_log_level={self.uvicorn_log_level!r}: choose {', '.join(UVICORN_LOG_LEVELS)}")
        if self.metrics_compat not in METRICS_COMPAT:
            raise ConfigError(f"metrics_compat={self.metrics_compat!r}: choose {', '.join(METRICS_COMPAT)}")
        if self.spare_core not in SPARE_CORE_CHOICES:
            raise ConfigError(f"spare_core={self.spare_core!r}: choose {', '.join(SPARE_CORE_CHOICES)}")
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ConfigError(f"tool_call_parser={self.tool_call_parser!r}: choose {', '.join(PARSERS)}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ConfigError(f"reasoning_parser={self.reasoning_parser!r}: choose {', '.join(REASONING_PARSERS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError(f"--enable-auto-tool-choice needs --tool-call-parser ({', '.join(PARSERS)})")
        for name in ("default_max_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: use at least 1, or leave it out")
