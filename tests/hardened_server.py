"""The server the fuzzer and the hardening tests share (starting a server is their largest cost)."""

from dataclasses import dataclass

from live_server import LiveServer, free_port, start_server

MODEL = "tiny"
HEADER_TIMEOUT, BODY_TIMEOUT, STALL_TIMEOUT = 1.0, 1.5, 1.5  # seconds, small so that the tests are quick


@dataclass
class HardenedServer(LiveServer):
    grpc_target: str = ""  # HOST:PORT of its gRPC service


def start_hardened_server(model_dir, log_path) -> HardenedServer:
    grpc_port = free_port()
    live = start_server(
        [
            "--model",
            str(model_dir),
            "--model_name",
            MODEL,
            "--max-model-len",
            "512",
            "--num-blocks",
            "2048",
            "--num-scheduler-steps",
            "4",
            "--max-tokens-limit",
            "64",
            "--default-max-tokens",
            "16",
            "--header-timeout-s",
            str(HEADER_TIMEOUT),
            "--body-timeout-s",
            str(BODY_TIMEOUT),
            "--stream-stall-timeout-s",
            str(STALL_TIMEOUT),
            "--enable_grpc",
            "--grpc_port",
            str(grpc_port),
        ],
        log_path,
    )
    return HardenedServer(live.url, live.process, live.log_path, f"127.0.0.1:{grpc_port}")
