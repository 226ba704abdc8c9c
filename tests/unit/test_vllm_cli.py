"""vLLM's command line on ``stepserve serve``: vLLM's spellings parse into the same configs as
stepserve's own, the positional model, several served names, the no-ops, and every vLLM flag
stepserve does not implement refused by name with exit status 2 (the parser only, no server)."""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from stepserve.cli import build_parser
from stepserve.cli.serve import server_config_from_args
from stepserve.cli.vllm_flags import NO_OPS, REFUSED, resolve
from stepserve.config import ConfigError, engine_config_from_args
from stepserve.errors import ModelNotFoundError
from stepserve.server.access import access_config_from_args
from stepserve.server.config import ServerConfig
from stepserve.server.context import ServingContext

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    return resolve(build_parser().parse_args(["serve", *argv]))


def configs(argv: list[str]) -> tuple:
    args = parse(argv)
    model = (args.model, args.model_id, args.model_revision)
    return model, engine_config_from_args(args), server_config_from_args(args), access_config_from_args(args)


def refusal(argv: list[str], capsys) -> str:
    """The parser's error for ``serve ARGV``; it must exit with status 2."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", *argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_vllm_spellings_give_the_same_configs():
    vllm = (
        "/mnt/models --served-model-name m --port 8000 --host 0.0.0.0 --max-model-len 2048 "
        "--gpu-memory-utilization 0.9 --enable-prefix-caching -tp 1 --max-num-seqs 64 --max-num-batched-tokens 2048 "
        "--block-size 32 --dtype half --seed 3 -q fp8 --kv-cache-dtype fp8_e4m3 --enforce-eager --api-key k "
        "--allowed-origins https://a --root-path /llm --disable-log-stats --enable-auto-tool-choice "
        "--tool-call-parser hermes --reasoning-parser qwen3 --generation-config vllm --load-format safetensors "
        "--uvicorn-log-level warning --shutdown-timeout 5 --num-gpu-blocks-override 100 --revision v1 "
        "--enable-lora --max-loras 2 --max-lora-rank 8 --max-cpu-loras 4"
    )
    ours = (
        "--model /mnt/models --model_name m --http_port 8000 --host 0.0.0.0 --max_model_len 2048 "
        "--gpu_memory_utilization 0.9 --enable_prefix_caching --tensor_parallel_size 1 --max_num_seqs 64 "
        "--max_num_batched_tokens 2048 --block_size 32 --dtype float16 --seed 3 --quantization fp8 "
        "--kv_cache_dtype fp8 --enforce_eager --api_key k --allowed_origins https://a --root_path /llm "
        "--disable_log_stats --enable_auto_tool_choice --tool_call_parser hermes --reasoning_parser qwen3 "
        "--generation_config vllm --load_format auto --uvicorn_log_level warning --shutdown_grace_s 5 "
        "--num_blocks 100 --model_revision v1 --enable_lora --max_loras 2 --max_lora_rank 8 --max_cpu_loras 4"
    )
    assert configs(vllm.split()) == configs(ours.split())
    assert configs(vllm.split())[2].http_port == 8000


def test_kserve_llminferenceservice_template(tmp_path):
    # The container command of KServe's default LLMInferenceServiceConfig, kserve/kserve
    # config/llmisvcconfig/config-llm-template.yaml (commit aaac4e294dae), its `exec vllm serve`
    # line rendered for model "qwen" in namespace "ns" with TLS and tensor parallelism 2 (the
    # `vllm --version` probe finds no vLLM, so ACCESS_LOG_ARGS is --disable-uvicorn-access-log).
    # The TLS files live under /var/run/kserve/tls there; here under tmp_path, since they must exist.
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).write_text("-")
    template = (
        "/mnt/models --served-model-name qwen publishers/ns/models/qwen --port 8000 --disable-uvicorn-access-log "
        "--tensor-parallel-size 2 --enable-ssl-refresh --ssl-certfile /var/run/kserve/tls/tls.crt "
        "--ssl-keyfile /var/run/kserve/tls/tls.key"
    ).replace("/var/run/kserve/tls", str(tmp_path))
    ours = (
        f"--model /mnt/models --model_name qwen --model_aliases publishers/ns/models/qwen --http_port 8000 "
        f"--tensor_parallel_size 2 --enable_ssl_refresh --ssl_certfile {tmp_path}/tls.crt "
        f"--ssl_keyfile {tmp_path}/tls.key"
    )
    assert configs(template.split()) == configs(ours.split())
    assert parse(template.split()).access_log is False
    server = configs(template.split())[2]
    assert (server.model_name, server.model_aliases) == ("qwen", ("publishers/ns/models/qwen",))


def test_kserve_first_llminferenceservice_template():
    # kserve/kserve config/llmisvc/config-llm-template.yaml (commit bc3894bf5e62): `vllm serve
    # {{ .Spec.Model.Name }} --served-model-name {{ .Spec.Model.Name }} --port 8000`, the model a hub id.
    args = parse("facebook/opt-125m --served-model-name facebook/opt-125m --port 8000".split())
    assert (args.model, args.model_id, args.model_name, args.http_port) == (
        None,
        "facebook/opt-125m",
        "facebook/opt-125m",
        8000,
    )


def test_positional_model_against_model_flags(tmp_path):
    assert parse([str(tmp_path)]).model == str(tmp_path)
    assert parse([str(tmp_path), "--model", str(tmp_path)]).model == str(tmp_path)
    assert parse(["./missing/dir"]).model == "./missing/dir"  # a path, never a hub id
    for flag in ("--model", "--model_dir", "--model_id"):
        with pytest.raises(ConfigError, match=f"the positional MODEL.*and {flag.replace('_dir', '')}"):
            parse(["/mnt/models", flag, "/other"])


def test_positional_model_conflict_exits_2(capsys):
    from stepserve.cli import main

    assert main(["serve", "/mnt/models", "--model", "/other"]) == 2
    assert (
        "the model is given twice: '/mnt/models' (the positional MODEL) and --model '/other'" in capsys.readouterr().err
    )


def test_served_model_names():
    args = parse("--served-model-name a b a c".split())
    assert (args.model_name, args.model_aliases) == ("a", ("b", "c"))
    assert parse("--served-model-name a --model_name a".split()).model_name == "a"
    with pytest.raises(ConfigError, match="--served-model-name 'a' and --model_name 'b' disagree"):
        parse("--served-model-name a --model_name b".split())
    with pytest.raises(ConfigError, match="--model_aliases"):
        parse("--served-model-name a b --model_aliases c".split())


def test_every_name_of_the_model_is_served():
    ctx = ServingContext(None, None, "qwen", 128, 10, ServerConfig(model_aliases=("publishers/ns/models/qwen",)))
    assert ctx.adapter("qwen") is None and ctx.adapter("publishers/ns/models/qwen") is None
    with pytest.raises(ModelNotFoundError, match="Served models: qwen, publishers/ns/models/qwen"):
        ctx.check_model("other")


@pytest.mark.parametrize("flag", [name for names in REFUSED for name in names])
def test_unimplemented_vllm_flag_is_refused_by_name(flag, capsys):
    err = refusal([flag, "1"], capsys)
    assert f"error: {flag} is a vLLM flag stepserve does not implement: " in err
    assert refusal(["/mnt/models", flag], capsys).count("does not implement") == 1  # a switch, no value


def test_no_ops_are_accepted_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="stepserve.cli"):
        args = parse("--trust-remote-code --distributed-executor-backend mp --max-logprobs 20 /mnt/models".split())
    assert args.model == "/mnt/models"
    assert "--trust-remote-code changes nothing: stepserve runs its own implementation" in caplog.text
    assert "--distributed-executor-backend changes nothing" in caplog.text


def test_no_op_with_another_value_is_refused(capsys):
    err = refusal(["--distributed-executor-backend", "ray"], capsys)
    assert "--distributed-executor-backend ray is not supported: " in err
    assert "--max-logprobs 50 is not supported" in refusal(["--max-logprobs", "50"], capsys)


def test_access_log_lines_skipped_by_path():
    from stepserve.cli.serve import _SkipPaths

    skip = _SkipPaths("/health, /metrics")
    line = '%s - "%s %s HTTP/%s" %d'
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, line, ("c", "GET", "/health?x=1", "1.1", 200), None
    )
    assert not skip.filter(record)
    record.args = ("c", "POST", "/v1/completions", "1.1", 200)
    assert skip.filter(record)


def test_vllm_value_names():
    assert engine_config_from_args(parse(["--dtype", "float"])).model.dtype == "float32"
    assert parse(["--task", "embed"]).task == "text_embedding"
    assert parse(["--task", "auto"]).task is None


def test_deployment_guide_lists_every_vllm_flag():
    text = (ROOT / "docs/deployment.md").read_text()
    section = text.split("## vLLM's command line", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(--?[a-zA-Z][\w-]*)", section))
    flags = {name for names in REFUSED for name in names} | set(NO_OPS)
    assert flags <= listed, sorted(flags - listed)


@pytest.fixture(scope="module")
def two_certs(tmp_path_factory):
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


def served_certificate(context: ssl.SSLContext) -> bytes:
    """The certificate a TLS handshake with ``context`` presents, in memory, no socket."""
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname, client_context.verify_mode = False, ssl.CERT_NONE
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_context.wrap_bio(bios[0], bios[1])
    server = context.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(8):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    return client.getpeercert(binary_form=True)


def test_ssl_refresh_serves_the_new_certificate(two_certs, tmp_path):
    from stepserve.server.tls import CertRefresher

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(two_certs / "a.crt", cert)
    shutil.copy(two_certs / "a.key", key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    refresher = CertRefresher(context, str(cert), str(key))
    pem = ssl.DER_cert_to_PEM_cert
    assert not refresher.check() and pem(served_certificate(context)) == (two_certs / "a.crt").read_text()
    shutil.copy(two_certs / "b.crt", tmp_path / "new.crt")
    (tmp_path / "new.crt").replace(cert)  # the certificate first: the pair does not load yet
    assert not refresher.check() and pem(served_certificate(context)) == (two_certs / "a.crt").read_text()
    shutil.copy(two_certs / "b.key", tmp_path / "new.key")
    (tmp_path / "new.key").replace(key)
    assert refresher.check() and pem(served_certificate(context)) == (two_certs / "b.crt").read_text()
    assert not refresher.check()


def test_speculative_config_parses_as_vllm_spells_it():
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    _, engine, _, _ = configs(["/models/m", "--speculative-config", spec])
    assert engine.scheduler.speculative.method == "ngram"
    assert (engine.scheduler.speculative.prompt_lookup_min, engine.scheduler.speculative.prompt_lookup_max) == (3, 3)
    _, engine, _, _ = configs(["/models/m", "--speculative_config", '{"model": "/d", "num_speculative_tokens": 2}'])
    assert engine.scheduler.speculative.method == "draft_model"
    with pytest.raises(ConfigError, match="eagle3"):
        configs(["/models/m", "--speculative-config", '{"method": "eagle3", "num_speculative_tokens": 2}'])
