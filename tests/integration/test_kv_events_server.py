"""KV-cache events and the endpoint picker's metrics from a live server (docs/kv-events.md).

An indexer's plain pyzmq SUB socket, bound on loopback as llm-d's is (the server connects to it),
sees ``BlockStored`` for a prompt's full blocks: three frames (topic ``kv@<pod ip>@<model>``, an
8-byte big-endian sequence number, msgpack), the prompt's token ids, and hashes computed here from
vLLM's sha256 formula under the server's PYTHONHASHSEED. The replay socket resends the batches from
sequence 0 (the first is ``AllBlocksCleared``). With ``--metrics-compat vllm`` the picker's gauges
are also under vLLM's names, with the same values."""

import hashlib
import json
import pickle
import re

import httpx
import msgpack
import pytest
import zmq
from live_server import read_metric, start_server

pytestmark = pytest.mark.slow
SEED = "7"
POD_IP = "10.1.2.3"
BLOCK = 16
PROMPT = [(i * 37) % 250 + 1 for i in range(2 * BLOCK + 8)]  # two full blocks and a partial one


def vllm_hashes(tokens: list[int]) -> list[int]:
    """vLLM's sha256 block hashes as it publishes them: SHA-256 of the pickled
    (parent or NONE_HASH, block tokens, extra keys), NONE_HASH = SHA-256 of the pickled seed;
    the digest's last 8 bytes, big-endian."""
    digest = lambda obj: hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()  # noqa: E731
    parent, out = digest(SEED), []
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        parent = digest((parent, tuple(tokens[start : start + BLOCK]), None))
        out.append(int.from_bytes(parent[-8:], "big"))
    return out


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    home = tmp_path_factory.mktemp("kv-events")
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://127.0.0.1:{port}",  # no wildcard: the server connects, as to llm-d's indexer
        "replay_endpoint": f"ipc://{home}/replay",
    }
    args = ["--model", str(tiny_llama), "--model_name", "tiny", "--max-model-len", "256", "--num-blocks", "64"]
    args += ["--block-size", str(BLOCK), "--kv-events-config", json.dumps(events), "--metrics-compat", "vllm"]
    args += ["--prefix-caching-hash-algo", "sha256"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONHASHSEED", SEED)
        env.setenv("POD_IP", POD_IP)
        server = start_server(args, home / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            wait_for_subscription(http, sub)
            yield server, http, sub, context, events
    finally:
        server.stop()
        sub.close(linger=0)
        context.term()


def wait_for_subscription(http, sub) -> None:
    """PUB/SUB drops what is sent before the subscription reaches the publisher (ZMQ's slow
    joiner): send one-block prompts until one's event arrives, then drain what came."""
    for attempt in range(100):
        prompt = [300, attempt % 250 + 1] * (BLOCK // 2) + [1]
        assert (
            http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1}).status_code == 200
        )
        if sub.poll(200):
            break
    else:
        raise AssertionError("no KV event reached the subscriber")
    while sub.poll(500):
        sub.recv_multipart()


def receive(sub, until, timeout_ms=30_000):
    """Messages (topic, seq, batch) until ``until(batch)`` holds for one."""
    got = []
    while sub.poll(timeout_ms):
        topic, seq, payload = sub.recv_multipart()
        got.append((topic.decode(), int.from_bytes(seq, "big"), msgpack.unpackb(payload)))
        if until(got[-1][2]):
            return got
    raise AssertionError(f"no matching batch in {timeout_ms} ms; got {got}")


def stored(batch) -> list[list]:
    return [e for e in batch[1] if e[0] == "BlockStored"]


def test_block_stored_for_a_prompts_full_blocks(setup):
    server, http, sub, _, _ = setup
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1})
    assert response.status_code == 200, response.text
    messages = receive(sub, lambda batch: any(e[3] == PROMPT[: 2 * BLOCK] for e in stored(batch)))
    topic, seq, batch = messages[-1]
    assert re.fullmatch(rf"kv@{re.escape(POD_IP)}@\S+", topic)
    ts, events, rank = batch
    assert isinstance(ts, float) and rank == 0
    event = next(e for e in stored(batch) if e[3] == PROMPT[: 2 * BLOCK])
    # [tag, block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]
    assert event == ["BlockStored", vllm_hashes(PROMPT), None, PROMPT[: 2 * BLOCK], BLOCK, None, "GPU", None]
    assert [s for _, s, _ in messages] == sorted(s for _, s, _ in messages)


def test_replay_resends_from_a_sequence_number(setup):
    _, http, sub, context, events = setup
    prompt = PROMPT[::-1]
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1}).status_code == 200
    receive(sub, lambda batch: any(e[3] == prompt[: 2 * BLOCK] for e in stored(batch)))
    dealer = context.socket(zmq.DEALER)
    dealer.connect(events["replay_endpoint"])
    try:
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while dealer.poll(10_000):
            _, seq, payload = dealer.recv_multipart()
            if seq == (-1).to_bytes(8, "big", signed=True):
                break
            replayed.append((int.from_bytes(seq, "big"), msgpack.unpackb(payload)))
        else:
            raise AssertionError("the replay did not end")
    finally:
        dealer.close(linger=0)
    assert [s for s, _ in replayed] == list(range(len(replayed)))
    assert replayed[0][1][1] == [["AllBlocksCleared"]]  # the core's first batch
    tokens = [e[3] for _, batch in replayed for e in stored(batch)]
    assert PROMPT[: 2 * BLOCK] in tokens and prompt[: 2 * BLOCK] in tokens


def test_picker_metrics_under_vllm_names(setup):
    _, http, _, _, _ = setup
    for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"):
        ours = read_metric(http, f"stepserve:{name}", model_name="tiny")
        assert read_metric(http, f"vllm:{name}", model_name="tiny") == ours
    text = http.get("/metrics").text
    for prefix in ("stepserve", "vllm"):
        assert f'{prefix}:cache_config_info{{block_size="{BLOCK}",num_gpu_blocks="64"}} 1.0' in text
