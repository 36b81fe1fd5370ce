"""End to end against a real API server (kind, minikube, any cluster): runs only when
``KUBECONFIG`` points at one, and is skipped otherwise.

It installs the CRDs, checks that the API server accepts every example (server-side dry run)
and rejects a schema violation with its own message, then runs ``infemu operator --namespace``
out of cluster against a fresh namespace, applies the quickstart, and waits for the children
and the status. With ``INFEMU_E2E_IMAGE`` (an image the cluster can pull, e.g. one loaded with
``kind load docker-image``) it also waits for ``Ready=True``.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from conftest import EXAMPLES, ROOT, example

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs KUBECONFIG pointing at a Kubernetes cluster"),
]

GROUP, VERSION = "infemu.io", "v1alpha1"


@pytest.fixture(scope="module")
def api():
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=os.environ["KUBECONFIG"])
        client.VersionApi().get_code()
    except Exception as exc:  # an unreachable cluster is a skip, not a failure of infemu
        pytest.skip(f"KUBECONFIG is set but the API server is unreachable: {exc}")
    from infemu_operator.crds import all_crds

    ext = client.ApiextensionsV1Api()
    for crd in all_crds().values():
        try:
            ext.create_custom_resource_definition(crd)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            ext.patch_custom_resource_definition(crd["metadata"]["name"], crd)
    for crd in all_crds().values():  # wait until established
        deadline = time.monotonic() + 60
        while True:
            got = ext.read_custom_resource_definition(crd["metadata"]["name"])
            if any(c.type == "Established" and c.status == "True" for c in got.status.conditions or []):
                break
            assert time.monotonic() < deadline, f"CRD {crd['metadata']['name']} not established"
            time.sleep(1)
    return client


@pytest.fixture
def namespace(api):
    name = f"infemu-e2e-{uuid.uuid4().hex[:6]}"
    api.CoreV1Api().create_namespace({"metadata": {"name": name}})
    yield name
    api.CoreV1Api().delete_namespace(name)


def _plural(kind: str) -> str:
    return {"InferenceCluster": "inferenceclusters", "LoadTest": "loadtests"}[kind]


def test_the_api_server_accepts_every_example_and_rejects_a_schema_violation(api, namespace):
    objs = api.CustomObjectsApi()
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))):
        with open(path, encoding="utf-8") as fh:
            for doc in (d for d in yaml.safe_load_all(fh) if d):
                objs.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, _plural(doc["kind"]), doc, dry_run="All"
                )  # raises with the server's message on rejection
    with open(example("quickstart.yaml"), encoding="utf-8") as fh:
        bad = yaml.safe_load(fh)
    bad["spec"]["pools"][0]["tp"] = 0
    with pytest.raises(api.ApiException) as err:
        objs.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceclusters", bad, dry_run="All")
    assert err.value.status == 422 and "spec.pools[0].tp" in json.loads(err.value.body)["message"]


def test_operator_creates_children_and_status(api, namespace, tmp_path):
    env = {**os.environ}
    image = os.environ.get("INFEMU_E2E_IMAGE")
    if image:
        env["INFEMU_IMAGE"] = image
    log = open(tmp_path / "operator.log", "wb")  # noqa: SIM115 - closed below
    operator = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "operator", "--namespace", namespace],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with open(example("quickstart.yaml"), encoding="utf-8") as fh:
            body = yaml.safe_load(fh)
        objs = api.CustomObjectsApi()
        created = objs.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceclusters", body)
        uid = created["metadata"]["uid"]
        apps = api.AppsV1Api()
        deadline = time.monotonic() + 120
        while True:
            try:
                router = apps.read_namespaced_deployment("quickstart-router", namespace)
                sts = apps.read_namespaced_stateful_set("quickstart-agg", namespace)
                break
            except api.ApiException as exc:
                assert exc.status == 404 and time.monotonic() < deadline, (tmp_path / "operator.log").read_text()
                time.sleep(1)
        for child in (router, sts):
            assert child.metadata.owner_references[0].uid == uid
        while True:
            ic = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceclusters", "quickstart")
            conditions = {c["type"]: c for c in ic.get("status", {}).get("conditions", [])}
            if conditions and ic["status"].get("observedGeneration") == ic["metadata"]["generation"]:
                break
            assert time.monotonic() < deadline, (tmp_path / "operator.log").read_text()
            time.sleep(1)
        assert set(conditions) == {"Ready", "Progressing", "Degraded"}
        if image:
            deadline = time.monotonic() + 300
            while conditions["Ready"]["status"] != "True":
                assert time.monotonic() < deadline, conditions
                time.sleep(3)
                ic = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceclusters", "quickstart")
                conditions = {c["type"]: c for c in ic["status"]["conditions"]}
        objs.delete_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceclusters", "quickstart")
        deadline = time.monotonic() + 60
        while True:  # no blocking finalizer: the resource goes away
            try:
                objs.get_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceclusters", "quickstart")
            except api.ApiException as exc:
                assert exc.status == 404
                break
            assert time.monotonic() < deadline, "the InferenceCluster was not deleted"
            time.sleep(1)
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        log.close()
