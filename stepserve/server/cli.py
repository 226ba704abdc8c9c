"""``stepserve serve``: build the engine, then serve it over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable

from stepserve.config import ConfigError, add_dataclass_args, engine_config_from_args
from stepserve.server.config import ServerConfig

log = logging.getLogger("stepserve.server")


def add_serve_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = sub.add_parser("serve", help="serve the OpenAI and KServe protocols over HTTP")
    add_engine_args(parser)
    add_dataclass_args(parser, ServerConfig)
    parser.add_argument("--access-log", "--access_log", dest="access_log", action="store_true", help="log every HTTP request too")
    parser.set_defaults(func=main)
    return parser


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    values = vars(args)
    return ServerConfig(**{f.name: values[f.name] for f in dataclasses.fields(ServerConfig)})


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from stepserve.engine.builder import build_engine
    from stepserve.server.app import create_app

    try:
        server_config = server_config_from_args(args)
        core, tokenizer, info = build_engine(engine_config_from_args(args))
    except ConfigError as exc:
        print(f"stepserve serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(core, tokenizer, info, server_config)
    log.info("serving %s on http://%s:%d", server_config.model_name or info.name, server_config.host, server_config.http_port)
    uvicorn.run(app, host=server_config.host, port=server_config.http_port, access_log=args.access_log, log_level="info")
    return 0
