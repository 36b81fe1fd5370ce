"""The kopf handlers against an emulated API server (kmock, kopf's own recommendation).

The operator runs for real — ``kopf.operator`` with the registered handlers, logging in through
a kubeconfig that points at the emulator — and the tests act like a user: create, edit and
delete resources over HTTP, then read what the operator did from the emulator's object store.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import threading

import kopf
import kubernetes
import pytest
import yaml
from conftest import ROOT, example

kmock_lib = pytest.importorskip("kmock")

from infemu_operator import handlers  # noqa: E402
from infemu_operator.loadtest import job_name  # noqa: E402

NS = "lab"
IC = "infemu.io/v1alpha1/inferenceclusters"
LT = "infemu.io/v1alpha1/loadtests"
FAULT = "infemu.io/v1alpha1/faults"
STS = "apps/v1/statefulsets"
DEPLOY = "apps/v1/deployments"
SVC = "v1/services"
CM = "v1/configmaps"
JOB = "batch/v1/jobs"
POD = "v1/pods"


def _example_body(file: str, name: str | None = None) -> dict:
    with open(example(file), encoding="utf-8") as fh:
        doc = next(d for d in yaml.safe_load_all(fh) if d and d.get("kind") == "InferenceCluster")
    return doc if name is None else {**doc, "metadata": {**doc["metadata"], "name": name}}


def _with_identity(body: dict, uid: str) -> dict:
    """What the API server adds on create (the emulator does not invent them)."""
    meta = {**body["metadata"], "namespace": NS, "uid": uid, "generation": 1, "resourceVersion": "1"}
    return {**body, "metadata": meta}


async def _until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _live(kmock, resource: str, name: str) -> dict | None:
    key = (kmock_lib.resource(resource), NS, name)
    if key not in kmock.objects or kmock.objects[key].deleted:
        return None
    return dict(kmock.objects[key].raw)


def _names(kmock, resource: str) -> set[str]:
    wanted = kmock_lib.resource(resource)
    return {name for (res, _, name), obj in kmock.objects.items() if res == wanted and not obj.deleted}


@pytest.fixture(autouse=True)
def _generated_names(monkeypatch):
    """kmock keys objects by name and has no ``generateName``; kopf posts every Event with one.
    Give such objects a name as the real API server does (prefix + suffix), or each Event after
    the first is refused as a conflict."""
    from kmock._internal import enums, k8s

    original = k8s.KubernetesEmulator._handle
    suffix = itertools.count()

    async def _handle(self, request):
        meta = request.data.get("metadata") if isinstance(request.data, dict) else None
        creating = request.action == enums.action.CREATE and isinstance(meta, dict)
        if creating and not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{next(suffix):05d}"
        return await original(self, request)

    monkeypatch.setattr(k8s.KubernetesEmulator, "_handle", _handle)


def _events(kmock, name: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events posted about the object ``name``."""
    wanted = kmock_lib.resource("v1/events")
    raws = [dict(obj.raw) for (res, _, _), obj in list(kmock.objects.items()) if res == wanted]
    return [
        (e.get("type"), e.get("reason"), e.get("message", ""))
        for e in raws
        if (e.get("involvedObject") or {}).get("name") == name
    ]


def _serve_like_an_api_server(kmock, tmp_path) -> str:
    """Declare the resources an operator needs; return a kubeconfig file pointing at kmock."""
    for res, kind, subresources in (
        (IC, "InferenceCluster", {"status"}),
        (LT, "LoadTest", {"status"}),
        (FAULT, "Fault", {"status"}),
        (STS, "StatefulSet", {"status", "scale"}),
        (DEPLOY, "Deployment", {"status", "scale"}),
        (SVC, "Service", {"status"}),
        (CM, "ConfigMap", set()),
        (JOB, "Job", {"status"}),
        (POD, "Pod", {"status"}),
        ("v1/events", "Event", set()),
    ):
        kmock.resources[res] = kmock_lib.ResourceInfo(
            kind=kind,
            namespaced=True,
            verbs={"list", "watch", "get", "create", "patch", "delete"},
            subresources=subresources,
        )
    # kopf's backbone: every real API server serves these two; the operator waits for them
    for res, kind in (("v1/namespaces", "Namespace"), ("apiextensions.k8s.io/v1/customresourcedefinitions", "CRD")):
        kmock.resources[res] = kmock_lib.ResourceInfo(kind=kind, namespaced=False, verbs={"list", "watch", "get"})
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u", "namespace": NS}}],
                "current-context": "kmock",
            }
        )
    )
    return str(kubeconfig)


