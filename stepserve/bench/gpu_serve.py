"""The GPU benchmark's server path and cold start (used by ``stepserve.bench.gpu``).

- ``write_vocab_tokenizer``: a word-level tokenizer that covers the model's whole vocabulary
  (every id decodes), and in which each word of ``bench serve``'s random prompts is one token,
  so ``--input-len 512`` sends 512 prompt tokens.
- ``serve_bench``: ``stepserve serve --load-format dummy`` in a child process, loaded by
  ``stepserve bench serve`` with 256 concurrent streams and with one, then the engine core is
  killed with SIGKILL and the time until ``/health`` answers 200 again is measured.
- ``cold_bench``: the offline 8B figure from a fresh process with an empty compilation cache
  (no warm-up other than the engine's own at startup).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("stepserve.bench")

SERVE_FLAGS = [
    "--max-model-len",
    "1024",
    "--max-num-seqs",
    "256",
    "--num-scheduler-steps",
    "8",
    "--max-num-batched-tokens",
    "8192",
]


def write_vocab_tokenizer(directory: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stepserve.bench.serve import WORDS

    # BOS and EOS sit at the model's ids (low ones too, as Gemma's 2 and 1); the words take the
    # lowest free ids, the rest of the vocabulary is reserved tokens.
    specials = {bos_id: "<|begin_of_text|>", eos_id: "<|end_of_text|>"}
    words = iter(["▁" + w for w in dict.fromkeys(WORDS)] + ["<unk>"])
    vocab = {specials.get(i) or next(words, None) or f"<|reserved_{i}|>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[bos_id], eos_token=specials[eos_id], unk_token="<unk>"
    )
    fast.save_pretrained(directory)


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status
    except Exception:  # refused, 503, timeout: not ready
        return 0


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if _health(port) == 200:
            return time.monotonic() - start
        time.sleep(0.1)
    raise TimeoutError(f"the server was not ready in {timeout:.0f}s")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and "resource_tracker" not in cmdline:
            out.append(int(entry.name))
    return out


def _bench_serve(port: int, out: Path, name: str, num: int, concurrency: int) -> dict:
    path = out / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "stepserve",
        "bench",
        "serve",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--num-prompts",
        str(num),
        "--max-concurrency",
        str(concurrency),
        "--input-len",
        "512",
        "--output-len",
        "256",
        "--ignore-eos",
        "--disable-tqdm",
        "--output-json",
        str(path),
    ]
    subprocess.run(cmd, check=True, timeout=600)
    return json.loads(path.read_text())


def serve_bench(model_dir: Path, out: Path, cache_dir: Path, flags: list[str] = (), port: int = 8391) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "stepserve",
        "serve",
        "--model",
        str(model_dir),
        "--load-format",
        "dummy",
        "--http-port",
        str(port),
        "--compilation-cache-dir",
        str(cache_dir),
        *SERVE_FLAGS,
        *flags,
    ]
    log_file = open(out / "serve_8b.log", "w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    results: dict = {"command": " ".join(cmd[1:])}
    try:
        results["startup_s"] = round(_wait_ready(port, proc, 600), 1)
        many = _bench_serve(port, out, "serve_256", 256, 256)
        one = _bench_serve(port, out, "serve_1", 4, 1)
        results["streams_256"] = {
            k: many[k]
            for k in (
                "completed",
                "failed",
                "duration_s",
                "total_input_tokens",
                "total_output_tokens",
                "output_throughput",
                "ttft_ms",
                "tpot_ms",
            )
        }
        results["streams_1"] = {k: one[k] for k in ("completed", "failed", "output_throughput", "ttft_ms", "tpot_ms")}
        results["restart_s"] = round(_restart(port, proc), 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
    return results


def _named(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


def _restart(port: int, proc: subprocess.Popen) -> float:
    """Seconds from SIGKILL of the engine core until ``/health`` answers 200 again (the spare
    core, when the server keeps one, is left alone: it is what takes over)."""
    children = _children(proc.pid)
    deadline = time.monotonic() + 60
    while not any(_named(pid, "stepserve-spare") for pid in children) and time.monotonic() < deadline:
        time.sleep(0.5)  # a crash long after start-up finds the spare ready; wait for it here
        children = _children(proc.pid)
    cores = [pid for pid in children if _named(pid, "stepserve-core")] or children
    if not cores:
        raise RuntimeError("no engine core process found under the server")
    start = time.monotonic()
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    while _health(port) == 200 and time.monotonic() - start < 10:
        time.sleep(0.02)
    while _health(port) != 200:
        if time.monotonic() - start > 300 or proc.poll() is not None:
            raise RuntimeError("the engine did not come back")
        time.sleep(0.05)
    return time.monotonic() - start


def cold_bench(out: Path, num_requests: int, flags: list[str] = ()) -> dict:
    """The offline 8B run in a fresh process with an empty compilation cache."""
    with tempfile.TemporaryDirectory() as cache:
        path = out / "cold_8b.json"
        cmd = [
            sys.executable,
            "-m",
            "stepserve.bench.gpu",
            "--cold",
            str(path),
            "--compilation-cache-dir",
            cache,
            "--out",
            str(out),
            "--num-requests",
            str(num_requests),
            *flags,
        ]
        start = time.monotonic()
        subprocess.run(cmd, check=True, timeout=600)
        result = json.loads(path.read_text())
        result["process_s"] = round(time.monotonic() - start, 1)
        return result
