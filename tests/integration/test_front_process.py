"""The HTTP front process holds neither PyTorch nor stepserve's model code (docs/architecture.md,
"Processes"): it validates, tokenizes and streams while the engine core, a process of its own,
holds the model. The import contracts check the modules' imports; this checks the running
process, after it has served a request, for the generation engine and for an encoder task."""

import json
import subprocess
import sys

import pytest
from live_server import free_port
from task_models import write_bert

# Runs `stepserve serve` in this process; once the server is ready it sends a request through
# the front, prints the heavy modules the process holds, and stops the server (SIGTERM).
SERVE_AND_REPORT = """
import json, os, signal, sys, threading, time, urllib.request
from stepserve.cli import main

port, path, body = int(sys.argv[1]), sys.argv[2], sys.argv[3]
HEAVY = ("torch", "triton", "stepserve.attention", "stepserve.executor", "stepserve.kernels", "stepserve.worker",
         "stepserve.models.decoder", "stepserve.models.loader", "stepserve.distributed.group")

def report():
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/v2/health/ready", timeout=1)
            break
        except Exception:
            time.sleep(0.2)
    request = urllib.request.Request(url + path, body.encode(), {"Content-Type": "application/json"})
    status = urllib.request.urlopen(request, timeout=120).status
    heavy = sorted(m for m in sys.modules if m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY)))
    print("FRONT " + json.dumps({"status": status, "heavy": heavy}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report, daemon=True).start()
sys.exit(main(["serve", "--http_port", str(port), "--disable-log-stats", *sys.argv[4:]]))
"""


def front_modules(path: str, body: dict, *serve_args: str) -> dict:
    command = [sys.executable, "-c", SERVE_AND_REPORT, str(free_port()), path, json.dumps(body), *serve_args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("FRONT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("FRONT "))


@pytest.mark.slow
def test_the_generation_front_holds_no_torch(tiny_llama):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    report = front_modules(
        "/v1/chat/completions", body, "--model", str(tiny_llama), "--max-model-len", "128", "--num-blocks", "32"
    )
    assert report == {"status": 200, "heavy": []}


@pytest.mark.slow
def test_an_encoder_task_front_holds_no_torch(tmp_path):
    model = write_bert(tmp_path / "cls", "seq", seed=2, num_labels=3)
    body = {"instances": ["a short text"]}
    report = front_modules("/v1/models/cls:predict", body, "--model", str(model), "--model_name", "cls")
    assert report == {"status": 200, "heavy": []}


LOAD_AND_REPORT = """
import json, sys
from pathlib import Path
from stepserve.checkpoint import tokenizer as T
from stepserve.checkpoint.source import ModelSource

def no_child(*args, **kwargs):
    raise AssertionError("a child process was started")

T.ProcessPoolExecutor = no_child
tok = T.load_tokenizer(ModelSource(Path(sys.argv[1]), None, "tiny"))
texts = json.loads(sys.argv[2])
print("LOADED " + json.dumps({"torch": "torch" in sys.modules, "ids": [tok.encode(t) for t in texts],
                              "eos": tok.eos_token_id, "template": tok.chat_template}))
"""


def test_a_generic_fast_tokenizer_loads_in_a_process_without_torch(tiny_llama, tmp_path):
    """A folder whose tokenizer is transformers' generic fast class (the embedded model's twin,
    the tiny models) loads in the torch-free front itself, with no child process, and tokenizes
    as AutoTokenizer's does. Another class still goes through the child."""
    from transformers import AutoTokenizer

    from stepserve.checkpoint import tokenizer as T
    from stepserve.checkpoint.source import ModelSource

    texts = ["Hello", "héllo wörld 日本 🙂", "  two  spaces\n\nend"]
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_REPORT, str(tiny_llama), json.dumps(texts)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("LOADED "))[7:])
    auto = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert got == {
        "torch": False,
        "ids": [auto.encode(t) for t in texts],
        "eos": auto.eos_token_id,
        "template": auto.chat_template,
    }

    other = tmp_path / "other"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((tiny_llama / name).read_bytes())
    config = json.loads((other / "tokenizer_config.json").read_text())
    assert T._generic_fast(ModelSource(other, None, "tiny"))
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    assert not T._generic_fast(ModelSource(other, None, "tiny"))