class RunningOperator:
    """kopf.operator with our handlers against the kubeconfig's server, in its own thread and
    event loop (as in production: the emulated API server is another process's business; and
    kopf cancels the tasks of its own loop that it did not start when it stops)."""

    def __init__(self) -> None:
        settings = kopf.OperatorSettings()
        settings.watching.server_timeout = 10
        settings.queueing.exit_timeout = 0.5  # stop quickly at teardown
        settings.queueing.idle_timeout = 0.5
        settings.scanning.disabled = True  # exact namespace names, as `infemu operator --namespace` runs
        registry = handlers.register(
            type(kopf.get_default_registry())(), (NS,), status_interval_s=0.3, loadtest_interval_s=0.3
        )
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(
            target=asyncio.run,
            args=(
                kopf.operator(
                    registry=registry, settings=settings, standalone=True, namespaces=[NS], stop_flag=self.stop_flag
                ),
            ),
            daemon=True,
        )
        self.thread.start()

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 15)
        assert not self.thread.is_alive(), "the operator did not stop"


@pytest.fixture
async def running(kmock, tmp_path, monkeypatch):
    kubeconfig = _serve_like_an_api_server(kmock, tmp_path)
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    # kopf's stock login reads the client's default path, which the client fixed at import time
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    handlers.Runtime.kube = None
    op = RunningOperator()
    try:
        yield op
    finally:
        await op.stop()
        handlers.Runtime.kube = None


@pytest.fixture
async def operator(kmock, running):
    return kmock


async def _create(kmock, resource: str, body: dict) -> None:
    path = f"/apis/{resource.rsplit('/', 1)[0]}/namespaces/{NS}/{resource.rsplit('/', 1)[1]}"
    resp = await kmock.post(path, json=body)
    assert resp.status in (200, 201), await resp.text()


