"""End to end against a real Kubernetes: the API server's validation, the controllers' garbage
collection, the scheduler, the kubelet and real pods of the project's image.

Where ``KUBECONFIG`` is set, the tests use that cluster as it is (kind, minikube, any cluster;
``INFEMU_E2E_IMAGE`` names an image it can run). Otherwise, as root and with ``../shared/k8s``
beside the checkout (this project's machines and CI), the module starts that single-node
Kubernetes, builds the image into it without a container engine, and wipes the cluster at the
end. Anywhere else the tests are skipped with the reason.

One module, one cluster: the start costs ~30 s and the image 1-2.5 min (see the README's
"Tests" section for the added suite time).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import yaml
from conftest import EXAMPLES, ROOT, example

pytestmark = [pytest.mark.slow, pytest.mark.k8s]

GROUP, VERSION = "infemu.io", "v1alpha1"
K8S = os.path.normpath(os.path.join(ROOT, "..", "shared", "k8s"))
POD_WAIT_S = 300  # two cores shared by every pod: the quickstart is Ready in 10-20 s, P/D takes longer


# ---- the cluster --------------------------------------------------------------------------


def _script(name: str, *args: str, timeout: float) -> str:
    r = subprocess.run([os.path.join(K8S, name), *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}{_image_diagnostics()}")
    return r.stdout.strip()


def _containerd_images() -> tuple[list[str], str]:
    """The image names the cluster's containerd holds, read whole (and why not, when it fails)."""
    try:
        ls = subprocess.run(["ctr", "-n", "k8s.io", "images", "ls", "-q"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"ctr images ls: {e}"
    return ls.stdout.split(), f"ctr images ls ({ls.returncode}): {ls.stderr[-500:]}"


def _image_diagnostics() -> str:
    """What the image build left behind: its log's tail and the images containerd holds."""
    state = os.environ.get("K8S_STATE", "/var/lib/k8s-local")
    try:
        with open(os.path.join(state, "logs", "make-image.log"), errors="replace") as fh:
            log = "make-image.log (tail):\n" + "".join(fh.readlines()[-30:])
    except OSError as e:
        log = f"make-image.log: {e}"
    names, how = _containerd_images()
    return f"\n{log}\n{how}\n" + "\n".join(names[-30:])


IMAGE = "localhost/infemu:dev"


def _make_image() -> str:
    """Build the image and load it into the cluster.

    make-image.sh checks the load with ``ctr images ls -q | grep -qxF REF`` under ``pipefail``:
    when grep finds the name on ctr's first line and exits, ctr can die of SIGPIPE on its next
    line and the check fails with the image loaded (seen once in CI). So a failed check is read
    again here, whole; any other failure gets one more try (which reuses the base layer)."""
    r = subprocess.run(
        [os.path.join(K8S, "make-image.sh"), ROOT, "infemu:dev"], capture_output=True, text=True, timeout=1200
    )
    if r.returncode == 0:
        return r.stdout.strip().splitlines()[-1]
    if "is not in containerd after the import" in r.stderr and IMAGE in _containerd_images()[0]:
        return IMAGE
    sys.stderr.write(
        f"make-image.sh failed ({r.returncode}), retrying once:\n{r.stderr[-2000:]}{_image_diagnostics()}\n"
    )
    return _script("make-image.sh", ROOT, "infemu:dev", timeout=1200).splitlines()[-1]


@pytest.fixture(scope="module")
def k8s():
    """(kubeconfig, image or None) of a real cluster; started here when none is given."""
    given = os.environ.get("KUBECONFIG")
    if given:
        yield given, os.environ.get("INFEMU_E2E_IMAGE")
        return
    if not os.path.exists(os.path.join(K8S, "start-cluster.sh")):
        pytest.skip(f"no KUBECONFIG, and no local Kubernetes at {K8S} to start")
    if os.geteuid() != 0:
        pytest.skip(f"starting the local Kubernetes at {K8S} needs root")
    out = _script("start-cluster.sh", "--with-node", timeout=900)
    kubeconfig = out.splitlines()[-1].removeprefix("export KUBECONFIG=")
    try:
        image = _make_image()
        yield kubeconfig, image
    finally:
        subprocess.run([os.path.join(K8S, "stop-cluster.sh"), "--wipe"], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def api(k8s):
    from kubernetes import client, config

    kubeconfig, _ = k8s
    try:
        config.load_kube_config(config_file=kubeconfig)
        client.VersionApi().get_code()
    except Exception as exc:  # an unreachable cluster given from outside is a skip, not an infemu failure
        pytest.skip(f"the API server of {kubeconfig} is unreachable: {exc}")
    from infemu_operator.crds import all_crds

    ext = client.ApiextensionsV1Api()
    for crd in all_crds().values():
        try:
            ext.create_custom_resource_definition(crd)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            ext.patch_custom_resource_definition(crd["metadata"]["name"], crd)
    for crd in all_crds().values():
        _wait(
            lambda crd=crd: any(
                c.type == "Established" and c.status == "True"
                for c in ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []
            ),
            60,
            f"CRD {crd['metadata']['name']} established",
        )
    return client


def _wait(predicate, timeout: float, what: str, every: float = 1.0, context=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{context()}")
        time.sleep(every)


def _new_namespace(api) -> str:
    name = f"infemu-e2e-{uuid.uuid4().hex[:6]}"
    api.CoreV1Api().create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture
def namespace(api):
    name = _new_namespace(api)
    yield name
    api.CoreV1Api().delete_namespace(name)


def _plural(kind: str) -> str:
    return {"InferenceCluster": "inferenceclusters", "LoadTest": "loadtests"}[kind]


def _load(file: str, kind: str = "InferenceCluster") -> dict:
    with open(example(file), encoding="utf-8") as fh:
        return next(d for d in yaml.safe_load_all(fh) if d and d.get("kind") == kind)


def _ic(api, ns: str, name: str) -> dict:
    return api.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", name)


def _conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def _events(api, ns: str, name: str) -> list[tuple[str, str, str]]:
    items = api.CoreV1Api().list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [(e.type, e.reason, e.message or "") for e in items]


def _pods(api, ns: str) -> str:
    out = []
    for p in api.CoreV1Api().list_namespaced_pod(ns).items:
        states = [
            f"{c.name}:{'ready' if c.ready else (c.state.waiting.reason if c.state.waiting else 'not ready')}"
            for c in p.status.container_statuses or []
        ]
        out.append(f"  {p.metadata.name} {p.status.phase} {' '.join(states)}")
    return "pods:\n" + "\n".join(out)


def _logs(api, ns: str, part: str, tail: int = 60) -> str:
    """The last lines of every pod whose name contains ``part`` (for a failure's message)."""
    core, out = api.CoreV1Api(), []
    for p in core.list_namespaced_pod(ns).items:
        if part in p.metadata.name:
            try:
                text = core.read_namespaced_pod_log(p.metadata.name, ns, tail_lines=tail)
            except Exception as exc:  # a pod that is gone or not started: say so, keep the others
                text = f"(no log: {exc})"
            out.append(f"--- {p.metadata.name}\n{text}")
    return "\n".join(out)


def _ready(api, ns: str, name: str, log=lambda: "") -> dict:
    return _wait(
        lambda: (ic := _ic(api, ns, name)) and _conditions(ic).get("Ready", {}).get("status") == "True" and ic,
        POD_WAIT_S,
        f"InferenceCluster {ns}/{name} Ready",
        every=2,
        context=lambda: f"status: {json.dumps(_ic(api, ns, name).get('status'))}\n{_pods(api, ns)}\n{log()}",
    )


def _service_url(api, ns: str, name: str, port: int = 80) -> str:
    """The router Service by its ClusterIP: kube-proxy's rules serve it from the node too."""
    ip = api.CoreV1Api().read_namespaced_service(name, ns).spec.cluster_ip
    return f"http://{ip}:{port}"


def _stream_ids(url: str, model: str, max_tokens: int = 6) -> tuple[set[str], int, str]:
    """(ids seen, content chunks, raw text) of one streamed chat completion."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "tell me about links " * 20}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    raw = urllib.request.urlopen(req, timeout=60).read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1]), raw  # no stray blank lines
    chunks = [json.loads(e[6:]) for e in events[:-1] if e != "data: [DONE]"]
    content = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    return {c["id"] for c in chunks}, content, raw


INFERENCE_POOL_CRD = os.path.join(
    ROOT, "tests", "data", "gateway-api-inference-extension", "inference.networking.k8s.io_inferencepools.yaml"
)


def _install_inference_pool_crd(api) -> None:
    """The upstream InferencePool CRD (tests/data/gateway-api-inference-extension/SOURCE.md)."""
    with open(INFERENCE_POOL_CRD, encoding="utf-8") as fh:
        crd = yaml.safe_load(fh)
    ext = api.ApiextensionsV1Api()
    try:
        ext.create_custom_resource_definition(crd)
    except api.ApiException as exc:
        if exc.status != 409:
            raise
    _wait(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []
        ),
        60,
        "the InferencePool CRD established",
    )


class OutOfClusterOperator:
    """``infemu operator --namespace NS`` as a user runs it beside a cluster."""

    def __init__(self, kubeconfig: str, image: str | None, namespace: str, log_path) -> None:
        env = {**os.environ, "KUBECONFIG": kubeconfig, "INFEMU_WORKER_CPU": "50m", "PYTHONPATH": ROOT}
        if image:
            env["INFEMU_IMAGE"] = image
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emulator.cli", "operator", "--namespace", namespace],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return "operator log (tail):\n" + self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def operated(k8s, api, tmp_path_factory):
    """A namespace with the operator running out of cluster against it: (namespace, operator)."""
    kubeconfig, image = k8s
    ns = _new_namespace(api)
    op = OutOfClusterOperator(kubeconfig, image, ns, tmp_path_factory.mktemp("operator") / "operator.log")
    yield ns, op
    op.stop()
    api.CoreV1Api().delete_namespace(ns)


# ---- the API server: schema and status ------------------------------------------------------


def test_the_api_server_accepts_every_example_and_rejects_a_schema_violation(api, namespace):
    objs = api.CustomObjectsApi()
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))):
        with open(path, encoding="utf-8") as fh:
            for doc in (d for d in yaml.safe_load_all(fh) if d):
                objs.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, _plural(doc["kind"]), doc, dry_run="All"
                )  # raises with the server's message on rejection
    bad = _load("quickstart.yaml")
    bad["spec"]["pools"][0]["tp"] = 0
    with pytest.raises(api.ApiException) as err:
        objs.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceclusters", bad, dry_run="All")
    assert err.value.status == 422 and "spec.pools[0].tp" in json.loads(err.value.body)["message"]


def test_every_status_field_the_operator_writes_comes_back_from_the_api_server(api, namespace):
    """A field the CRD schema does not declare is pruned silently by the API server. The statuses
    are built by the operator's own functions, so a field added there is checked here too."""
    from infemu_operator.loadtest import attainment_text
    from infemu_operator.status import cluster_status, invalid_spec_status, merge_conditions, now

    objs = api.CustomObjectsApi()
    body = _load("pd-llama70b-h100.yaml")
    objs.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceclusters", body)
    name = body["metadata"]["name"]
    pools = [
        {"name": "prefill", "role": "prefill", "ready": 1, "desired": 2, "updated": 2},
        {"name": "decode", "role": "decode", "ready": 1, "desired": 1, "updated": 1},
    ]
    live = cluster_status(
        generation=1,
        observed_generation=1,
        pools=pools,
        router={"status": {"availableReplicas": 1}},
        endpoint="http://x",
        since_apply_s=3.0,
    )
    invalid = invalid_spec_status(2, ["spec.pools[0].tp: 3 does not divide 64 attention heads"])
    for status in (live, invalid):
        sent = {**status, "appliedAt": now(), "conditions": merge_conditions(None, status["conditions"])}
        back = objs.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "inferenceclusters", name, {"status": sent}
        )["status"]
        assert {k: back.get(k) for k in sent} == sent

    lt = _load("loadtest-chat.yaml", "LoadTest")
    objs.create_namespaced_custom_object(GROUP, VERSION, namespace, "loadtests", lt)
    summary = {"requests": 10, "completed": 10, "failed": 0, "slo_attainment": 0.9, "ttft_ms": {"p99": 12.5}}
    sent = {
        "phase": "Succeeded",
        "message": "10 of 10 requests completed",
        "job": "lt-locust",
        "target": "http://x",
        "startTime": now(),
        "completionTime": now(),
        "summary": summary,
        "summaryConfigMap": "lt-summary",
        "attainment": attainment_text(summary),
        "conditions": merge_conditions(None, [{"type": "Complete", "status": "True", "reason": "R", "message": "m"}]),
    }
    back = objs.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "loadtests", lt["metadata"]["name"], {"status": sent}
    )["status"]
    assert {k: back.get(k) for k in sent} == sent


# ---- the operator out of cluster: the quickstart's whole life --------------------------------


def test_quickstart_lifecycle_events_stream_loadtest_scale_invalid_edit_and_garbage_collection(api, operated, k8s):
    ns, op = operated
    if not k8s[1]:
        pytest.skip("needs INFEMU_E2E_IMAGE: an image of this checkout the cluster can run")
    objs, apps = api.CustomObjectsApi(), api.AppsV1Api()
    _install_inference_pool_crd(api)
    body = _load("quickstart.yaml")
    body["spec"]["gateway"] = {"inferencePool": {"enabled": True}}  # for an inference gateway's endpoint picker
    name = body["metadata"]["name"]
    uid = objs.create_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", body)["metadata"]["uid"]
    ic = _ready(api, ns, name, op.log)
    assert ic["status"]["observedGeneration"] == ic["metadata"]["generation"]
    assert ic["status"]["conditions"][0]["message"].startswith("1 instance in 1 pool ready")
    for child in (
        apps.read_namespaced_deployment(f"{name}-router", ns),
        apps.read_namespaced_stateful_set(f"{name}-agg", ns),
    ):
        assert child.metadata.owner_references[0].uid == uid
    _wait(lambda: {("Normal", "Applied"), ("Normal", "Ready")} <= {e[:2] for e in _events(api, ns, name)}, 30, "Events")

    # the InferencePool, accepted by the upstream CRD (its CEL rules too), selects the serving pod
    pool = objs.get_namespaced_custom_object("inference.networking.k8s.io", "v1", ns, "inferencepools", name)
    assert pool["metadata"]["ownerReferences"][0]["uid"] == uid
    selector = ",".join(f"{k}={v}" for k, v in pool["spec"]["selector"]["matchLabels"].items())
    selected = api.CoreV1Api().list_namespaced_pod(ns, label_selector=selector).items
    assert [p.metadata.name for p in selected] == [f"{name}-agg-0"]
    assert selected[0].metadata.labels["llm-d.ai/role"] == "both"

    # a streamed chat through the router Service: one id, every token
    ids, content, _ = _stream_ids(_service_url(api, ns, f"{name}-router"), body["spec"]["model"]["name"])
    assert len(ids) == 1 and content == 6

    # a LoadTest runs Locust in a Job against the router and ends Succeeded with its summary
    lt = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoadTest",
        "metadata": {"name": "chat-e2e"},
        "spec": {"cluster": name, "workload": "chat", "arrival": {"users": 2}, "durationSeconds": 10, "workers": 1},
    }
    objs.create_namespaced_custom_object(GROUP, VERSION, ns, "loadtests", lt)
    done = _wait(
        lambda: (
            (o := objs.get_namespaced_custom_object(GROUP, VERSION, ns, "loadtests", "chat-e2e"))
            and (o.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            and o
        ),
        POD_WAIT_S,
        "the LoadTest to finish",
        every=3,
        context=op.log,
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["summary"]["completed"] > 0 and done["status"]["attainment"].endswith("%")
    assert ("Normal", "JobSucceeded") in {e[:2] for e in _events(api, ns, "chat-e2e")}

    # scale the pool to 2 (on a second GPU): the StatefulSet follows and both pods become Ready
    pools = body["spec"]["pools"]
    pools[0]["replicas"] = 2
    grown = {"spec": {"pools": pools, "topology": {**body["spec"]["topology"], "gpusPerNode": 2}}}
    objs.patch_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", name, grown)
    _wait(
        lambda: (
            (st := _ic(api, ns, name).get("status", {})).get("observedGeneration") == 2
            and st.get("pools", [{}])[0].get("ready") == 2
            and _conditions(_ic(api, ns, name))["Ready"]["status"] == "True"
        ),
        POD_WAIT_S,
        "2 ready instances",
        every=2,
        context=lambda: f"status: {json.dumps(_ic(api, ns, name).get('status'))}\n{_pods(api, ns)}",
    )

    # an edit that passes the schema but not validation: a Warning Event, nothing applied
    pools[0]["tp"] = 3
    objs.patch_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", name, {"spec": {"pools": pools}})
    _wait(
        lambda: _conditions(_ic(api, ns, name))["Ready"]["reason"] == "InvalidSpec", 60, "InvalidSpec", context=op.log
    )
    warning = _wait(
        lambda: [e for e in _events(api, ns, name) if e[:2] == ("Warning", "InvalidSpec")], 30, "a Warning Event"
    )
    assert "spec.pools[0].tp" in warning[0][2]
    assert apps.read_namespaced_stateful_set(f"{name}-agg", ns).spec.replicas == 2  # untouched

    # delete: the API server's garbage collector removes every child
    objs.delete_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", name)

    def gone() -> bool:
        left = [s.metadata.name for s in apps.list_namespaced_stateful_set(ns).items]
        left += [d.metadata.name for d in apps.list_namespaced_deployment(ns).items]
        left += [s.metadata.name for s in api.CoreV1Api().list_namespaced_service(ns).items]
        left += [
            c.metadata.name
            for c in api.CoreV1Api().list_namespaced_config_map(ns).items
            if c.metadata.name.startswith(name)
        ]
        return not left

    _wait(gone, 120, "garbage collection of the children", every=2)


# ---- chaos on Kubernetes: a LoadTest whose faults the operator carries out ------------------

CHAOS_PD = """
apiVersion: infemu.io/v1alpha1
kind: InferenceCluster
metadata: {name: chaos-pd}
spec:
  model: {name: llama-3.1-8b, dtype: bf16}
  gpu: h100-sxm
  topology: {nodes: 1, gpusPerNode: 3}
  pools:
    - {name: prefill, role: prefill, replicas: 2}
    - {name: decode, role: decode, replicas: 1}
  router:
    policy: pd
    timeouts: {kvTransferMs: 2000, idleMs: 5000}
"""


def test_a_loadtest_with_a_kill_and_a_link_fault_loses_nothing(api, operated, k8s):
    ns, op = operated
    if not k8s[1]:
        pytest.skip("needs INFEMU_E2E_IMAGE: an image of this checkout the cluster can run")
    objs = api.CustomObjectsApi()
    body = yaml.safe_load(CHAOS_PD)
    objs.create_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", body)
    _ready(api, ns, "chaos-pd", op.log)
    lt = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoadTest",
        "metadata": {"name": "chaos-e2e"},
        "spec": {
            "cluster": "chaos-pd",
            "workload": "chat",
            "arrival": {"users": 3},
            "durationSeconds": 40,
            "faults": [
                {"name": "kill-prefill", "kind": "kill", "atSeconds": 12, "target": {"instance": "prefill-0"}},
                {
                    "name": "slow-kv",
                    "kind": "link",
                    "atSeconds": 20,
                    "durationSeconds": 8,
                    "target": {"pool": "prefill", "peer": "decode"},
                    "link": {"bandwidthFactor": 0.05, "latencyUs": 2000},
                },
            ],
        },
    }
    objs.create_namespaced_custom_object(GROUP, VERSION, ns, "loadtests", lt)
    done = _wait(
        lambda: (
            (o := objs.get_namespaced_custom_object(GROUP, VERSION, ns, "loadtests", "chaos-e2e"))
            and (o.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            and o
        ),
        POD_WAIT_S,
        "the chaos LoadTest to finish",
        every=3,
        context=lambda: f"{_pods(api, ns)}\n{op.log()}",
    )
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    faults = {f["name"]: f for f in status["faults"]}
    assert list(faults) == ["kill-prefill", "slow-kv"], status["faults"]
    assert all(f["state"] == "Cleared" and f["endedAt"] >= f["startedAt"] for f in faults.values()), faults
    assert faults["slow-kv"]["targets"] == ["prefill-0", "prefill-1"]
    summary = status["summary"]
    assert summary["lost"] == 0 and summary["completed"] > 0
    unexpected = set(summary["failed_by_reason"]) - {"backend_failed"}
    assert not unexpected, f"{summary['failed_by_reason']}\n{_logs(api, ns, 'router')}"
    assert [f["name"] for f in summary["faults"]] == ["kill-prefill", "slow-kv"]
    reasons = {e[1] for e in _events(api, ns, "chaos-e2e")}
    assert {"FaultInjected", "FaultCleared"} <= reasons

    def start_fault(name: str, **spec):
        """Create a Fault on chaos-pd; returns a reader of its status."""
        fault = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Fault", "metadata": {"name": name},
                 "spec": {"cluster": "chaos-pd", **spec}}  # fmt: skip
        objs.create_namespaced_custom_object(GROUP, VERSION, ns, "faults", fault)
        return lambda: objs.get_namespaced_custom_object(GROUP, VERSION, ns, "faults", name).get("status") or {}

    # a Fault resource: a live hang, at once, cleared when its duration is over (Events on both objects)
    fault_status = start_fault("hang-decode", kind="hang", durationSeconds=4, target={"instance": "decode-0"})

    active = _wait(
        lambda: fault_status().get("state") == "Active" and fault_status(), 60, "the Fault active", context=op.log
    )
    assert active["targets"] == ["decode-0"] and ": failed: " not in active["message"], active
    cleared = _wait(lambda: fault_status().get("state") == "Cleared" and fault_status(), 60, "the Fault cleared")
    assert cleared["endedAt"] >= cleared["startedAt"]
    assert {"FaultInjected", "FaultCleared"} <= {e[1] for e in _events(api, ns, "chaos-pd")}
    # a stream through the router works again after the hang
    ids, content, _ = _stream_ids(_service_url(api, ns, "chaos-pd-router"), "llama-3.1-8b")
    assert len(ids) == 1 and content == 6
    objs.delete_namespaced_custom_object(GROUP, VERSION, ns, "faults", "hang-decode")

    # a slowdown outlives its pod: decode-0's pod deleted, its StatefulSet recreates it, and once Ready
    # the Fault's timer applies the slowdown again (a FaultReapplied event, a new pod life on record)
    slow_status = start_fault("slow-decode", kind="slow", factor=3, target={"instance": "decode-0"})

    first = _wait(
        lambda: slow_status().get("state") == "Active" and (slow_status().get("appliedTo") or {}).get("decode-0")
        and slow_status(),
        60,
        "the slowdown active on a Ready pod",
        context=op.log,
    )  # fmt: skip
    api.CoreV1Api().delete_namespaced_pod("chaos-pd-decode-0", ns, grace_period_seconds=0)
    again = _wait(
        lambda: (slow_status().get("appliedTo") or {}).get("decode-0") not in (None, first["appliedTo"]["decode-0"])
        and slow_status(),
        POD_WAIT_S,
        "the slowdown re-applied to the recreated pod",
        every=2,
        context=lambda: f"{_pods(api, ns)}\n{op.log()}",
    )  # fmt: skip
    assert again["state"] == "Active"
    reapplied = [e for e in _events(api, ns, "slow-decode") if e[1] == "FaultReapplied"]
    assert reapplied and "decode-0: slow True: ok" in reapplied[0][2], reapplied
    objs.delete_namespaced_custom_object(GROUP, VERSION, ns, "faults", "slow-decode")
    objs.delete_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", "chaos-pd")


# ---- the operator in cluster, by the Helm chart: P/D under tc shaping -----------------------


def _exec(api, ns: str, pod: str, command: list[str]) -> str:
    from kubernetes.stream import stream

    return stream(
        api.CoreV1Api().connect_get_namespaced_pod_exec,
        pod,
        ns,
        command=command,
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
    )


def test_an_afd_engine_and_its_ffn_pod_reconcile_and_exchange_activations(api, operated, k8s):
    """The laptop AFD example on the real cluster: the operator runs the attention engine and the FFN
    instance as pods of their own, the engine finds the FFN pod through peers.json, and a chat through
    the router makes the engine's steps send their activations to the FFN pod and get them back."""
    ns, op = operated
    if not k8s[1]:
        pytest.skip("needs INFEMU_E2E_IMAGE: an image of this checkout the cluster can run")
    objs, apps = api.CustomObjectsApi(), api.AppsV1Api()
    body = _load("moe-qwen3-30b-afd.yaml")
    name = body["metadata"]["name"]
    objs.create_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", body)
    try:
        ic = _ready(api, ns, name, op.log)
        assert ic["status"]["conditions"][0]["message"].startswith("2 instances in 2 pools ready")
        for pool in ("attn", "experts"):
            assert apps.read_namespaced_stateful_set(f"{name}-{pool}", ns).status.ready_replicas == 1
        _, content, _ = _stream_ids(_service_url(api, ns, f"{name}-router"), body["spec"]["model"]["name"])
        assert content == 6
        scrape = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())"
        text = _exec(api, ns, f"{name}-experts-0", ["python", "-c", scrape])
        exchanges = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("infemu_afd_exchanges_total{")
        ]
        assert exchanges and exchanges[0] >= 6, text[-2000:]  # the prompt's prefill and every decode step
    finally:
        objs.delete_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", name)


