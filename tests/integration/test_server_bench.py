"""``stepserve bench serve`` against a live server (tiny random Llama): it completes every
request and reports vLLM's metrics; its dataset is fixed by the seed."""

import json
import subprocess
import sys

import pytest
from live_server import start_server

from stepserve.bench.serve import random_requests


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    args = ["--model", str(tiny_llama), "--model_name", "tiny", "--max-model-len", "256", "--num-blocks", "128"]
    live = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    live.stop()


def bench(server, tmp_path, *args) -> dict:
    out = tmp_path / "result.json"
    command = [
        sys.executable,
        "-m",
        "stepserve",
        "bench",
        "serve",
        "--base-url",
        server.url,
        "--output-json",
        str(out),
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Serving Benchmark Result" in done.stdout and "Median TTFT (ms)" in done.stdout
    return json.loads(out.read_text())


def test_max_concurrency_run(server, tmp_path):
    result = bench(
        server,
        tmp_path,
        "--num-prompts",
        "12",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--ignore-eos",
        "--max-concurrency",
        "3",
    )
    assert result["completed"] == 12 and result["failed"] == 0 and result["model"] == "tiny"
    assert result["total_output_tokens"] == 12 * 8
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = result[key]
        assert 0 < stats["median"] <= stats["p99"] and stats["mean"] > 0
    assert result["output_throughput"] == pytest.approx(result["total_output_tokens"] / result["duration_s"])


def test_poisson_rate_run(server, tmp_path):
    result = bench(
        server,
        tmp_path,
        "--num-prompts",
        "6",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--ignore-eos",
        "--request-rate",
        "20",
    )
    assert result["completed"] == 6 and result["total_output_tokens"] == 24


def test_structured_json_rounds_compare_equal_work(server, tmp_path):
    out = tmp_path / "structured.json"
    command = [
        sys.executable,
        "-m",
        "stepserve",
        "bench",
        "serve",
        "--base-url",
        server.url,
        "--output-json",
        str(out),
        "--structured",
        "json",
        "--rounds",
        "2",
        "--num-prompts",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--max-concurrency",
        "4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    phases, summary = result["phases"], result["summary"]
    # A new-schema phase, then the rounds' free and constrained phases in alternating order.
    assert [(p["phase"], p["round"]) for p in phases] == [
        ("json_new_schemas", None),
        ("free", 0),
        ("json", 0),
        ("json", 1),
        ("free", 1),
    ]
    assert all(
        p["completed"] == 4 and p["total_output_tokens"] == 4 * 6 for p in phases
    )  # the same work: every answer to max_tokens
    ratios = summary["ratio_json_vs_free"]
    by_round = {(p["phase"], p["round"]): p["output_throughput"] for p in phases}
    assert ratios["each"] == [pytest.approx(by_round[("json", k)] / by_round[("free", k)]) for k in range(2)]
    assert ratios["min"] <= ratios["median"] <= ratios["max"] and summary["output_tokens_per_phase"] == {
        "free": [24],
        "json": [24],
    }


def test_dataset_is_fixed_by_the_seed():
    a, b = random_requests(5, 20, 10, 0.5, seed=1), random_requests(5, 20, 10, 0.5, seed=1)
    assert a == b and a != random_requests(5, 20, 10, 0.5, seed=2)
    assert all(10 <= r.prompt_len <= 30 and 5 <= r.output_len <= 15 for r in a)
