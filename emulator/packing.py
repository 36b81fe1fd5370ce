"""Where an instance lives on Kubernetes when a pod hosts several (dense mode).

By default a pod hosts one instance and is named after it (``<cluster>-<pool>-<n>``: the
instance's emulated node and GPU follow the pod name). With ``spec.emulation.instancesPerProcess``
K above 1 an engine pool's StatefulSet runs ceil(replicas / K) pods instead, and pod ``j`` hosts
the pool's instances ``j*K .. j*K+K-1`` in one worker process, instance ``j*K+s`` on port
``base + s`` — so a 64-instance fleet fits a small cluster's pod and memory budget. Services
(FFN, retriever, KV store) keep one pod each. The operator (StatefulSets, Services, the router's
backend list, faults) and the worker process (which instances to host) both read this mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.roles import get_role
from emulator.spec import ClusterSpec, PoolSpec


@dataclass(frozen=True)
class Slot:
    """One instance's home: its pool's ``ordinal``-th pod, ``slot``-th port from the base port."""

    pool: str
    ordinal: int
    slot: int


def per_pod(spec: ClusterSpec, pool: PoolSpec) -> int:
    """Instances one pod of this pool hosts."""
    return spec.emulation.instances_per_process if get_role(pool.role).engine else 1


def pod_count(spec: ClusterSpec, pool: PoolSpec) -> int:
    """The pool's StatefulSet replicas: its instances, K to a pod (the last pod may host fewer)."""
    k = per_pod(spec, pool)
    return -(-pool.replicas // k)


def _pool(spec: ClusterSpec, name: str) -> PoolSpec:
    for pool in spec.pools:
        if pool.name == name:
            return pool
    raise KeyError(name)


def slot_of(spec: ClusterSpec, instance: str) -> Slot:
    """The pod and port of an instance named ``<pool>-<n>``."""
    pool_name, _, index = instance.rpartition("-")
    pool = _pool(spec, pool_name)
    n = int(index)
    if not 0 <= n < pool.replicas:
        raise KeyError(instance)
    k = per_pod(spec, pool)
    return Slot(pool.name, n // k, n % k)


def pod_members(spec: ClusterSpec, cluster: str, pod: str) -> list[str]:
    """The instances pod ``<cluster>-<pool>-<j>`` hosts, in port order."""
    pool_name, _, ordinal = pod.removeprefix(f"{cluster}-").rpartition("-")
    try:
        pool, j = _pool(spec, pool_name), int(ordinal)
    except (KeyError, ValueError):
        raise KeyError(pod) from None
    k = per_pod(spec, pool)
    members = [f"{pool.name}-{n}" for n in range(j * k, min((j + 1) * k, pool.replicas))]
    if not members:
        raise KeyError(pod)
    return members


def pod_name(cluster: str, slot: Slot) -> str:
    return f"{cluster}-{slot.pool}-{slot.ordinal}"
