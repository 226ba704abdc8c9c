"""``stepserve serve``: build the engine, then serve it over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable

from stepserve.cli.engine_args import located_engine_config
from stepserve.cli.vllm_flags import SERVER_ALIASES, add_vllm_args, resolve
from stepserve.config import ConfigError, add_dataclass_args
from stepserve.server.access import AccessConfig, GrpcConfig, access_config_from_args
from stepserve.server.config import ServerConfig
from stepserve.tasks.config import TaskConfig

log = logging.getLogger("stepserve.server")


def add_serve_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "serve",
        help="serve the OpenAI and KServe protocols over HTTP",
        epilog=(
            "vLLM's spelling of a flag stepserve has is accepted too (vllm serve MODEL --port ...); a vLLM flag "
            'stepserve does not implement is refused by name. docs/deployment.md, "vLLM\'s command line".'
        ),
    )
    add_engine_args(parser)
    add_dataclass_args(parser, ServerConfig, SERVER_ALIASES)
    add_dataclass_args(parser, TaskConfig)
    add_dataclass_args(parser, AccessConfig)
    add_dataclass_args(parser, GrpcConfig)
    _add_access_log_args(parser)
    parser.add_argument(
        "--lora-modules",
        "--lora_modules",
        dest="lora_modules",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help='LoRA adapters to serve (with --enable-lora): name=path or {"name": ..., "path": ...} each',
    )
    add_vllm_args(parser)
    parser.set_defaults(func=main)
    return parser


def _add_access_log_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--access-log", "--access_log", dest="access_log", action="store_true", help="log every HTTP request too"
    )
    parser.add_argument(
        "--disable-uvicorn-access-log",
        dest="access_log",
        action="store_false",
        help="vLLM's: no line per HTTP request (stepserve's default)",
    )
    parser.add_argument(
        "--disable-access-log-for-endpoints",
        dest="access_log_skip",
        default=None,
        metavar="PATHS",
        help="vLLM's: with --access-log, no line for requests to these paths (comma-separated, e.g. /health,/metrics)",
    )


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    values = vars(args)
    return ServerConfig(**{f.name: values[f.name] for f in dataclasses.fields(ServerConfig)})


def main(args: argparse.Namespace) -> int:
    from stepserve.server.access import secure_app
    from stepserve.server.app import create_app
    from stepserve.server.grpc_server import with_grpc
    from stepserve.tasks.setup import plan_task, serving

    try:
        args = resolve(args)
        server_config = server_config_from_args(args)
        access = access_config_from_args(args)
        grpc_config = GrpcConfig(args.enable_grpc, args.grpc_port)
        engine_config, hub_name = located_engine_config(args)
        if server_config.model_name is None and hub_name is not None:
            server_config = dataclasses.replace(server_config, model_name=hub_name)
        task_front = plan_task(
            engine_config, TaskConfig(**{f.name: vars(args)[f.name] for f in dataclasses.fields(TaskConfig)})
        )
        make_client, tokenizer, info = (
            serving(task_front, engine_config, server_config) if task_front else _engine(engine_config, server_config)
        )
        _check_reasoning_parser(server_config, tokenizer, task_front)
        loras = _lora_registry(args, engine_config, server_config.model_name or info.name)
    except ConfigError as exc:
        print(f"stepserve serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(
        make_client, tokenizer, info, server_config, engine_config.scheduler.max_num_seqs, task_front, loras
    )
    app = with_grpc(secure_app(app, access), server_config.host, grpc_config, access, server_config.shutdown_grace_s)
    scheme = "https" if access.tls else "http"
    log.info(
        "serving %s on %s://%s:%d%s",
        server_config.model_name or info.name,
        scheme,
        server_config.host,
        server_config.http_port,
        access.root_path,
    )
    return _serve_http(app, args, server_config, access)


def _serve_http(app, args: argparse.Namespace, server_config: ServerConfig, access: AccessConfig) -> int:
    """Run uvicorn until it stops: 0 after a graceful stop, 3 when it never started (as uvicorn.run)."""
    import uvicorn

    from stepserve.server.protocol import protocol_class
    from stepserve.server.tls import RefreshingServer

    config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.http_port,
        access_log=args.access_log,
        log_level=server_config.uvicorn_log_level,
        timeout_graceful_shutdown=server_config.shutdown_grace_s,
        http=protocol_class(server_config.header_timeout_s, server_config.stream_stall_timeout_s),
        root_path=access.root_path,
        ssl_keyfile=access.ssl_keyfile,
        ssl_certfile=access.ssl_certfile,
    )
    if args.access_log_skip:
        logging.getLogger("uvicorn.access").addFilter(_SkipPaths(args.access_log_skip))
    server = RefreshingServer(config) if access.enable_ssl_refresh else uvicorn.Server(config)
    # uvicorn stops gracefully on SIGTERM, then re-raises it to the handler found before it
    # started; with this one, a graceful stop ends the process with status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if not server.started:
        return 3
    log.info("server stopped")
    return 0


class _SkipPaths(logging.Filter):
    """--disable-access-log-for-endpoints: drops uvicorn's access lines for these paths."""

    def __init__(self, paths: str) -> None:
        super().__init__()
        self.paths = frozenset(p.strip() for p in paths.split(",") if p.strip())

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: args are (client, method, path with query, HTTP version, status).
        path = record.args[2] if isinstance(record.args, tuple) and len(record.args) > 2 else ""
        return str(path).split("?", 1)[0] not in self.paths


