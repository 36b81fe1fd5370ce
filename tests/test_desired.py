"""The operator's reconcile is a pure function: every example's children validate against the
Kubernetes 1.30 schemas in strict mode, carry the recommended labels, and keep capabilities
away from the worker container."""

from __future__ import annotations

import pytest
from conftest import example_files

from emulator.spec import load_clusters
from infemu_operator.desired import OperatorSettings, desired_children, tc_tree_for
from infemu_operator.tcinit import instance_of

kubernetes_validate = pytest.importorskip("kubernetes_validate")
CLUSTERS = [c for path in example_files() for c in load_clusters(path)]


@pytest.mark.parametrize("shaping", ["inproc", "tc"])
@pytest.mark.parametrize("cluster", CLUSTERS, ids=[c.name for c in CLUSTERS])
def test_children_validate_strictly_against_kubernetes_1_30(cluster, shaping):
    children = desired_children(cluster, "lab", OperatorSettings(shaping=shaping))
    kinds = [c["kind"] for c in children]
    assert kinds[0] == "ConfigMap" and kinds[-2:] == ["Deployment", "Service"]
    assert kinds.count("StatefulSet") == len(cluster.spec.pools)
    for obj in children:
        kubernetes_validate.validate(obj, "1.30", strict=True)
        lbl = obj["metadata"]["labels"]
        assert lbl["app.kubernetes.io/instance"] == cluster.name and lbl["app.kubernetes.io/component"]


def test_only_the_tc_init_container_has_net_admin():
    cluster = next(c for c in CLUSTERS if c.name == "pd-llama70b")
    for shaping in ("inproc", "tc"):
        for obj in desired_children(cluster, "lab", OperatorSettings(shaping=shaping)):
            if obj["kind"] != "StatefulSet":
                continue
            pod = obj["spec"]["template"]["spec"]
            worker = pod["containers"][0]["securityContext"]
            assert worker["capabilities"] == {"drop": ["ALL"]} and worker["readOnlyRootFilesystem"]
            assert worker["runAsNonRoot"]
            inits = pod.get("initContainers", [])
            assert (len(inits) == 1) == (shaping == "tc")
            if inits:
                assert inits[0]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]


def test_replicas_and_the_tc_tree_follow_the_spec():
    cluster = next(c for c in CLUSTERS if c.name == "pd-llama70b")
    sts = {o["metadata"]["name"]: o for o in desired_children(cluster, "lab") if o["kind"] == "StatefulSet"}
    assert sts["pd-llama70b-prefill"]["spec"]["replicas"] == 2 and sts["pd-llama70b-decode"]["spec"]["replicas"] == 1
    assert instance_of("pd-llama70b-prefill-1", "pd-llama70b") == "prefill-1"
    tree = [" ".join(c) for c in tc_tree_for(cluster, "prefill-1")]
    assert any("match ip tos 0x40" in c for c in tree)  # the scale-out (InfiniBand) class
