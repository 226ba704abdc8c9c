"""The scale-out manifests checked without a cluster: deploy/kserve/llminferenceservice.yaml and
its preset llminferenceserviceconfig.yaml (KServe's LLMInferenceService on llm-d) and
inferencepool.yaml (a plain Gateway API inference gateway). Every document validates against its
CRD or Kubernetes schema in tests/data/schemas (sources in its README), stepserve's arguments go
through stepserve's own parser, and the ports, paths and names that the model servers, the
endpoint picker's config, the pool and the route must share agree with each other."""

from __future__ import annotations

import argparse
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

from stepserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests/data/schemas"
SERVICE = "deploy/kserve/llminferenceservice.yaml"
PRESET = "deploy/kserve/llminferenceserviceconfig.yaml"
POOL = "deploy/kserve/inferencepool.yaml"
GUIDE = "docs/scale-out.md"

# (apiVersion, kind) -> schema file. The CRD schemas get unknown fields refused (strict below);
# the Kubernetes ones (kubernetes-validate's "strict" set) refuse them already.
KINDS = {
    ("serving.kserve.io/v1alpha2", "LLMInferenceService"): "kserve-llminferenceservice.json",
    ("serving.kserve.io/v1alpha2", "LLMInferenceServiceConfig"): "kserve-llminferenceserviceconfig.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): "gaie-inferencepool.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-gateway.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway-httproute.json",
    ("apps/v1", "Deployment"): "k8s-deployment.json",
    ("v1", "Service"): "k8s-service.json",
    ("v1", "ConfigMap"): "k8s-configmap.json",
    ("v1", "ServiceAccount"): "k8s-serviceaccount.json",
    ("rbac.authorization.k8s.io/v1", "Role"): "k8s-role.json",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "k8s-rolebinding.json",
}
CRD_SCHEMAS = {"kserve-", "gaie-", "gateway-"}

# The plugin types the endpoint picker these manifests name (ghcr.io/llm-d/llm-d-router-endpoint-picker
# v0.10.0, also KServe's scheduler preset) registers, of those a config here may use
# (cmd/epp/runner/runner.go and the plugins' READMEs at llm-d-router v0.10.0).
EPP_PLUGIN_TYPES = {
    "single-profile-handler",
    "token-producer",
    "endpoint-notification-source",
    "metrics-data-source",
    "core-metrics-extractor",
    "precise-prefix-cache-producer",
    "approx-prefix-cache-producer",
    "prefix-cache-scorer",
    "kv-cache-utilization-scorer",
    "queue-scorer",
    "no-hit-lru-scorer",
    "active-request-scorer",
    "max-score-picker",
}
KSERVE_WORKLOAD_PORT = 8000  # KServe's scheduler preset: the pool's targetPort and the workload Service
KV_EVENTS_PORT = 5557
# vLLM's spellings of the flags the manifests use that stepserve's `serve` took on for llm-d.
VLLM_FLAGS = ("--served-model-name", "--port", "--metrics-compat", "--kv-events-config", "--prefix-caching-hash-algo")