def _lora_registry(args: argparse.Namespace, engine_config, served_name: str):
    """The adapters to serve (``--lora-modules``), each checked now: a bad one stops the start."""
    from stepserve.errors import InvalidRequestError
    from stepserve.server.lora import LoraRegistry, parse_lora_modules

    modules = parse_lora_modules(args.lora_modules)
    if not engine_config.lora.enable_lora:
        if modules:
            raise ConfigError("--lora-modules needs --enable-lora")
        return None
    from stepserve.checkpoint.config import read_config
    from stepserve.checkpoint.lora import layer_shapes
    from stepserve.checkpoint.source import resolve_source
    from stepserve.models.registry import decoder_config

    _, hf_config = read_config(resolve_source(engine_config.model.model))
    cfg = decoder_config(hf_config, 1)
    lora = engine_config.lora
    registry = LoraRegistry(served_name, lora.max_lora_rank, lora.max_loras, layer_shapes(cfg))
    for name, path in modules:
        try:
            registry.add(name, path)
        except InvalidRequestError as exc:
            raise ConfigError(f"--lora-modules {name}={path}: {exc.message}") from None
    return registry


def _check_reasoning_parser(server_config: ServerConfig, tokenizer, task_front) -> None:
    """--reasoning-parser needs a generating model whose tokenizer has its markers as tokens."""
    from stepserve.structured.reasoning import PARSERS, marker_ids

    if server_config.reasoning_parser is None:
        return
    if task_front is not None:
        raise ConfigError("--reasoning-parser applies to text generation, not to encoder tasks")
    try:
        marker_ids(tokenizer, PARSERS[server_config.reasoning_parser])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _engine(engine_config, server_config: ServerConfig):
    """(make_client, tokenizer, info): the core in its own supervised process, or in a thread."""
    if server_config.engine_in_process:
        from stepserve.engine.builder import build_engine
        from stepserve.engine.core_client import ThreadCoreClient

        from stepserve.engine.front import FrontInfo, sampling_defaults

        core, tokenizer, built = build_engine(engine_config)
        defaults = sampling_defaults(engine_config)
        info = FrontInfo(built.name, built.max_model_len, core.worker.vocab_size, built.eos_token_ids, defaults)
        return (lambda: ThreadCoreClient(core)), tokenizer, info
    from stepserve.engine.core_process import core_factory, restart_factory
    from stepserve.engine.front import load_front
    from stepserve.engine.supervisor import RestartPolicy, SupervisedCoreClient

    tokenizer, info = load_front(engine_config)
    policy = RestartPolicy(server_config.max_restarts, server_config.restart_backoff_s)
    eos = info.eos_token_ids
    return (
        (
            lambda: SupervisedCoreClient(
                core_factory(engine_config, eos_token_ids=eos),
                policy,
                restart_factory=restart_factory(engine_config, eos),
                spare=server_config.spare_core,
            )
        ),
        tokenizer,
        info,
    )
