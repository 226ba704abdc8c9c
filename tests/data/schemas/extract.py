"""How the schemas beside this file were made (kept for whoever refreshes them; not run by tests).

    python tests/data/schemas/extract.py KSERVE GAIE GATEWAY_API KUBERNETES_VALIDATE_DIR

KSERVE, GAIE, GATEWAY_API: clones of github.com/kserve/kserve,
kubernetes-sigs/gateway-api-inference-extension and kubernetes-sigs/gateway-api at the commits the
README names; each CRD gives the ``openAPIV3Schema`` of its storage version.
KUBERNETES_VALIDATE_DIR: the ``kubernetes-json-schema/v1.34.0-local-strict`` folder of the
``kubernetes-validate`` wheel on PyPI (its fork of yannh/instrumenta kubernetes-json-schema): the
strict schemas of the built-in kinds, with only the definitions they reach. ``description``
fields are dropped (they are most of the bytes and no part of validation); nothing else is changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
LLMISVC_CRDS = "config/crd/full/llmisvc/"
CRDS = {  # output: (checkout, CRD file in it)
    "kserve-clusterservingruntime.json": ("kserve", "config/crd/full/serving.kserve.io_clusterservingruntimes.yaml"),
    "kserve-inferenceservice.json": ("kserve", "config/crd/full/serving.kserve.io_inferenceservices.yaml"),
    "kserve-llminferenceservice.json": ("kserve", LLMISVC_CRDS + "serving.kserve.io_llminferenceservices.yaml"),
    "kserve-llminferenceserviceconfig.json": (
        "kserve",
        LLMISVC_CRDS + "serving.kserve.io_llminferenceserviceconfigs.yaml",
    ),
    "gaie-inferencepool.json": ("gaie", "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml"),
    "gateway-gateway.json": ("gateway_api", "config/crd/standard/gateway.networking.k8s.io_gateways.yaml"),
    "gateway-httproute.json": ("gateway_api", "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml"),
}
K8S = {
    "k8s-container.json": "container-v1.json",
    "k8s-objectmeta.json": "objectmeta-meta-v1.json",
    "k8s-volume.json": "volume-v1.json",
    "k8s-deployment.json": "deployment-apps-v1.json",
    "k8s-service.json": "service-v1.json",
    "k8s-configmap.json": "configmap-v1.json",
    "k8s-serviceaccount.json": "serviceaccount-v1.json",
    "k8s-role.json": "role-rbac-v1.json",
    "k8s-rolebinding.json": "rolebinding-rbac-v1.json",
}


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and "#/$defs/" in ref:
            found.add(ref.split("#/$defs/")[1])
        for v in node.values():
            refs(v, found)
    elif isinstance(node, list):
        for v in node:
            refs(v, found)


def crd_schema(path: Path) -> dict:
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return strip(version["schema"]["openAPIV3Schema"])


def k8s_schema(folder: Path, name: str) -> dict:
    schema = json.loads((folder / name).read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())["$defs"]
    needed, todo = set(), set()
    refs(schema, todo)
    while todo:
        key = todo.pop()
        if key not in needed:
            needed.add(key)
            refs(definitions[key], todo)
    schema = json.loads(json.dumps(schema).replace('"/api/_definitions.json#/$defs/', '"#/$defs/'))
    schema["$defs"] = json.loads(
        json.dumps({k: definitions[k] for k in sorted(needed)}).replace('"/api/_definitions.json#/$defs/', '"#/$defs/')
    )
    return strip(schema)


def main(checkouts: dict[str, Path], k8s: Path) -> None:
    for out, (checkout, crd) in CRDS.items():
        (HERE / out).write_text(
            json.dumps(crd_schema(checkouts[checkout] / crd), sort_keys=True, separators=(",", ":")) + "\n"
        )
    for out, name in K8S.items():
        (HERE / out).write_text(json.dumps(k8s_schema(k8s, name), sort_keys=True, indent=1) + "\n")


if __name__ == "__main__":
    kserve, gaie, gateway_api, k8s_dir = map(Path, sys.argv[1:5])
    main({"kserve": kserve, "gaie": gaie, "gateway_api": gateway_api}, k8s_dir)
