"""The server's own settings (the engine's live in ``stepserve.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stepserve.config import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 inside a container)"})
    http_port: int = field(default=8080, metadata={"help": "HTTP port"})
    model_name: str | None = field(default=None, metadata={"help": "name clients use for the model; default: the model's"})
    default_max_tokens: int | None = field(default=None, metadata={"help": "cap on max_tokens when a request leaves it out"})
    max_tokens_limit: int | None = field(default=None, metadata={"help": "largest max_tokens a request may ask for"})

    def __post_init__(self) -> None:
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port={self.http_port}: use 0 to 65535")
        for name in ("default_max_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: use at least 1, or leave it out")
