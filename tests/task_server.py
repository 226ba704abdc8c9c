"""A task server (``--engine-in-process``) on uvicorn in a thread of the test process: the real
HTTP stack and routes, without paying a process start per model."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn
from live_server import free_port


@dataclass
class ThreadServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def serve_in_thread(model, *flags: str, name: str = "m", grpc_port: int | None = None) -> ThreadServer:
    """A task model's server; a text_generation model gets the LLM engine (in a thread too).
    ``grpc_port``: KServe v2 over gRPC on that port as well."""
    from stepserve.cli import build_parser
    from stepserve.config import engine_config_from_args
    from stepserve.server.app import create_app
    from stepserve.cli.serve import _engine, server_config_from_args
    from stepserve.tasks.config import TaskConfig
    from stepserve.tasks.setup import plan_task, serving

    args = build_parser().parse_args(
        ["serve", "--model", str(model), "--engine-in-process", "--model_name", name, *flags]
    )
    engine, server = engine_config_from_args(args), server_config_from_args(args)
    front = plan_task(engine, TaskConfig(**{f.name: vars(args)[f.name] for f in dataclasses.fields(TaskConfig)}))
    make_client, tokenizer, info = serving(front, engine, server) if front else _engine(engine, server)
    app = create_app(make_client, tokenizer, info, server, engine.scheduler.max_num_seqs, front)
    if grpc_port is not None:
        from stepserve.server.access import AccessConfig, GrpcConfig
        from stepserve.server.grpc_server import with_grpc

        app = with_grpc(app, "127.0.0.1", GrpcConfig(True, grpc_port), AccessConfig(), grace_s=1.0)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the task server did not start")
        time.sleep(0.02)
    return ThreadServer(f"http://127.0.0.1:{port}", uv, thread)


def post(server: ThreadServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)