def test_a_rag_pipeline_runs_through_the_retriever_and_kv_store_pods(api, operated, k8s):
    """The RAG example (one prefill) on the real cluster: the operator runs the retriever and the KV store as
    pods of their own; a pipeline request through the router's /v1/pipelines is retrieved by the retriever
    pod, generated by prefill and decode, and its prompt's blocks are looked up in and written to the store.
    Dense mode too: the two prefill instances share one pod (spec.emulation.instancesPerProcess: 2), each on
    its own port, and the decode pulls KV from the one the router picked at that port."""
    ns, op = operated
    if not k8s[1]:
        pytest.skip("needs INFEMU_E2E_IMAGE: an image of this checkout the cluster can run")
    objs = api.CustomObjectsApi()
    body = _load("rag.yaml")
    body["spec"]["pools"] = [{**p, "replicas": 2 if p["role"] == "prefill" else 1} for p in body["spec"]["pools"]]
    body["spec"]["emulation"] = {"instancesPerProcess": 2}
    name = body["metadata"]["name"]
    objs.create_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", body)
    try:
        ic = _ready(api, ns, name, op.log)
        assert ic["status"]["conditions"][0]["message"].startswith("5 instances in 4 pools ready")
        assert api.AppsV1Api().read_namespaced_stateful_set(f"{name}-prefill", ns).spec.replicas == 1
        # (only the name is printed: the client's exec stream turns printed JSON into a Python repr)
        info = "import json, urllib.request as u; print(json.load(u.urlopen('http://127.0.0.1:%d/internal/info'))['instance'])"
        for slot in (0, 1):  # one pod, two instances, each answering as itself on its own port
            hosted = _exec(api, ns, f"{name}-prefill-0", ["python", "-c", info % (8000 + slot)])
            assert hosted.strip() == f"prefill-{slot}"
        request = {
            "model": body["spec"]["model"]["name"],
            "pipeline": {"type": "rag", "topK": 3},
            "question_tokens": 24,
            "max_tokens": 5,
            "index": 7,
        }
        req = urllib.request.Request(
            f"{_service_url(api, ns, f'{name}-router')}/v1/pipelines",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        events = urllib.request.urlopen(req, timeout=60).read().decode().split("\n\n")
        tokens = [e for e in events if e.startswith("data: {") and '"text"' in e]
        summary = next(json.loads(e[6:])["infemu_pipeline"] for e in events if "infemu_pipeline" in e)
        assert len(tokens) == 5 and [s["stage"] for s in summary["stages"]] == ["retrieval", "generate"]
        scrape = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())"

        def sample(pod: str, metric: str) -> float:
            text = _exec(api, ns, pod, ["python", "-c", scrape])
            return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(metric))

        assert sample(f"{name}-retriever-0", "infemu_retrieval_queries_total") == 1
        _wait(
            lambda: sample(f"{name}-store-0", "infemu_kvstore_blocks{") > 0,
            30,
            "the prefill's blocks written to the store",
        )
        assert sample(f"{name}-store-0", "infemu_kvstore_lookup_blocks_total") > 0
    finally:
        objs.delete_namespaced_custom_object(GROUP, VERSION, ns, "inferenceclusters", name)


