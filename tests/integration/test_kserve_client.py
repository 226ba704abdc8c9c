"""KServe's own Python clients (InferenceGRPCClient, InferenceRESTClient) against a live server.

The ``kserve`` package pins protobuf<7, which stepserve's generated gRPC stubs (protobuf 7) and
grpcio-tools exclude, so it cannot share stepserve's environment: this test runs the clients in
a separate one named by ``STEPSERVE_KSERVE_PYTHON`` (``python -m venv kv && kv/bin/pip install
kserve``) and is skipped without it.
"""

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from live_server import free_port, start_server

KSERVE_PYTHON = os.environ.get("STEPSERVE_KSERVE_PYTHON")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not KSERVE_PYTHON, reason="set STEPSERVE_KSERVE_PYTHON to a Python with the kserve package"),
]


def test_kserve_clients(tiny_llama, tmp_path):
    grpc_port = free_port()
    args = [
        "--model",
        str(tiny_llama),
        "--model_name",
        "tiny",
        "--max-model-len",
        "128",
        "--num-blocks",
        "64",
        "--enable_grpc",
        "--grpc_port",
        str(grpc_port),
    ]
    server = start_server(args, tmp_path / "server.log")
    try:
        script = Path(__file__).resolve().parents[1] / "kserve_client_check.py"
        run = subprocess.run(
            [KSERVE_PYTHON, str(script), f"127.0.0.1:{grpc_port}", server.url, "tiny"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        body = {"model": "tiny", "prompt": ["hello", "there"], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        expected = [
            c["text"] for c in httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"]
        ]
        assert result == {"ready": True, "grpc": expected, "rest": expected}
    finally:
        server.stop()