async def _patch(kmock, resource: str, name: str, patch: dict) -> None:
    group_version, plural = resource.rsplit("/", 1)
    resp = await kmock.patch(
        f"/apis/{group_version}/namespaces/{NS}/{plural}/{name}",
        json=patch,
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert resp.status == 200, await resp.text()


def _condition(obj: dict | None, kind: str) -> dict:
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return c
    return {}


async def test_create_makes_owned_children_then_a_scale_change_patches_them(operator):
    kmock = operator
    body = _with_identity(_example_body("pd-llama70b-h100.yaml"), "uid-pd")
    await _create(kmock, IC, body)
    name = body["metadata"]["name"]
    # the router Service is the last child applied: once it is there, every child is (waiting for the
    # Deployment, which comes just before it, raced the Service's apply and failed a CI run)
    await _until(lambda: _live(kmock, SVC, f"{name}-router"), what="the router Service")
    children = {
        (STS, f"{name}-prefill"),
        (STS, f"{name}-decode"),
        (SVC, f"{name}-prefill"),
        (SVC, f"{name}-decode"),
        (SVC, f"{name}-router"),
        (DEPLOY, f"{name}-router"),
        (CM, f"{name}-config"),
    }
    for res, child in children:
        obj = _live(kmock, res, child)
        assert obj is not None, (res, child)
        refs = obj["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == [
            ("InferenceCluster", name, "uid-pd", True)
        ]
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == name
    assert _live(kmock, STS, f"{name}-prefill")["spec"]["replicas"] == 2
    # the status arrives with the conditions and per-pool counts (nothing is ready in an emulator)
    ic = await _until(lambda: _condition(_live(kmock, IC, name), "Progressing") and _live(kmock, IC, name))
    assert ic["status"]["observedGeneration"] == 1
    assert ic["status"]["router"] == f"http://{name}-router.{NS}.svc.cluster.local"
    assert {p["name"]: (p["ready"], p["desired"]) for p in ic["status"]["pools"]} == {
        "prefill": (0, 2),
        "decode": (0, 1),
    }
    assert _condition(ic, "Ready")["status"] == "False" and _condition(ic, "Progressing")["status"] == "True"
    assert "finalizers" not in ic["metadata"] or all("infemu" in f for f in ic["metadata"]["finalizers"])

    # the StatefulSet controller reports its pods ready: the timer turns Ready=True
    for pool, n in (("prefill", 2), ("decode", 1)):
        await _patch(kmock, STS, f"{name}-{pool}", {"status": {"readyReplicas": n, "updatedReplicas": n}})
    await _patch(kmock, DEPLOY, f"{name}-router", {"status": {"availableReplicas": 1}})
    ic = await _until(
        lambda: _condition(_live(kmock, IC, name), "Ready").get("status") == "True" and _live(kmock, IC, name),
        what="Ready=True from the status timer",
    )
    assert _condition(ic, "Ready")["reason"] == "AllReplicasReady"
    assert _condition(ic, "Degraded")["status"] == "False"
    # `kubectl describe` shows the milestones as Normal Events
    await _until(lambda: ("Normal", "Ready") in {e[:2] for e in _events(kmock, name)}, what="a Ready Event")
    assert ("Normal", "Applied") in {e[:2] for e in _events(kmock, name)}

    # a crash-looping worker pod is a Warning Event, once, not on every status tick
    crash = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-decode-0", "namespace": NS, "labels": {"app.kubernetes.io/instance": name}},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "worker",
                    "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}},
                }
            ],
        },
    }
    resp = await kmock.post(f"/api/v1/namespaces/{NS}/pods", json=crash)
    assert resp.status in (200, 201)
    failing = lambda: [e for e in _events(kmock, name) if e[1] == "PodFailing"]  # noqa: E731
    await _until(failing, what="a PodFailing Event")
    await asyncio.sleep(1.0)  # several status ticks
    assert len(failing()) == 1 and failing()[0][0] == "Warning" and "exit code 2" in failing()[0][2]

    # scale the prefill pool down: the StatefulSet is patched in place, not recreated
    pools = [dict(p) for p in body["spec"]["pools"]]
    pools[0]["replicas"] = 1
    await _patch(kmock, IC, name, {"metadata": {"generation": 2}, "spec": {"pools": pools}})
    await _until(
        lambda: (_live(kmock, STS, f"{name}-prefill") or {}).get("spec", {}).get("replicas") == 1,
        what="the prefill StatefulSet scaled to 1",
    )
    assert len(kmock.objects[STS, NS, f"{name}-prefill"].history) >= 2
    await _until(lambda: (_live(kmock, IC, name) or {}).get("status", {}).get("observedGeneration") == 2)

    # rename the decode pool: the new one is created, the old StatefulSet and Service are pruned
    pools[1]["name"] = "decode-b"
    await _patch(kmock, IC, name, {"metadata": {"generation": 3}, "spec": {"pools": pools}})
    await _until(
        lambda: _live(kmock, STS, f"{name}-decode") is None and _live(kmock, SVC, f"{name}-decode") is None,
        what="the dropped pool pruned",
    )
    assert _live(kmock, STS, f"{name}-decode-b")["spec"]["replicas"] == 1


