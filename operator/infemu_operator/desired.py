"""Reconcile as a pure function: an ``InferenceCluster`` in, the children it should have out.

Per pool a StatefulSet (stable pod names carry each instance's emulated node/GPU identity, so
tiers follow the emulated topology, not the Kubernetes node) with a headless Service; the
router Deployment and Service; a ConfigMap with the spec, the placement and the tier matrix,
and the router's backend list. Workers run as non-root with a read-only root filesystem and
no capabilities; with ``shaping: tc`` an init container — the only one with NET_ADMIN —
installs the pod's static TOS-classified HTB/TBF tree. The handlers apply these idempotently
and adopt them with owner references.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import yaml

from emulator.build import build_instances
from emulator.net.plan import link_plan
from emulator.packing import per_pod, pod_count, pod_name, slot_of
from emulator.roles import get_role
from emulator.serve.internal import TOKEN_ENV
from emulator.spec import InferenceCluster
from infemu_operator.gateway import inference_pool
from infemu_operator.gateway import pod_labels as gateway_pod_labels

PORT = 8000
CONFIG_DIR = "/etc/infemu"
CONFIG_HASH = "infemu.io/config-hash"
# the pod name is the instance identity (<cluster>-<pool>-<ordinal>): both containers read it
POD_NAME_ENV = ({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},)
# the pod IP is where peers pull KV from (the worker listens on 0.0.0.0)
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


@dataclass(frozen=True)
class OperatorSettings:
    """What the chart's values decide for every child (the operator reads them from its env)."""

    image: str = "ghcr.io/infemu/infemu:0.1.0"
    shaping: str = "inproc"  # inproc | tc
    cpu: str = "250m"
    memory: str = "256Mi"
    pull_policy: str = "IfNotPresent"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorSettings:
        env = dict(os.environ if env is None else env)
        d = cls()
        shaping = env.get("INFEMU_SHAPING", d.shaping)
        if shaping not in ("inproc", "tc"):
            raise ValueError(f"INFEMU_SHAPING={shaping!r}: use inproc or tc")
        return cls(
            image=env.get("INFEMU_IMAGE", d.image),
            shaping=shaping,
            cpu=env.get("INFEMU_WORKER_CPU", d.cpu),
            memory=env.get("INFEMU_WORKER_MEMORY", d.memory),
            pull_policy=env.get("INFEMU_IMAGE_PULL_POLICY", d.pull_policy),
        )


def labels(instance: str, component: str, pool: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "infemu",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "infemu",
        "app.kubernetes.io/managed-by": "infemu-operator",
    }
    if pool:
        out["infemu.io/pool"] = pool
    return out


def object_meta(name: str, namespace: str, lbl: dict) -> dict:
    return {"name": name, "namespace": namespace, "labels": lbl}


def security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},  # required by Pod Security "restricted"
    }


