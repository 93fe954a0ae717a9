"""The Kubernetes manifests in deploy/k8s validate against the Kubernetes JSON schemas, offline.

``kubernetes-validate`` ships the schemas of each Kubernetes release, so no cluster and no
network is needed. The GPU overlay is rendered here (its one strategic-merge patch applied to
the base Deployment, containers merged by name as kustomize does) and the result validated too.
The ServiceMonitor is a CRD without a schema in that package: it is checked structurally. The
proxy's ConfigMap must hold docker/haproxy/haproxy.cfg byte for byte, so the tested proxy
config is the deployed one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
VERSION = "1.30.0"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    out: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        for doc in documents(K8S / "base" / name):
            if doc["kind"] != "Namespace":
                doc.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
            out.append(doc)
    return out


def by_kind(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name)


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for these manifests: dicts deep, named lists by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in patch):
        merged = [copy.deepcopy(i) for i in base]
        for item in patch:
            index = next((n for n, b in enumerate(merged) if b.get("name") == item["name"]), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = merge(merged[index], item)
        return merged
    return copy.deepcopy(patch)


def gpu_resources() -> list[dict[str, Any]]:
    overlay = yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    resources = base_resources()
    for entry in overlay["patches"]:
        patch = yaml.safe_load((K8S / "overlays" / "gpu" / entry["path"]).read_text())
        target = by_kind(resources, patch["kind"], patch["metadata"]["name"])
        resources[resources.index(target)] = merge(target, {k: v for k, v in patch.items() if k != "metadata"})
    return resources


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_every_resource_validates_against_the_kubernetes_schemas(variant: str) -> None:
    resources = base_resources() if variant == "base" else gpu_resources()
    assert {r["kind"] for r in resources} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "StatefulSet",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
    }
    for resource in resources:
        kubernetes_validate.validate(resource, VERSION, strict=True)


def server_container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = by_kind(resources, "Deployment", "tta-server")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def test_server_probes_resources_and_scrape_annotation() -> None:
    resources = base_resources()
    deployment = by_kind(resources, "Deployment", "tta-server")
    container = server_container(resources)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    env = {e["name"]: e for e in container["env"]}
    assert env["TTA_STORE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tta-redis", "key": "url"}
    pdb = by_kind(resources, "PodDisruptionBudget", "tta-server")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    hpa = by_kind(resources, "HorizontalPodAutoscaler", "tta-server")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "tta_queue_depth"
    proxy_env = {
        e["name"]: e.get("value")
        for e in by_kind(resources, "Deployment", "tta-proxy")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert int(proxy_env["TTA_DNS_SLOTS"]) >= hpa["spec"]["maxReplicas"]  # every replica gets a slot


def test_gpu_overlay_requests_one_gpu_on_the_cuda_image() -> None:
    container = server_container(gpu_resources())
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith(":cuda")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TTA_DEVICE"] == "cuda" and "TTA_STORE_URL" in env  # merged by name, nothing lost


def test_proxy_configmap_is_the_tested_haproxy_config() -> None:
    configmap = by_kind(base_resources(), "ConfigMap", "tta-proxy")
    assert configmap["data"]["haproxy.cfg"] == (REPO / "docker" / "haproxy" / "haproxy.cfg").read_text()


def test_servicemonitor_and_adapter_rule_structure() -> None:
    """CRD without a schema in kubernetes-validate: checked by structure (apiVersion, selector, endpoints)."""
    (monitor,) = documents(K8S / "monitoring" / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    service = by_kind(base_resources(), "Service", "tta-server")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in ports and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == "tta_queue_depth" and "tta_queue_depth" in rule["seriesQuery"]
