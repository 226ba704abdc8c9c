"""LoRA over HTTP (docs/lora.md) with the openai client: adapters listed in /v1/models with the
base as their parent, picked by ``model`` on completions, chat and KServe v2, equal to peft's
merged model; an unknown model is a 404 naming the served ones; run-time load and unload (off
unless --enable-lora-runtime-updates; a bad path, a rank above --max-lora-rank and an adapter of
another base are 400s naming the field); ``lora_requests_info`` in /metrics."""

import httpx
import openai
import pytest
from live_server import read_metric, start_server
from lora_adapters import merged_greedy, write_adapter
from tiny_models import write_tiny_model

pytestmark = pytest.mark.slow
PROMPT = list(b"Hello there")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-server")
    base = write_tiny_model(root / "base", "llama", seed=3)
    other = write_tiny_model(root / "other", "llama", seed=3, hidden_size=32, num_attention_heads=2)
    adapters = {
        "a": write_adapter(base, root / "a", "attn-r8", seed=0),
        "b": write_adapter(base, root / "b", "all-r16-rslora", seed=1),
        "wide": write_adapter(base, root / "wide", "all-r16-rslora", seed=2),
        "foreign": write_adapter(other, root / "foreign", "attn-r8", seed=3),
    }
    args = ["--model", str(base), "--model_name", "base", "--max-model-len", "128", "--dtype", "float32"]
    args += ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--lora-modules", f"a={adapters['a']}"]
    args += ["--enable-lora-runtime-updates", "--num-scheduler-steps", "8"]
    server = start_server(args, root / "server.log")
    yield server, base, adapters
    server.stop()


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup[0].url + "/v1", api_key="unused", max_retries=0)


def test_adapters_are_listed_and_picked_by_model(setup, client):
    server, base, adapters = setup
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "a"} and cards["a"].parent == "base"
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(base).decode(merged_greedy(base, adapters["a"], [PROMPT], 12)[0])
    got = client.completions.create(
        model="a", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].text == want
    base_text = client.completions.create(model="base", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert base_text != want
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model in ("a", "base") and chat.usage.completion_tokens >= 1
    v2 = httpx.post(
        f"{server.url}/v2/models/a/infer",
        json={
            "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Hello there"]}],
            "parameters": {"max_tokens": 12, "temperature": 0, "ignore_eos": True},
        },
    )
    text = client.completions.create(
        model="a", prompt="Hello there", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert v2.status_code == 200 and v2.json()["outputs"][0]["data"] == [text.choices[0].text]


def test_an_unknown_model_is_a_404_naming_the_served_ones(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert "base" in err.value.message and "a" in err.value.message


def test_runtime_load_and_unload(setup, client):
    server, base, adapters = setup
    http = httpx.Client(base_url=server.url)
    loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "b2", "lora_path": str(adapters["a"])})
    assert loaded.status_code == 200
    assert "b2" in {m.id for m in client.models.list().data}
    assert client.completions.create(model="b2", prompt=PROMPT, max_tokens=4, temperature=0).usage.completion_tokens
    for body, param, words in [
        ({"lora_name": "x", "lora_path": "/no/such/folder"}, "lora_path", "adapter_config.json"),
        ({"lora_name": "x", "lora_path": str(adapters["wide"])}, "lora_path", "above --max-lora-rank"),
        ({"lora_name": "x", "lora_path": str(adapters["foreign"])}, "lora_path", "another base model"),
        ({"lora_name": "a", "lora_path": str(adapters["a"])}, "lora_name", "already loaded"),
    ]:
        refused = http.post("/v1/load_lora_adapter", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
        assert words in refused.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "b2"}).status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "b2"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="b2", prompt="hi", max_tokens=2)


def test_lora_requests_info_in_metrics(setup):
    server = setup[0]
    with httpx.Client(base_url=server.url) as http:
        text = http.get("/metrics").text
        assert 'stepserve:lora_requests_info{max_lora="2"' in text
        assert read_metric(http, "stepserve:num_requests_running", model_name="base") == 0