def _probe(path: str) -> dict:
    return {"httpGet": {"path": path, "port": PORT}, "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3}


def resources(s: OperatorSettings) -> dict:
    return {"requests": {"cpu": s.cpu, "memory": s.memory}, "limits": {"memory": s.memory}}


def _config_volume(cluster: InferenceCluster) -> tuple[dict, dict]:
    volume = {"name": "config", "configMap": {"name": f"{cluster.name}-config"}}
    mount = {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}
    return volume, mount


def internal_token(uid: str) -> str:
    """The cluster's internal token (emulator/serve/internal.py), derived from the
    InferenceCluster's uid: stable for the object's life (no pod restarts), different for every
    object, and unknown to the network clients it keeps out (they never see the uid). Kept out
    of a Secret so the operator needs no access to Secrets at all."""
    return hashlib.sha256(f"infemu-internal:{uid}".encode()).hexdigest()[:32]


def _token_env(uid: str | None) -> list[dict]:
    return [{"name": TOKEN_ENV, "value": internal_token(uid)}] if uid else []


def port_name(slot: int) -> str:
    """The pod's ports: ``http`` for its first (or only) instance, ``http-<s>`` for the others."""
    return "http" if slot == 0 else f"http-{slot}"


def _serving_container(name: str, args: list[str], settings: OperatorSettings, mount: dict, instances: int = 1) -> dict:
    """A worker or router container: HTTP port(s), probes, resources, locked-down security context."""
    return {
        "name": name,
        "image": settings.image,
        "imagePullPolicy": settings.pull_policy,
        "args": ["python", "-m", "emulator.cluster.process", *args, "--host", "0.0.0.0", "--port", str(PORT)],
        "ports": [{"name": port_name(s), "containerPort": PORT + s} for s in range(instances)],
        "readinessProbe": _probe("/ready"),
        "livenessProbe": _probe("/health"),
        "resources": resources(settings),
        "securityContext": security_context(),
        "volumeMounts": [mount, {"name": "tmp", "mountPath": "/tmp"}],
    }


def config_hash(cluster: InferenceCluster, with_replicas: bool, dense_pool: str | None = None) -> str:
    """A digest of the spec in the pod template, so a spec change rolls the pods out (they read
    the spec from the ConfigMap, which Kubernetes does not watch for them). Workers leave the
    replica counts out — scaling a pool must not restart every worker of every pool — while the
    router includes them: its backend list changes, and it is stateless and quick to restart.
    A dense pool's pods (``emulator.packing``) keep their own pool's count: which instances a pod
    hosts changes with it."""
    doc = cluster.spec.model_dump(by_alias=True, exclude_none=True)
    if not with_replicas:
        for pool in doc["pools"]:
            if pool["name"] != dense_pool:
                pool.pop("replicas", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def config_map(cluster: InferenceCluster, namespace: str) -> dict:
    topo, _ = build_instances(cluster.spec)
    doc = cluster.model_dump(by_alias=True, exclude_none=True, exclude={"status"})

    def entry(i) -> dict:
        return {"name": i.name, "role": i.role, "url": instance_url(cluster, namespace, i.name)}

    backends = [entry(i) for i in topo.instances if get_role(i.role).engine]  # what the router sends to
    peers = [entry(i) for i in topo.instances if not get_role(i.role).engine]  # services: ffn, rag, kvstore
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(f"{cluster.name}-config", namespace, labels(cluster.name, "config")),
        "data": {
            "cluster.yaml": yaml.safe_dump(doc, sort_keys=False),
            "topology.json": json.dumps({"cluster": cluster.name, **topo.to_json()}),
            "backends.json": json.dumps(backends),
            "peers.json": json.dumps(peers),
        },
    }


def instance_url(cluster: InferenceCluster, namespace: str, instance: str) -> str:
    """An instance's address inside the cluster: its pod's stable DNS name and its own port."""
    slot = slot_of(cluster.spec, instance)
    host = f"{pod_name(cluster.name, slot)}.{cluster.name}-{slot.pool}.{namespace}.svc.cluster.local"
    return f"http://{host}:{PORT + slot.slot}"


def _spec_args(cluster: InferenceCluster) -> list[str]:
    """Where every container of a cluster reads its spec: the ConfigMap's cluster.yaml."""
    return ["--spec", f"{CONFIG_DIR}/cluster.yaml", "--cluster", cluster.name]


def _pod_template(lbl: dict, containers: list[dict], volume: dict, config_digest: str) -> dict:
    """A worker or router pod: scrape annotations, the config hash that rolls it, /tmp, config."""
    return {
        "metadata": {
            "labels": lbl,
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(PORT),
                "prometheus.io/path": "/metrics",
                CONFIG_HASH: config_digest,
            },
        },
        "spec": {
            "containers": containers,
            "volumes": [volume, {"name": "tmp", "emptyDir": {}}],
            "enableServiceLinks": False,
        },
    }


def _uses_services(cluster: InferenceCluster, pool) -> bool:
    """An AFD engine (its FFN pods) or a front engine of a cluster with a KV store."""
    if pool.afd is not None:
        return True
    has_store = any(p.role == "kvstore" and p.replicas > 0 for p in cluster.spec.pools)
    return has_store and get_role(pool.role).front


