"""The operator's reconcile is a pure function: every example's children validate against the
Kubernetes 1.30 schemas in strict mode, carry the recommended labels, and keep capabilities
away from the worker container."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, example, example_files, metric_value, restricted_violations

from emulator.cluster.local import http_status
from emulator.spec import load_clusters
from infemu_operator.desired import CONFIG_DIR, OperatorSettings, desired_children, tc_tree_for

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
    tree = [" ".join(c) for c in tc_tree_for(cluster, "prefill-1")]
    assert tree == [" ".join(c) for c in tc_tree_for(cluster, "pd-llama70b-prefill-1")]  # the pod name form
    assert any("match ip tos 0x40" in c for c in tree)  # the scale-out (InfiniBand) class


def _pod_commands(cluster, tmp_path) -> tuple[list[tuple[str, list[str]]], dict[str, int]]:
    """Every worker and router container of the reconcile, as local commands: the ConfigMap's
    files in ``tmp_path``, $(POD_NAME)/$(POD_IP) filled in, and a port per pod (one host)."""
    import socket

    children = desired_children(cluster, "lab", OperatorSettings())
    config = next(o for o in children if o["kind"] == "ConfigMap")
    for name, text in config["data"].items():
        (tmp_path / name).write_text(text)
    ports = {}
    for obj in children:
        if obj["kind"] == "StatefulSet":
            for i in range(obj["spec"]["replicas"]):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    ports[f"{obj['metadata']['name']}-{i}"] = s.getsockname()[1]
    backends = json.loads(config["data"]["backends.json"])
    for b in backends:  # the pods' DNS names, resolved the way cluster DNS would
        pod = f"{cluster.name}-{b['name']}"
        b["url"] = f"http://127.0.0.1:{ports[pod]}"
    (tmp_path / "backends.json").write_text(json.dumps(backends))
    commands = []
    for obj in children:
        if obj["kind"] not in ("StatefulSet", "Deployment"):
            continue
        container = obj["spec"]["template"]["spec"]["containers"][0]
        replicas = obj["spec"]["replicas"]
        for i in range(replicas):
            pod = f"{obj['metadata']['name']}-{i}"
            port = ports.get(pod, 0)
            args = [
                a.replace("$(POD_NAME)", pod).replace("$(POD_IP)", "127.0.0.1").replace(CONFIG_DIR, str(tmp_path))
                for a in container["args"]
            ]
            args[args.index("--port") + 1] = str(port)
            if "--advertise-url" in args:
                args[args.index("--advertise-url") + 1] = f"http://127.0.0.1:{port}"
            commands.append((pod, args))
    return commands, ports


@pytest.mark.slow
def test_the_pods_commands_serve_a_pd_request_with_a_kv_pull_over_the_advertised_url(tmp_path):
    """The containers' args are real: started as processes with the ConfigMap's files, the P/D
    pods serve a streamed request, and decode pulls the KV from prefill's advertised URL."""
    cluster = next(c for c in CLUSTERS if c.name == "pd-llama70b")
    commands, ports = _pod_commands(cluster, tmp_path)
    worker_urls = [f"http://127.0.0.1:{p}" for p in ports.values()]
    procs = []
    try:
        router_port_file = tmp_path / "router.port"
        for pod, args in commands:
            if args[args.index("emulator.cluster.process") + 1] == "router":
                args += ["--port-file", str(router_port_file)]
            assert args[:3] == ["python", "-m", "emulator.cluster.process"]
            log = open(tmp_path / f"{pod}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen([sys.executable, *args[1:]], cwd=ROOT, stdout=log, stderr=log))
        deadline = time.monotonic() + 60
        while not router_port_file.exists() or not all(_ready(u) for u in worker_urls):
            assert time.monotonic() < deadline, [p.read_text()[-500:] for p in tmp_path.glob("*.log")]
            assert all(p.poll() is None for p in procs), [p.read_text()[-800:] for p in tmp_path.glob("*.log")]
            time.sleep(0.2)
        router = f"http://127.0.0.1:{router_port_file.read_text()}"
        while not _ready(router):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        body = {
            "model": cluster.spec.model.name,
            "messages": [{"role": "user", "content": "hello " * 300}],
            "max_tokens": 8,
            "ignore_eos": True,
        }
        req = urllib.request.Request(
            f"{router}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.load(resp)
        assert answer["usage"]["completion_tokens"] == 8
        decode_url = next(f"http://127.0.0.1:{p}" for pod, p in ports.items() if "decode" in pod)
        assert metric_value(decode_url, "infemu_kv_transfer_bytes_total") > 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)


def _ready(url: str) -> bool:
    return http_status(f"{url}/ready") == 200


def test_a_spec_change_rolls_pods_out_but_scaling_restarts_only_the_router():
    from infemu_operator.desired import CONFIG_HASH

    base = next(c for c in CLUSTERS if c.name == "pd-llama70b")

    def hashes(cluster):
        return {
            o["metadata"]["name"]: o["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH]
            for o in desired_children(cluster, "lab")
            if o["kind"] in ("StatefulSet", "Deployment")
        }

    doc = base.model_dump(by_alias=True, exclude_none=True)
    scaled = json.loads(json.dumps(doc))
    scaled["spec"]["pools"][0]["replicas"] = 1
    changed = json.loads(json.dumps(doc))
    changed["spec"]["slo"]["ttftMs"] = 123.0
    before = hashes(base)
    after_scale = hashes(type(base).model_validate(scaled))
    after_change = hashes(type(base).model_validate(changed))
    assert {n for n in before if before[n] != after_scale[n]} == {"pd-llama70b-router"}
    assert all(before[n] != after_change[n] for n in before)


@pytest.mark.parametrize("cluster", CLUSTERS, ids=[c.name for c in CLUSTERS])
def test_inproc_pods_pass_pod_security_restricted_and_tc_pods_need_only_net_admin(cluster):
    from emulator.loadtest import parse_loadtest
    from infemu_operator.loadtest import loadtest_job

    for shaping in ("inproc", "tc"):
        pods = [
            o["spec"]["template"]["spec"]
            for o in desired_children(cluster, "lab", OperatorSettings(shaping=shaping))
            if o["kind"] in ("StatefulSet", "Deployment")
        ]
        problems = [p for pod in pods for p in restricted_violations(pod)]
        if shaping == "inproc":
            assert problems == []
        else:  # only the init container breaks the profile, and only by NET_ADMIN as root
            assert problems and all(p.startswith("tc-init:") for p in problems), problems
    lt = parse_loadtest({"kind": "LoadTest", "metadata": {"name": "x"}, "spec": {"cluster": cluster.name}})
    assert restricted_violations(loadtest_job(lt, cluster, "lab", OperatorSettings())["spec"]["template"]["spec"]) == []


def test_router_and_workers_share_an_internal_token_keyed_by_the_clusters_uid():
    """The token that lets only the router hand out KV-transfer parameters (serve/internal.py)."""
    cluster = load_clusters(example("pd-llama70b-h100.yaml"))[0]

    def tokens(uid):
        out = set()
        for o in desired_children(cluster, "lab", uid=uid):
            if o["kind"] in ("StatefulSet", "Deployment"):
                for c in o["spec"]["template"]["spec"]["containers"]:
                    out |= {e["value"] for e in c.get("env", []) if e["name"] == "INFEMU_INTERNAL_TOKEN"}
        return out

    (a,) = tokens("uid-a")
    assert tokens("uid-a") == {a} and tokens("uid-b") != {a} and len(a) == 32


def test_an_afd_engine_gets_its_ffn_pods_as_peers_and_the_router_does_not():
    (cluster,) = load_clusters(example("moe-qwen3-30b-afd.yaml"))
    children = desired_children(cluster, "lab")
    config = json.loads(children[0]["data"]["peers.json"])
    assert [p["name"] for p in config] == ["experts-0"]
    assert config[0]["url"] == "http://qwen3-30b-afd-experts-0.qwen3-30b-afd-experts.lab.svc.cluster.local:8000"
    assert [b["name"] for b in json.loads(children[0]["data"]["backends.json"])] == ["attn-0"]
    sets = {c["metadata"]["name"]: c for c in children if c["kind"] == "StatefulSet"}
    args = {n: s["spec"]["template"]["spec"]["containers"][0]["args"] for n, s in sets.items()}
    assert f"{CONFIG_DIR}/peers.json" in args["qwen3-30b-afd-attn"]
    assert "--peers" not in args["qwen3-30b-afd-experts"]
    # FFN pods carry no gateway role label: an inference gateway never picks them
    assert "llm-d.ai/role" not in sets["qwen3-30b-afd-experts"]["spec"]["template"]["metadata"]["labels"]


def test_rag_and_kvstore_pools_become_statefulsets_that_the_prefill_engines_and_the_router_reach():
    (cluster,) = load_clusters(example("rag.yaml"))
    children = desired_children(cluster, "lab")
    peers = {p["name"]: p for p in json.loads(children[0]["data"]["peers.json"])}
    assert set(peers) == {"retriever-0", "store-0"}
    assert peers["store-0"]["url"] == "http://rag-store-0.rag-store.lab.svc.cluster.local:8000"
    assert {b["name"] for b in json.loads(children[0]["data"]["backends.json"])} == {
        "prefill-0",
        "prefill-1",
        "decode-0",
    }
    sets = {c["metadata"]["name"]: c for c in children if c["kind"] == "StatefulSet"}
    assert {"rag-retriever", "rag-store", "rag-prefill", "rag-decode"} <= set(sets)
    args = {n: s["spec"]["template"]["spec"]["containers"][0]["args"] for n, s in sets.items()}
    assert "--peers" in args["rag-prefill"]  # the prefill engines use the KV store
    assert "--peers" not in args["rag-decode"] and "--peers" not in args["rag-store"]
    router = next(c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"] == "rag-router")
    assert f"{CONFIG_DIR}/peers.json" in router["spec"]["template"]["spec"]["containers"][0]["args"]  # retrievers
    for name in ("rag-retriever", "rag-store"):  # services, not inference endpoints
        assert "llm-d.ai/role" not in sets[name]["spec"]["template"]["metadata"]["labels"]


def _dense(replicas: int, per_pod: int, inference_pool: bool = False):
    from emulator.spec import InferenceCluster

    doc = next(c for c in CLUSTERS if c.name == "quickstart").model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["pools"][0]["replicas"] = replicas
    doc["spec"]["topology"].update(nodes=-(-replicas // 8), gpusPerNode=min(replicas, 8))
    doc["spec"]["emulation"] = {"instancesPerProcess": per_pod}
    if inference_pool:
        doc["spec"]["gateway"] = {"inferencePool": {"enabled": True}}
    return InferenceCluster.model_validate(doc)


def test_a_dense_pool_packs_its_instances_into_fewer_pods_one_port_each():
    """Dense mode (spec.emulation.instancesPerProcess on Kubernetes): five instances, two to a pod, in
    three pods; each instance its own port, backend URL and InferencePool endpoint; links paced in-process
    (no tc-init: one pod's tc tree cannot tell its instances apart)."""
    from infemu_operator.desired import CONFIG_HASH

    cluster = _dense(5, 2)
    children = desired_children(cluster, "lab", OperatorSettings(shaping="tc"))
    for obj in children:
        kubernetes_validate.validate(obj, "1.30", strict=True)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in children}
    sts = by_kind[("StatefulSet", "quickstart-agg")]
    assert sts["spec"]["replicas"] == 3
    pod = sts["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    args = worker["args"]
    assert args[args.index("--pod") + 1] == "$(POD_NAME)" and args[args.index("--advertise-host") + 1] == "$(POD_IP)"
    assert "--instance" not in args and args[args.index("--shaping") + 1] == "inproc" and "initContainers" not in pod
    assert [(p["name"], p["containerPort"]) for p in worker["ports"]] == [("http", 8000), ("http-1", 8001)]
    service = by_kind[("Service", "quickstart-agg")]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", 8000, "http"),
        ("http-1", 8001, "http-1"),
    ]
    backends = json.loads(by_kind[("ConfigMap", "quickstart-config")]["data"]["backends.json"])
    urls = {b["name"]: b["url"] for b in backends}
    assert urls["agg-3"] == "http://quickstart-agg-1.quickstart-agg.lab.svc.cluster.local:8001"
    assert urls["agg-4"] == "http://quickstart-agg-2.quickstart-agg.lab.svc.cluster.local:8000"
    pool = next(o for o in desired_children(_dense(6, 2, inference_pool=True), "lab") if o["kind"] == "InferencePool")
    assert pool["spec"]["targetPorts"] == [{"number": 8000}, {"number": 8001}]

    def digest(c):
        objs = desired_children(c, "lab")
        return next(o for o in objs if o["kind"] == "StatefulSet")["spec"]["template"]["metadata"]["annotations"][
            CONFIG_HASH
        ]

    # which instances a dense pod hosts changes with the count: scaling rolls the pool's pods
    assert digest(_dense(6, 2)) != digest(_dense(5, 2))


def test_which_instances_a_dense_pod_hosts():
    from emulator.packing import Slot, pod_count, pod_members, slot_of

    spec = _dense(5, 2).spec
    assert pod_count(spec, spec.pools[0]) == 3
    assert [pod_members(spec, "quickstart", f"quickstart-agg-{j}") for j in range(3)] == [
        ["agg-0", "agg-1"],
        ["agg-2", "agg-3"],
        ["agg-4"],
    ]
    assert slot_of(spec, "agg-3") == Slot("agg", 1, 1)
    for pod in ("quickstart-agg-3", "quickstart-other-0", "quickstart-agg-x"):
        with pytest.raises(KeyError):
            pod_members(spec, "quickstart", pod)
    with pytest.raises(KeyError):
        slot_of(spec, "agg-5")


def test_an_inference_pool_takes_at_most_eight_ports_per_pod():
    from emulator.validation import cross_field_problems

    problems = cross_field_problems(_dense(9, 9, inference_pool=True))
    assert any(p.startswith("spec.emulation.instancesPerProcess: 9") and "at most 8" in p for p in problems)
    assert not cross_field_problems(_dense(8, 8, inference_pool=True))


def test_an_inference_pool_refuses_a_dense_pool_whose_last_pod_is_partly_empty():
    """The InferencePool lists the same ports for every pod: 5 instances at 2 per pod would leave the
    third pod's second port with nothing behind it."""
    from emulator.validation import cross_field_problems

    problems = cross_field_problems(_dense(5, 2, inference_pool=True))
    assert len(problems) == 1 and problems[0].startswith("spec.pools[0].replicas: 5 instances at 2 per pod")
    assert "multiple of 2 (e.g. 6)" in problems[0]
    assert not cross_field_problems(_dense(6, 2, inference_pool=True))
    assert not cross_field_problems(_dense(5, 2))  # without an InferencePool the last pod hosts what is left


@pytest.mark.slow
def test_a_dense_pods_command_hosts_its_instances_on_consecutive_ports(tmp_path):
    """The dense worker container's args, run as a process with the ConfigMap's files: pod 1 of a pool of
    three instances two to a pod hosts agg-2 on the base port and nothing else; pod 0 hosts agg-0 and
    agg-1 on the base port and the next, each answering as itself."""
    import socket

    cluster = _dense(3, 2)
    children = desired_children(cluster, "lab", OperatorSettings())
    config = next(o for o in children if o["kind"] == "ConfigMap")
    for name, text in config["data"].items():
        (tmp_path / name).write_text(text)
    container = next(o for o in children if o["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]

    def free_pair() -> int:
        while True:
            with socket.socket() as a:
                a.bind(("127.0.0.1", 0))
                base = a.getsockname()[1]
                with socket.socket() as b:
                    try:
                        b.bind(("127.0.0.1", base + 1))
                    except OSError:
                        continue
                    return base

    procs, hosted = [], {}
    try:
        for j in range(2):
            base = free_pair()
            args = [
                a.replace("$(POD_NAME)", f"quickstart-agg-{j}")
                .replace("$(POD_IP)", "127.0.0.1")
                .replace(CONFIG_DIR, str(tmp_path))
                for a in container["args"]
            ]
            args[args.index("--host") + 1] = "127.0.0.1"
            args[args.index("--port") + 1] = str(base)
            log = open(tmp_path / f"pod-{j}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen([sys.executable, *args[1:]], cwd=ROOT, stdout=log, stderr=log))
            hosted.update({f"agg-{2 * j + s}": f"http://127.0.0.1:{base + s}" for s in range(2 - j)})
        deadline = time.monotonic() + 60
        while not all(_ready(u) for u in hosted.values()):
            assert time.monotonic() < deadline, [p.read_text()[-800:] for p in tmp_path.glob("*.log")]
            assert all(p.poll() is None for p in procs), [p.read_text()[-800:] for p in tmp_path.glob("*.log")]
            time.sleep(0.2)
        for name, url in hosted.items():
            with urllib.request.urlopen(f"{url}/internal/info", timeout=10) as resp:
                assert json.load(resp)["instance"] == name
        lone = int(hosted["agg-2"].rsplit(":", 1)[1])
        assert http_status(f"http://127.0.0.1:{lone + 1}/ready") != 200  # pod 1 hosts one instance only
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