def documents(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def one(path: str, kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in documents(path) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


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


@functools.cache
def validator(name: str):
    loaded = json.loads((SCHEMAS / name).read_text())
    if name.startswith(tuple(CRD_SCHEMAS)):
        loaded = strict(loaded)
    return jsonschema.validators.validator_for(loaded)(loaded)


def validate(document: dict) -> None:
    validator(KINDS[document["apiVersion"], document["kind"]]).validate(document)
    validator("k8s-objectmeta.json").validate(document["metadata"])


# -- stepserve's arguments --------------------------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["serve"]


def missing_vllm_spellings() -> list[str]:
    actions = serve_parser()._actions
    known = {s for a in actions for s in a.option_strings}
    missing = [f for f in VLLM_FLAGS if f not in known]
    if not any(not a.option_strings and a.dest != "help" for a in actions):
        missing.append("the positional model (`serve /mnt/models`)")
    return missing


MISSING = missing_vllm_spellings()
needs_vllm_spellings = pytest.mark.xfail(
    bool(MISSING), reason=f"stepserve serve lacks vLLM's {', '.join(MISSING)}", strict=True
)


def parses(args: list[str]) -> bool:
    try:
        build_parser().parse_args(["serve", *args])
    except SystemExit:
        return False
    return True


def flags(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)


def main_container(preset: dict) -> dict:
    (container,) = [c for c in preset["spec"]["template"]["containers"] if c["name"] == "main"]
    return container


def rendered_args() -> list[str]:
    """The preset's command line as a pod of the service gets it: KServe's template variables
    filled in from the service, then Kubernetes' $(VAR) from the container's env."""
    container = main_container(one(PRESET, "LLMInferenceServiceConfig"))
    model_name = one(SERVICE, "LLMInferenceService")["spec"]["model"]["name"]
    text = json.dumps(container["command"] + container["args"]).replace("{{ .Spec.Model.Name }}", model_name)
    assert "{{" not in text, "a KServe template variable this test does not fill in"
    assert {e["name"] for e in container["env"]} >= set(re.findall(r"\$\((\w+)\)", text))
    return json.loads(text.replace("$(POD_IP)", "10.0.0.7"))


def pool_server() -> dict:
    deployment = one(POOL, "Deployment", one(POOL, "InferencePool")["metadata"]["name"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@needs_vllm_spellings
def test_stepserve_arguments_parse():
    command = rendered_args()
    assert command[:2] == ["stepserve", "serve"]
    assert parses(command[2:]), command
    assert parses(pool_server()["args"]), pool_server()["args"]


# -- schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SERVICE, PRESET, POOL])
def test_documents_against_their_schemas(path):
    for document in documents(path):
        validate(document)
    for document in documents(path):
        pod = document.get("spec", {}).get("template", {})
        for container in pod.get("spec", pod).get("containers", []):
            validator("k8s-container.json").validate(container)


def test_schemas_catch_mistakes():
    service, pool, route = one(SERVICE, "LLMInferenceService"), one(POOL, "InferencePool"), one(POOL, "HTTPRoute")
    for document, breaks in (
        (service, lambda d: d["spec"].__setitem__("replica", 3)),  # a typo
        (service, lambda d: d["spec"]["model"].__setitem__("url", "hf://x/y")),  # a typo
        (pool, lambda d: d["spec"].__setitem__("targetPorts", [{"number": 70000}])),  # no such port
        (pool, lambda d: d["spec"]["endpointPickerRef"].__setitem__("failureMode", "Open")),
        (route, lambda d: d["spec"]["rules"][0].__setitem__("backendRef", [])),  # a typo
    ):
        broken = copy.deepcopy(document)
        breaks(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate({**one(POOL, "Deployment", "stepserve-qwen2-7b"), "replicas": 3})  # outside spec


# -- the LLMInferenceService ----------------------------------------------------------------------


def test_service_uses_the_preset():
    service, preset = one(SERVICE, "LLMInferenceService"), one(PRESET, "LLMInferenceServiceConfig")
    assert service["spec"]["baseRefs"] == [{"name": preset["metadata"]["name"]}]
    assert service["spec"]["replicas"] == 3 and "template" not in service["spec"]
    assert service["spec"]["model"]["uri"].startswith("hf://")
    container = main_container(preset)
    assert container["image"] == "stepserve:0.1.0-cuda"  # the image the runtimes name
    assert container["args"][0] == "/mnt/models"  # where KServe's storage initializer puts the model


def test_preset_ports_probes_and_metrics():
    container = main_container(one(PRESET, "LLMInferenceServiceConfig"))
    args = flags(rendered_args())
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(args["--port"]) == ports["http"] == KSERVE_WORKLOAD_PORT
    assert args["--host"] == "0.0.0.0" and args["--metrics-compat"] == "vllm"
    assert args["--served-model-name"] == one(SERVICE, "LLMInferenceService")["spec"]["model"]["name"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": KSERVE_WORKLOAD_PORT, "scheme": "HTTP"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # a large model's download and load


def test_kv_events_reach_the_picker():
    """stepserve publishes where the EPP subscribes, on a topic it reads, in blocks it hashes alike."""
    container = main_container(one(PRESET, "LLMInferenceServiceConfig"))
    args = flags(rendered_args())
    events = json.loads(args["--kv-events-config"])
    assert events["enable_kv_cache_events"] is True and events["publisher"] == "zmq"
    assert events["endpoint"] == f"tcp://*:{KV_EVENTS_PORT}"  # bound on every interface of the pod
    assert {"name": "zmq", "containerPort": KV_EVENTS_PORT, "protocol": "TCP"} in container["ports"]
    producer = epp_plugin(llmisvc_epp_config(), "precise-prefix-cache-producer")["parameters"]
    assert producer["kvEventsConfig"]["discoverPods"] is True
    assert producer["kvEventsConfig"]["podDiscoveryConfig"]["socketPort"] == KV_EVENTS_PORT
    model_name = one(SERVICE, "LLMInferenceService")["spec"]["model"]["name"]
    assert events["topic"] == f"kv@10.0.0.7@{model_name}"  # kv@<pod>@<model>, as vLLM's
    assert events["topic"].startswith(producer["kvEventsConfig"]["topicFilter"])
    (pod_ip,) = [e for e in container["env"] if e["name"] == "POD_IP"]
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert int(args["--block-size"]) == producer["tokenProcessorConfig"]["blockSize"]
    assert args["--prefix-caching-hash-algo"] == "sha256_cbor"


# -- the endpoint picker's configs --------------------------------------------------------------------


def llmisvc_epp_config() -> dict:
    return one(SERVICE, "LLMInferenceService")["spec"]["router"]["scheduler"]["config"]["inline"]


def pool_epp_config() -> dict:
    (deployment,) = [d for d in documents(POOL) if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-epp")]
    path = flags(deployment["spec"]["template"]["spec"]["containers"][0]["args"])["--config-file"]
    (mount,) = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert mount["name"] == volume["name"] and path.startswith(mount["mountPath"] + "/")
    data = one(POOL, "ConfigMap", volume["configMap"]["name"])["data"]
    return yaml.safe_load(data[path.removeprefix(mount["mountPath"] + "/")])


def epp_plugin(config: dict, plugin_type: str) -> dict:
    (plugin,) = [p for p in config["plugins"] if p["type"] == plugin_type]
    return plugin


@pytest.mark.parametrize("config", [llmisvc_epp_config, pool_epp_config], ids=["llmisvc", "inferencepool"])
def test_epp_config_is_whole(config):
    """Every plugin a profile or data source names is declared, of a type the EPP has."""
    config = config()
    assert (config["apiVersion"], config["kind"]) == ("llm-d.ai/v1alpha1", "EndpointPickerConfig")
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    assert {p["type"] for p in config["plugins"]} <= EPP_PLUGIN_TYPES
    (profile,) = config["schedulingProfiles"]
    refs = [p["pluginRef"] for p in profile["plugins"]]
    for source in config.get("dataLayer", {}).get("sources", []):
        refs += [source["pluginRef"], *(e["pluginRef"] for e in source["extractors"])]
    for plugin in config["plugins"]:
        producer = plugin.get("parameters", {}).get("prefixMatchInfoProducerName")
        refs += [producer] if producer else []
    assert set(refs) <= declared and refs
    assert {"prefix-cache-scorer", "queue-scorer", "kv-cache-utilization-scorer", "max-score-picker"} <= set(refs)


def test_llmisvc_routes_on_precise_prefix_hits():
    config = llmisvc_epp_config()
    scorer = epp_plugin(config, "prefix-cache-scorer")
    assert scorer["parameters"]["prefixMatchInfoProducerName"] == "precise-prefix-cache-producer"
    assert epp_plugin(config, "token-producer")  # real tokens: the estimated ones would not match events
    (source,) = config["dataLayer"]["sources"]
    assert source == {
        "pluginRef": "endpoint-notification-source",
        "extractors": [{"pluginRef": "precise-prefix-cache-producer"}],
    }


# -- the plain Gateway API setup ---------------------------------------------------------------------


def test_pool_wiring():
    pool = one(POOL, "InferencePool")
    servers = one(POOL, "Deployment", pool["metadata"]["name"])
    labels = servers["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["llm-d.ai/engine-type"] == "vllm" and servers["spec"]["replicas"] == 3
    ports = {p["containerPort"] for p in pool_server()["ports"]}
    assert {p["number"] for p in pool["spec"]["targetPorts"]} == ports == {int(flags(pool_server()["args"])["--port"])}
    assert flags(pool_server()["args"])["--metrics-compat"] == "vllm"
    picker = pool["spec"]["endpointPickerRef"]
    service = one(POOL, "Service", picker["name"])
    (grpc,) = [p for p in service["spec"]["ports"] if p["port"] == picker["port"]["number"]]
    epp = one(POOL, "Deployment", picker["name"])
    assert service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    (container,) = epp["spec"]["template"]["spec"]["containers"]
    assert grpc["targetPort"] in {p["containerPort"] for p in container["ports"]}
    args = flags(container["args"])
    assert args["--pool-name"] == pool["metadata"]["name"] and int(args["--grpc-port"]) == grpc["targetPort"]
    assert container["readinessProbe"]["grpc"]["port"] == int(args["--grpc-health-port"])


def test_pool_rbac_and_route():
    epp = one(POOL, "Deployment", one(POOL, "InferencePool")["spec"]["endpointPickerRef"]["name"])
    account = epp["spec"]["template"]["spec"]["serviceAccountName"]
    assert one(POOL, "ServiceAccount", account)
    binding = one(POOL, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    rules = one(POOL, "Role", binding["roleRef"]["name"])["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted
    route = one(POOL, "HTTPRoute")
    (parent,) = route["spec"]["parentRefs"]
    assert parent["name"] == one(POOL, "Gateway")["metadata"]["name"]
    (rule,) = route["spec"]["rules"]
    pool = one(POOL, "InferencePool")["metadata"]["name"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool}]


# -- both: probes and metrics are routes of the app ------------------------------------------------------


def test_probes_and_metrics_are_routes_of_the_app():
    from stepserve.server.app import create_app
    from stepserve.server.config import ServerConfig

    info = types.SimpleNamespace(name="m", max_model_len=128)  # what create_app reads of FrontInfo
    paths = {route.path for route in create_app(lambda: None, None, info, ServerConfig(), 1).routes}
    assert "/metrics" in paths  # what the EPP's metrics source scrapes on the pool's target port
    for container in (main_container(one(PRESET, "LLMInferenceServiceConfig")), pool_server()):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] in paths


# -- the guide -------------------------------------------------------------------------------------


def guide_commands() -> list[list[str]]:
    text = (ROOT / GUIDE).read_text()
    lines = [
        line.strip()
        for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, re.S)
        for line in block.replace("\\\n", " ").splitlines()
    ]
    return [shlex.split(line, comments=True) for line in lines if line and not line.startswith("#")]


def test_guide_files_and_commands():
    text = (ROOT / GUIDE).read_text()
    files = set(re.findall(r"\b((?:deploy|tests|docs)/[\w/-]+\.[a-z]+)\b", text))  # not kubectl's deploy/NAME
    assert {SERVICE, PRESET, POOL} <= files
    assert all((ROOT / f).exists() for f in files), [f for f in files if not (ROOT / f).exists()]
    applied = [w[w.index("-f") + 1] for w in guide_commands() if w[:2] == ["kubectl", "apply"] and "-f" in w]
    assert {SERVICE, PRESET, POOL} <= set(applied)
    assert f"]({GUIDE})" in (ROOT / "README.md").read_text()


@needs_vllm_spellings
def test_guide_serve_commands_parse():
    commands = [w for w in guide_commands() if w[:2] == ["stepserve", "serve"]]
    assert commands
    for words in commands:
        assert parses(words[2:]), words