def pool_objects(
    cluster: InferenceCluster, namespace: str, pool, settings: OperatorSettings, uid: str | None = None
) -> list[dict]:
    name = f"{cluster.name}-{pool.name}"
    lbl = labels(cluster.name, pool.role, pool.name)
    volume, mount = _config_volume(cluster)
    dense = per_pod(cluster.spec, pool)
    # dense pods pace their links in-process, as a local process hosting several instances does:
    # one pod's tc tree cannot tell its instances' traffic apart
    shaping = settings.shaping if dense == 1 else "inproc"
    hosting = (
        ["--instance", "$(POD_NAME)", "--advertise-url", f"http://$(POD_IP):{PORT}"]
        if dense == 1
        else ["--pod", "$(POD_NAME)", "--advertise-host", "$(POD_IP)"]
    )
    worker = _serving_container(
        "worker",
        [
            "worker",
            *_spec_args(cluster),
            *hosting,
            "--shaping",
            shaping,
            # an AFD engine sends its MoE layers' activations to its FFN instances' pods; engines that take a
            # request's first leg use the KV store
            *(["--peers", f"{CONFIG_DIR}/peers.json"] if _uses_services(cluster, pool) else []),
        ],
        settings,
        mount,
        instances=dense,
    )
    worker["env"] = [*POD_NAME_ENV, POD_IP_ENV, *_token_env(uid)]
    # workers leave replica counts out of their hash: scaling one pool must not restart the others
    # (a dense pool keeps them: its pods' instance sets change with the count)
    pod_lbl = {**lbl, **gateway_pod_labels(cluster, pool.role)}
    digest = config_hash(cluster, with_replicas=False, dense_pool=pool.name if dense > 1 else None)
    template = _pod_template(pod_lbl, [worker], volume, digest)
    selector = {"app.kubernetes.io/instance": cluster.name, "infemu.io/pool": pool.name}
    if shaping == "tc":
        template["spec"]["initContainers"] = [
            {
                "name": "tc-init",
                "image": settings.image,
                "imagePullPolicy": settings.pull_policy,
                "args": ["python", "-m", "infemu_operator.tcinit", *_spec_args(cluster), "--instance", "$(POD_NAME)"],
                "env": list(POD_NAME_ENV),
                "securityContext": {
                    "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
                    "runAsUser": 0,
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                },
                "volumeMounts": [mount],
            }
        ]
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": object_meta(name, namespace, lbl),
        "spec": {
            "serviceName": name,
            "replicas": pod_count(cluster.spec, pool),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": template,
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(name, namespace, lbl),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": selector,
            "ports": [{"name": port_name(s), "port": PORT + s, "targetPort": port_name(s)} for s in range(dense)],
        },
    }
    return [statefulset, service]


def router_objects(
    cluster: InferenceCluster, namespace: str, settings: OperatorSettings, uid: str | None = None
) -> list[dict]:
    name = f"{cluster.name}-router"
    lbl = labels(cluster.name, "router")
    volume, mount = _config_volume(cluster)
    has_rag = any(p.role == "rag" and p.replicas > 0 for p in cluster.spec.pools)
    container = _serving_container(
        "router",
        [
            "router",
            *_spec_args(cluster),
            "--backends",
            f"{CONFIG_DIR}/backends.json",
            *(["--peers", f"{CONFIG_DIR}/peers.json"] if has_rag else []),  # its retrievers
        ],
        settings,
        mount,
    )
    if uid:
        container["env"] = _token_env(uid)
    selector = {"app.kubernetes.io/instance": cluster.name, "app.kubernetes.io/component": "router"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(name, namespace, lbl),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            # the router's hash includes the replica counts: its backend list changes with them
            "template": _pod_template(lbl, [container], volume, config_hash(cluster, with_replicas=True)),
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(name, namespace, lbl),
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }
    return [deployment, service]


def desired_children(
    cluster: InferenceCluster, namespace: str, settings: OperatorSettings | None = None, uid: str | None = None
) -> list[dict]:
    """Every child object of one InferenceCluster, in apply order (config first, router last)."""
    settings = settings or OperatorSettings()
    out = [config_map(cluster, namespace)]
    for pool in cluster.spec.pools:
        out += pool_objects(cluster, namespace, pool, settings, uid)
    out += router_objects(cluster, namespace, settings, uid)
    pool = inference_pool(cluster, namespace, PORT, labels(cluster.name, "inference-pool"))
    if pool is not None:
        out.append(pool)
    return out


def tc_tree_for(cluster: InferenceCluster, instance: str) -> list[list[str]]:
    """The tc commands the init container runs for one instance (pure, testable)."""
    from emulator.net.tc import TierClass, tree_commands

    topo, _ = build_instances(cluster.spec)
    try:
        inst = topo.by_name(instance)
    except KeyError:  # a pod name: <cluster>-<pool>-<ordinal>
        inst = topo.by_name(instance.removeprefix(f"{cluster.name}-"))
    plan = link_plan(cluster.spec, topo, inst)
    return tree_commands(
        "eth0", [TierClass(p.tier.kind, p.wire_rate, 10 * (i + 1)) for i, p in enumerate(plan.values())]
    )
