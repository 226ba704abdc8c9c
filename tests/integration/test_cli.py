"""The ``stepserve generate`` and ``stepserve bench throughput`` commands, run once each."""

import json
import subprocess
import sys

from stepserve import LLM, SamplingParams
from stepserve.bench.throughput import random_requests


def stepserve(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "stepserve", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_generate_prints_the_offline_greedy_text(tiny_llama):
    done = stepserve(
        "generate",
        "--model",
        str(tiny_llama),
        "--max-model-len",
        "128",
        "--num-blocks",
        "64",
        "--prompt",
        "Hello there",
        "--max-tokens",
        "8",
    )
    llm = LLM(model=str(tiny_llama), max_model_len=128, num_blocks=64)
    want = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert done.stdout == want.text + "\n"
    assert f"[{len(want.token_ids)} tokens, finish_reason={want.finish_reason}]" in done.stderr


def test_bench_throughput_runs_and_writes_json(tiny_llama, tmp_path):
    out = tmp_path / "tp.json"
    done = stepserve(
        "bench",
        "throughput",
        "--model",
        str(tiny_llama),
        "--max-model-len",
        "128",
        "--num-blocks",
        "64",
        "--num-prompts",
        "4",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--output-json",
        str(out),
    )
    result = json.loads(out.read_text())
    assert "Throughput:" in done.stdout
    assert result["requests"] == 4 and result["dtype"] == "float32" and result["elapsed_s"] > 0
    tokens = sum(n for _, n in random_requests(259, 4, 16, 8, 0.5, 0))  # ignore_eos: every request runs to its length
    # elapsed_s is rounded to milliseconds, which on a fast run of a few ms is a large share of it
    rounding = result["output_tok_s"] * 0.0005
    assert abs(result["output_tok_s"] * result["elapsed_s"] - tokens) <= 0.01 * tokens + rounding + 1
