"""Where the model comes from: huggingface_hub's real download code against a local fake hub
(revisions, tokenizer revision, gated, missing, cut-off downloads, offline cache), /mnt/models-style
directories and their completeness checks."""

import json
import os
import subprocess
import sys

import pytest
from fake_hub import FakeHub, FakeRepo, repo_from_dir

from stepserve.config import ConfigError
from stepserve.checkpoint.source import HubOptions, locate_model


@pytest.fixture(scope="module")
def repos(tiny_llama):
    files = repo_from_dir(tiny_llama)["main"]
    tokenizer_config = json.loads(files["tokenizer_config.json"])
    return {
        "org/tiny": FakeRepo(
            repo_from_dir(
                tiny_llama,
                v2={**files, "generation_config.json": b'{"eos_token_id": [256], "marker": "v2"}'},
                tok={**files, "tokenizer_config.json": json.dumps({**tokenizer_config, "marker": "tok"}).encode()},
            )
        ),
        "org/gated": FakeRepo({"main": files}, token="hf_secret"),
        "org/cut": FakeRepo({"main": files}, truncate={"model.safetensors"}),
    }


@pytest.fixture()
def hub(repos):
    with FakeHub(repos) as server:
        yield server


def options(hub, tmp_path, **kw) -> HubOptions:
    return HubOptions(endpoint=hub.url, cache_dir=str(tmp_path / "hub"), **kw)


def test_download_and_served_name(hub, tmp_path):
    located = locate_model(None, "org/tiny", options(hub, tmp_path))
    assert located.name == "org/tiny"
    files = {p.name for p in (tmp_path / "hub").rglob("*") if p.is_file() or p.is_symlink()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "GET /api/models/org/tiny/revision/main" in hub.requests
    assert json.loads(open(f"{located.path}/generation_config.json").read()).get("marker") is None


def test_revision_and_tokenizer_revision(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = locate_model(None, "org/tiny", options(hub, tmp_path, revision="v2")).path
    assert json.loads(open(f"{path}/generation_config.json").read())["marker"] == "v2"
    path = locate_model(None, "org/tiny", options(hub, tmp_path, revision="v2", tokenizer_revision="tok")).path
    assert json.loads(open(f"{path}/generation_config.json").read())["marker"] == "v2"  # weights' revision
    assert json.loads(open(f"{path}/tokenizer_config.json").read())["marker"] == "tok"  # tokenizer's


def test_gated_needs_the_token(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="gated.*HF_TOKEN"):
        locate_model(None, "org/gated", options(hub, tmp_path))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert locate_model(None, "org/gated", options(hub, tmp_path)).path is not None


@pytest.mark.parametrize(
    "model_id, revision, message",
    [
        ("org/missing", None, "was not found"),
        ("org/tiny", "nope", "no revision 'nope'"),
        ("org/cut", None, "failed|not complete"),
    ],
)
def test_download_errors(hub, tmp_path, monkeypatch, model_id, revision, message):
    import huggingface_hub.file_download

    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda s: None)  # its 1 s between resume attempts
    with pytest.raises(ConfigError, match=message):
        locate_model(None, model_id, options(hub, tmp_path, revision=revision))


def test_offline_uses_the_cache_and_refuses_a_partial_one(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    path = locate_model(None, "org/tiny", options(hub, tmp_path)).path
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    assert locate_model(None, "org/tiny", options(hub, tmp_path)).path == path
    assert len(hub.requests) == seen  # nothing asked of the hub
    for blob in (tmp_path / "hub").rglob("blobs/*"):
        if blob.stat().st_size > 100_000:  # the weights: as after an interrupted download
            blob.unlink()
    with pytest.raises(ConfigError, match="incomplete|not complete|no .safetensors"):
        locate_model(None, "org/tiny", options(hub, tmp_path))
    with pytest.raises(ConfigError, match="not complete in the local cache.*HF_HUB_OFFLINE"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        locate_model(None, "org/other", options(hub, tmp_path))


def test_local_directories(tiny_llama, tmp_path):
    assert locate_model(None, None, default_dir=str(tmp_path / "absent")).path is None  # the embedded model
    assert locate_model(None, None, default_dir=str(tiny_llama)).path == str(tiny_llama)  # /mnt/models
    assert locate_model(str(tiny_llama), None, default_dir="/nonexistent").path == str(tiny_llama)
    assert locate_model(None, str(tiny_llama)).name is None  # --model_id naming a local path: no hub
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "m.gguf").write_bytes(b"GGUF")
    assert locate_model(str(tmp_path / "gguf"), None).path == str(tmp_path / "gguf" / "m.gguf")
    half = tmp_path / "half"
    half.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (half / name).write_bytes((tiny_llama / name).read_bytes())
    (half / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(ConfigError, match="1 of 1 weight shards missing"):
        locate_model(str(half), None)
    with pytest.raises(ConfigError, match="no config.json"):
        locate_model(str(tmp_path), None)


@pytest.mark.slow
def test_serve_exits_2_on_a_gated_model(hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
    }
    run = subprocess.run(
        [sys.executable, "-m", "stepserve", "serve", "--model_id", "org/gated", "--http_port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "gated" in run.stderr and "Traceback" not in run.stderr
