"""The server the fuzzer and the hardening tests share (starting a server is their largest cost)."""

from live_server import LiveServer, start_server

MODEL = "tiny"
HEADER_TIMEOUT, BODY_TIMEOUT, STALL_TIMEOUT = 1.0, 1.5, 1.5  # seconds, small so that the tests are quick


def start_hardened_server(model_dir, log_path) -> LiveServer:
    return start_server(
        [
            "--model", str(model_dir), "--model_name", MODEL, "--max-model-len", "512", "--num-blocks", "2048",
            "--num-scheduler-steps", "4", "--max-tokens-limit", "64", "--default-max-tokens", "16",
            "--header-timeout-s", str(HEADER_TIMEOUT), "--body-timeout-s", str(BODY_TIMEOUT),
            "--stream-stall-timeout-s", str(STALL_TIMEOUT),
        ],
        log_path,
    )