async def test_invalid_spec_gives_a_condition_naming_the_field_and_no_children(operator):
    kmock = operator
    body = _with_identity(_example_body("quickstart.yaml", "broken"), "uid-broken")
    body["spec"]["pools"][0]["tp"] = 3  # passes the schema (an integer), fails cross-field validation
    await _create(kmock, IC, body)
    ic = await _until(lambda: _condition(_live(kmock, IC, "broken"), "Ready") and _live(kmock, IC, "broken"))
    ready = _condition(ic, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.pools[0].tp" in ready["message"]
    assert _condition(ic, "Degraded")["status"] == "True"
    warning = await _until(
        lambda: [e for e in _events(kmock, "broken") if e[:2] == ("Warning", "InvalidSpec")], what="the Event"
    )
    assert "spec.pools[0].tp" in warning[0][2]
    await asyncio.sleep(1.0)  # give a crash loop the chance to show itself
    assert not any(n.startswith("broken-") for res in (STS, SVC, DEPLOY, CM) for n in _names(kmock, res))


async def test_delete_completes_without_a_blocking_finalizer(operator):
    kmock = operator
    body = _with_identity(_example_body("quickstart.yaml", "short-lived"), "uid-sl")
    await _create(kmock, IC, body)
    await _until(lambda: _live(kmock, SVC, "short-lived-router"), what="children")  # the last one applied
    resp = await kmock.delete(f"/apis/infemu.io/v1alpha1/namespaces/{NS}/inferenceclusters/short-lived")
    assert resp.status == 200
    # margin for a loaded 2-core CI machine (a 10 s wait failed once there)
    await _until(lambda: _live(kmock, IC, "short-lived") is None, timeout=30, what="the resource to be gone")
    # children go by garbage collection (owner references), which needs no handler of ours
    assert _live(kmock, DEPLOY, "short-lived-router")["metadata"]["ownerReferences"][0]["uid"] == "uid-sl"


async def test_a_loadtest_becomes_a_job_and_its_summary_lands_in_status_and_a_configmap(operator):
    kmock = operator
    await _create(kmock, IC, _with_identity(_example_body("quickstart.yaml"), "uid-q"))
    cluster = _example_body("quickstart.yaml")["metadata"]["name"]
    lt = {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "LoadTest",
        "metadata": {"name": "chat-8", "namespace": NS, "uid": "uid-lt", "generation": 1},
        "spec": {"cluster": cluster, "workload": "chat", "arrival": {"users": 8}, "durationSeconds": 30, "workers": 2},
    }
    await _create(kmock, LT, lt)
    job = await _until(lambda: _live(kmock, JOB, job_name("chat-8")), what="the Locust Job")
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-lt"
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["infemu", "loadtest"]
    assert args[args.index("--target") + 1] == f"http://{cluster}-router.{NS}.svc.cluster.local"
    assert args[args.index("--workers") + 1] == "2" and args[args.index("--users") + 1] == "8"
    assert await _until(lambda: (_live(kmock, LT, "chat-8") or {}).get("status", {}).get("phase"))

    # the Job's pod finishes and leaves its summary as the termination message
    summary = {"requests": 40, "completed": 40, "failed": 0, "slo_attainment": 0.95, "ttft_ms": {"p99": 310.0}}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "chat-8-locust-abcde", "namespace": NS, "labels": {"job-name": job_name("chat-8")}},
        "status": {
            "containerStatuses": [
                {"name": "locust", "state": {"terminated": {"exitCode": 0, "message": json.dumps(summary)}}}
            ]
        },
    }
    resp = await kmock.post(f"/api/v1/namespaces/{NS}/pods", json=pod)
    assert resp.status in (200, 201)
    await _patch(kmock, JOB, job_name("chat-8"), {"status": {"succeeded": 1}})
    done = await _until(
        lambda: (
            (_live(kmock, LT, "chat-8") or {}).get("status", {}).get("phase") == "Succeeded"
            and _live(kmock, LT, "chat-8")
        ),
        what="the LoadTest to succeed",
    )
    assert done["status"]["summary"] == summary
    assert done["status"]["attainment"] == "95.0%"  # the ATTAINMENT column of `kubectl get lt`
    await _until(lambda: ("Normal", "JobSucceeded") in {e[:2] for e in _events(kmock, "chat-8")}, what="the Event")
    assert ("Normal", "Started") in {e[:2] for e in _events(kmock, "chat-8")}
    cm = _live(kmock, CM, "chat-8-summary")
    assert json.loads(cm["data"]["summary.json"]) == summary