def _shaped_bytes(api, ns: str, pod: str) -> int:
    """Bytes sent through the pod's shaped HTB classes (1:10, 1:20, ...; 1:1 is the unshaped default)."""
    text = _exec(api, ns, pod, ["tc", "-s", "class", "show", "dev", "eth0"])
    total, current = 0, None
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["class", "htb"]:
            current = words[2]
        elif words[:1] == ["Sent"] and current not in (None, "1:1"):
            total += int(words[1])
    return total


def test_the_chart_runs_the_operator_in_cluster_and_pd_kv_bytes_cross_the_shaped_class(api, k8s, namespace):
    kubeconfig, image = k8s
    if not image:
        pytest.skip("needs INFEMU_E2E_IMAGE: an image of this checkout the cluster can run")
    helm = pytest.importorskip("helm_python")
    from emulator.build import build_instances
    from emulator.net.plan import link_plan
    from emulator.net.tc import WIRE_PER_PAYLOAD
    from emulator.spec import parse_cluster

    repo, _, tag = image.rpartition(":")
    release = f"infemu-{namespace[-6:]}"
    values = {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "IfNotPresent"},
        "watchNamespaces": [namespace],
        "workers": {"shaping": "tc", "resources": {"cpu": "50m", "memory": "256Mi"}},
    }
    # the chart applies its CRDs server-side; ones created by another client (the fixtures above)
    # would conflict, so hand them over: delete them (no other test uses them any more) and wait
    ext = api.ApiextensionsV1Api()
    objs = api.CustomObjectsApi()
    for plural in ("inferenceclusters", "loadtests"):  # what earlier tests left, without finalizers
        for obj in objs.list_cluster_custom_object(GROUP, VERSION, plural)["items"]:
            meta = obj["metadata"]
            patch = {"metadata": {"finalizers": None}}
            objs.patch_namespaced_custom_object(GROUP, VERSION, meta["namespace"], plural, meta["name"], patch)
            objs.delete_namespaced_custom_object(GROUP, VERSION, meta["namespace"], plural, meta["name"])
    crds = [c.metadata.name for c in ext.list_custom_resource_definition().items if c.spec.group == GROUP]
    for crd in crds:
        ext.delete_custom_resource_definition(crd)
    _wait(
        lambda: not [c for c in ext.list_custom_resource_definition().items if c.spec.group == GROUP],
        180,
        "the CRDs deleted before the chart installs them",
        context=lambda: json.dumps(
            [
                (c.metadata.name, c.status.conditions and [x.to_dict() for x in c.status.conditions])
                for c in ext.list_custom_resource_definition().items
                if c.spec.group == GROUP
            ],
            default=str,
        ),
    )
    cfg = helm.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    cfg.install(
        os.path.join(ROOT, "charts", "infemu"), release, values, namespace=namespace, wait="watcher", timeout=240
    )
    try:
        body = _load("pd-llama70b-h100.yaml")
        name = body["metadata"]["name"]
        api.CustomObjectsApi().create_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceclusters", body)
        operator_pod = lambda: "\n".join(  # noqa: E731
            f"{p.metadata.name}: {p.status.phase}" for p in api.CoreV1Api().list_namespaced_pod(namespace).items
        )
        _ready(api, namespace, name, operator_pod)
        router = _service_url(api, namespace, f"{name}-router")
        ids, content, _ = _stream_ids(router, body["spec"]["model"]["name"])
        assert len(ids) == 1 and content == 6  # one id, every token from the decode (as vLLM's P/D proxy serves it)

        prefills = [
            p.metadata.name
            for p in api.CoreV1Api().list_namespaced_pod(namespace, label_selector="infemu.io/pool=prefill").items
        ]
        before = {p: _shaped_bytes(api, namespace, p) for p in prefills}
        prompt = list(range(1, 3001))
        req = urllib.request.Request(
            f"{router}/v1/completions",
            data=json.dumps(
                {"model": body["spec"]["model"]["name"], "prompt": prompt, "max_tokens": 2, "ignore_eos": True}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert json.loads(urllib.request.urlopen(req, timeout=120).read())["usage"]["prompt_tokens"] == 3000
        grown = {p: _shaped_bytes(api, namespace, p) - before[p] for p in prefills}
        served = max(grown, key=grown.get)  # the prefill the router chose; the decode pulled its KV from it
        # the KV of 3000 tokens over the tier between that prefill and the decode, divided by the
        # tier's byte scale, plus Ethernet/IP/TCP headers (and a little HTTP)
        spec = parse_cluster(body, "pd").spec
        topo, _ = build_instances(spec)
        prefill = topo.by_name(served.removeprefix(f"{name}-"))
        decode = next(i for i in topo.instances if i.role == "decode")
        tier = topo.tier_between(prefill, decode)
        scale = link_plan(spec, topo, prefill)[tier.name].scale
        kv_per_token = 2 * 80 * 8 * 128 * 2  # 2 · layers · kv_heads · head_dim · bf16 bytes (Llama-3.1-70B)
        expected = 3000 * kv_per_token / scale * WIRE_PER_PAYLOAD
        assert grown[served] == pytest.approx(expected, rel=0.15), (grown, expected, tier.name, scale)
    finally:
        cfg.uninstall(release, wait="watcher", timeout=120, ignore_not_found=True)
