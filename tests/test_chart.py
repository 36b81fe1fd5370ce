"""The Helm chart, rendered and linted by real Helm (helm-python-sdk bundles Helm v4's Go SDK),
and every rendered object validated against the Kubernetes 1.30 schemas in strict mode."""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
import yaml
from conftest import EXAMPLES, ROOT, crd_json_schemas, restricted_violations

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from infemu_operator.crds import all_crds  # noqa: E402
from infemu_operator.desired import port_name  # noqa: E402
from infemu_operator.kube import PLURALS  # noqa: E402

CHART = os.path.join(ROOT, "charts", "infemu")
NS = "infemu-system"
# kinds of the Prometheus operator: not in Kubernetes' own schemas, checked by shape below
MONITORING = {"PrometheusRule", "ServiceMonitor"}
VARIANTS = {
    "defaults": {},
    "one-namespace": {"watchNamespaces": ["lab"]},
    "two-namespaces-tc": {"watchNamespaces": ["lab", "bench"], "workers": {"shaping": "tc"}},
    "prometheus-operator": {"monitoring": {"prometheusOperator": "enabled", "labels": {"release": "kps"}}},
    "no-dashboard": {"monitoring": {"grafanaDashboard": {"enabled": False}}, "serviceAccount": {"create": False}},
}


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name="infemu", namespace=NS, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_chart_renders_and_every_object_validates_strictly(variant):
    docs = render(VARIANTS[variant])
    kinds = sorted(d["kind"] for d in docs)
    assert "Deployment" in kinds
    for doc in docs:
        if doc["kind"] in MONITORING:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]
            continue
        kubernetes_validate.validate(doc, "1.30", strict=True)
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "infemu" and labels["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_chart_lints_clean_with_helm(variant):
    report = helm.lint(CHART, VARIANTS[variant], strict=True, namespace=NS, kube_version="v1.30.0")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_rbac_is_namespaced_when_watching_namespaces_and_covers_what_the_operator_touches():
    docs = render(VARIANTS["two-namespaces-tc"])
    kinds = [d["kind"] for d in docs]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["bench", "lab"]
    granted = {res for rule in roles[0]["rules"] for res in rule["resources"]}
    assert set(PLURALS.values()) <= granted  # every resource the operator's client reads or writes
    assert not any("secrets" in rule["resources"] or "*" in rule["verbs"] for rule in roles[0]["rules"])
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert restricted_violations(deployment["spec"]["template"]["spec"]) == []  # Pod Security "restricted"
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["infemu", "operator"] and args.count("--namespace") == 2
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["INFEMU_SHAPING"] == "tc"
    cluster_wide = [d["kind"] for d in render({})]
    assert "ClusterRole" in cluster_wide and "Role" not in cluster_wide


def test_monitoring_toggles():
    assert not {d["kind"] for d in render({})} & MONITORING  # offline render: no monitoring.coreos.com API
    docs = render(VARIANTS["prometheus-operator"])
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    with open(os.path.join(ROOT, "dashboards", "prometheus", "infemu-rules.yaml"), encoding="utf-8") as fh:
        assert rule["spec"] == yaml.safe_load(fh)
    assert rule["metadata"]["labels"]["release"] == "kps"
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "infemu-operator"
    # every instance's port the operator names, dense pods' too, and nothing else
    (keep,) = monitor["spec"]["endpoints"][0]["relabelings"]
    assert keep["sourceLabels"] == ["__meta_kubernetes_endpoint_port_name"] and keep["action"] == "keep"
    assert all(re.fullmatch(keep["regex"], port_name(s)) for s in range(64))
    assert not re.fullmatch(keep["regex"], "grpc") and not re.fullmatch(keep["regex"], "http-metrics")
    dashboard = next(d for d in render({}) if d["kind"] == "ConfigMap")
    with open(os.path.join(ROOT, "dashboards", "grafana", "infemu-fleet.json"), encoding="utf-8") as fh:
        assert json.loads(dashboard["data"]["infemu-fleet.json"]) == json.load(fh)
    assert "ConfigMap" not in {d["kind"] for d in render(VARIANTS["no-dashboard"])}


def test_bad_values_are_rejected_by_the_schema_naming_the_field():
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError) as err:
        chart.render({"workers": {"shaping": "netem"}}, name="infemu", namespace=NS)
    assert "shaping" in str(err.value)
    with pytest.raises(helm.HelmError) as err:
        chart.render({"watchNamespaces": ["Not_A_Namespace"]}, name="infemu", namespace=NS)
    assert "watchNamespaces" in str(err.value)


def test_chart_ships_the_generated_crds_and_they_accept_every_example():
    chart = helm.Chart.load(CHART)
    shipped = {os.path.basename(c["name"]): yaml.safe_load(c["data"]) for c in chart.crds}
    assert shipped == all_crds()  # `infemu crds` regenerates them; this fails on drift
    for crd in shipped.values():
        kubernetes_validate.validate(crd, "1.30", strict=True)
    kinds = {c["spec"]["names"]["kind"] for c in shipped.values()}
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))):
        with open(path, encoding="utf-8") as fh:
            for doc in yaml.safe_load_all(fh):
                if doc:
                    assert doc["apiVersion"] == "infemu.io/v1alpha1" and doc["kind"] in kinds, path


def test_chart_files_are_copies_of_the_dashboards():
    for name, source in (
        ("infemu-rules.yaml", os.path.join("dashboards", "prometheus", "infemu-rules.yaml")),
        ("infemu-fleet.json", os.path.join("dashboards", "grafana", "infemu-fleet.json")),
    ):
        with open(os.path.join(CHART, "files", name), "rb") as a, open(os.path.join(ROOT, source), "rb") as b:
            assert a.read() == b.read(), f"charts/infemu/files/{name} differs from {source}: run `make chart-files`"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))), ids=os.path.basename)
def test_each_example_ships_with_the_release_as_a_valid_resource(path):
    """`clusters` / `loadTests` values render each example as the resource `kubectl apply` takes."""
    import jsonschema

    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    values = {
        "clusters": [
            {"name": d["metadata"]["name"], "spec": d["spec"]} for d in docs if d["kind"] == "InferenceCluster"
        ],
        "loadTests": [{"name": d["metadata"]["name"], "spec": d["spec"]} for d in docs if d["kind"] == "LoadTest"],
    }
    report = helm.lint(CHART, values, strict=True, namespace=NS, kube_version="v1.30.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report
    rendered = [d for d in render(values) if d["apiVersion"] == "infemu.io/v1alpha1"]
    assert [(d["kind"], d["metadata"]["name"], d["spec"]) for d in rendered] == [
        (d["kind"], d["metadata"]["name"], d["spec"])
        for d in sorted(docs, key=lambda d: d["kind"] != "InferenceCluster")
    ]
    schemas = crd_json_schemas()
    for doc in rendered:
        assert doc["metadata"]["namespace"] == NS
        jsonschema.validate(doc, schemas[doc["kind"]])
