"""A stepserve server in a subprocess on a free loopback port, for the server tests."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path  # the server's stdout and stderr

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(args: list[str], log_path: Path, timeout: float = 180.0, entry: list[str] | None = None) -> LiveServer:
    """Start ``stepserve serve ARGS`` (or ``entry serve ARGS``) and wait until it reports ready."""
    port = free_port()
    entry = entry or [sys.executable, "-m", "stepserve"]
    command = [*entry, "serve", "--host", "127.0.0.1", "--http_port", str(port), *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/v2/health/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"the server did not become ready in {timeout}s:\n{server.log()}")


def read_metric(http: httpx.Client, name: str, **labels) -> float:
    """The value of the /metrics sample with exactly these labels (0 when absent)."""
    for line in http.get("/metrics").text.splitlines():
        match = re.fullmatch(r"(\S+?)(?:\{(.*)\})? (\S+)", line)
        if line.startswith("#") or not match or match[1] != name:
            continue
        if dict(re.findall(r'(\w+)="([^"]*)"', match[2] or "")) == labels:
            return float(match[3])
    return 0.0


def core_pid(server: LiveServer) -> int:
    """The engine core process: the server's child started by multiprocessing's spawn."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == server.process.pid and b"spawn_main" in cmdline:
            return int(stat.parent.name)
    raise RuntimeError("no engine core process found")


# -- tensor-parallel groups: their rank processes, and waiting for a restart ------------------


def rank_pids(parent: int) -> list[int]:
    """The tensor-parallel rank processes whose parent is ``parent`` (the engine core)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == parent and b"stepserve.executor.rank" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def ready(http: httpx.Client) -> bool:
    try:
        return http.get("/v2/health/ready").status_code == 200
    except httpx.HTTPError:
        return False


def restarted(server, http: httpx.Client, old_core: int) -> bool:
    """A new core is up and ready (readiness may still read true just after the old one died)."""
    try:
        return core_pid(server) != old_core and ready(http)
    except RuntimeError:  # between the old core's end and the new one's start
        return False