async def test_a_loadtest_with_a_bad_spec_fails_with_the_field(operator):
    kmock = operator
    lt = {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "LoadTest",
        "metadata": {"name": "bad", "namespace": NS, "uid": "uid-bad", "generation": 1},
        "spec": {"cluster": "x", "workload": "poetry"},
    }
    await _create(kmock, LT, lt)
    obj = await _until(
        lambda: (_live(kmock, LT, "bad") or {}).get("status", {}).get("phase") and _live(kmock, LT, "bad")
    )
    assert obj["status"]["phase"] == "Failed" and "spec.workload" in obj["status"]["message"]
    assert _live(kmock, JOB, job_name("bad")) is None


@pytest.mark.slow
async def test_infemu_operator_command_runs_against_the_current_kubeconfig(kmock, tmp_path):
    """``infemu operator --namespace lab`` as a user runs it: a process, the kubeconfig, SIGTERM."""
    kubeconfig = _serve_like_an_api_server(kmock, tmp_path)
    body = _with_identity(_example_body("quickstart.yaml"), "uid-cli")
    await _create(kmock, IC, body)
    env = {**os.environ, "KUBECONFIG": kubeconfig, "INFEMU_IMAGE": "infemu:test"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "emulator.cli",
        "operator",
        "--namespace",
        NS,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        deploy = await _until(lambda: _live(kmock, DEPLOY, "quickstart-router"), timeout=60, what="the router")
        assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == "infemu:test"
        await _until(lambda: _condition(_live(kmock, IC, "quickstart"), "Ready"), timeout=30, what="conditions")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, out.decode()[-3000:]


async def test_stopping_the_operator_releases_its_finalizers_so_delete_works_without_it(kmock, running):
    await _create(kmock, IC, _with_identity(_example_body("quickstart.yaml", "orphan"), "uid-o"))
    held = await _until(
        lambda: (_live(kmock, IC, "orphan") or {}).get("metadata", {}).get("finalizers"), what="kopf's finalizer"
    )
    assert held == [handlers.FINALIZER]
    await running.stop()  # like `helm uninstall`
    assert not _live(kmock, IC, "orphan")["metadata"].get("finalizers")
    resp = await kmock.delete(f"/apis/infemu.io/v1alpha1/namespaces/{NS}/inferenceclusters/orphan", timeout=5)
    assert resp.status == 200 and _live(kmock, IC, "orphan") is None  # gone at once: nothing blocks it


async def test_an_inference_pool_on_a_cluster_without_its_crd_is_a_warning_not_a_failure(operator):
    kmock = operator
    # as an API server without the Gateway API Inference Extension CRDs: 404 for their API group
    kmock[lambda req: "/apis/inference.networking.k8s.io/" in str(req.url)] << 404
    body = _with_identity(_example_body("quickstart.yaml", "gw"), "uid-gw")
    body["spec"]["gateway"] = {"inferencePool": {"enabled": True}}
    await _create(kmock, IC, body)
    await _until(lambda: _live(kmock, DEPLOY, "gw-router"), what="the router Deployment")
    warning = await _until(
        lambda: [e for e in _events(kmock, "gw") if e[:2] == ("Warning", "InferencePoolUnavailable")],
        what="the Warning Event",
    )
    assert "Gateway API Inference Extension" in warning[0][2]
    assert _live(kmock, STS, "gw-agg") is not None  # the cluster itself is served
