"""``stepserve serve`` started with a KServe LLMInferenceService template's vLLM arguments: it
answers ``GET /health`` over HTTPS on ``--port``, serves both ``--served-model-name`` names, and
with ``--enable-ssl-refresh`` presents a rotated certificate to new connections."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import time

import httpx
import pytest
from live_server import LiveServer, free_port


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    folder = tmp_path_factory.mktemp("certs")
    for name in ("a", "b"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"]
            + ["-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt")],
            check=True,
            capture_output=True,
        )
    return folder


def served_pem(port: int) -> str:
    return ssl.get_server_certificate(("127.0.0.1", port), timeout=5)


@pytest.mark.slow
def test_kserve_template_arguments_serve(tiny_llama, certs, tmp_path):
    tls = tmp_path / "tls"  # /var/run/kserve/tls in the template
    tls.mkdir()
    shutil.copy(certs / "a.crt", tls / "tls.crt")
    shutil.copy(certs / "a.key", tls / "tls.key")
    port = free_port()
    # kserve/kserve config/llmisvcconfig/config-llm-template.yaml's `vllm serve` arguments, with
    # the tiny model for /mnt/models, and the test's host and cache size.
    args = [str(tiny_llama), "--served-model-name", "tiny", "publishers/ns/models/tiny", "--port", str(port)]
    args += ["--disable-uvicorn-access-log", "--enable-ssl-refresh"]
    args += ["--ssl-certfile", str(tls / "tls.crt"), "--ssl-keyfile", str(tls / "tls.key")]
    args += ["--host", "127.0.0.1", "--max-model-len", "128", "--num-blocks", "64"]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "stepserve", "serve", *args], stdout=log, stderr=log)
    server = LiveServer(f"https://127.0.0.1:{port}", process, log_path)
    try:
        with httpx.Client(base_url=server.url, verify=False, timeout=30) as http:
            deadline = time.monotonic() + 180
            while True:
                assert process.poll() is None and time.monotonic() < deadline, server.log()
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            assert [card["id"] for card in http.get("/v1/models").json()["data"]] == [
                "tiny",
                "publishers/ns/models/tiny",
            ]
            body = {"model": "publishers/ns/models/tiny", "prompt": "Hi", "max_tokens": 2}
            assert http.post("/v1/completions", json=body).status_code == 200
        assert served_pem(port) == (certs / "a.crt").read_text()
        shutil.copy(certs / "b.key", tls / "new.key")
        shutil.copy(certs / "b.crt", tls / "new.crt")
        (tls / "new.key").replace(tls / "tls.key")
        (tls / "new.crt").replace(tls / "tls.crt")
        deadline = time.monotonic() + 15
        while served_pem(port) != (certs / "b.crt").read_text():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.5)
        assert "reloaded the TLS certificate" in server.log()
    finally:
        server.stop()
    assert process.returncode == 0, server.log()
