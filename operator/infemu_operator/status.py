"""An InferenceCluster's status as a pure function of its children (and of the spec's validity).

Conditions follow the Kubernetes API conventions (``metav1.Condition``): ``Ready`` when every
pool has all its replicas ready and the router is available; ``Progressing`` while a rollout is
under way (the operator has not yet observed the latest generation, or a pool's updated or
ready replicas are below the desired count within the progress deadline — 600 s after the
last apply, Deployment's default ``progressDeadlineSeconds``); ``Degraded`` when something is
short past that deadline (crash loop, unschedulable), or the spec itself cannot be used.
``lastTransitionTime`` moves only when a condition's status changes, so watchers see real
transitions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

PROGRESS_DEADLINE_S = 600.0  # Deployment's default progressDeadlineSeconds (apps/v1 API reference)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, ok: bool, reason: str, message: str) -> dict:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message}


def merge_conditions(old: Iterable[dict] | None, new: Iterable[dict], at: str | None = None) -> list[dict]:
    """New conditions, keeping each one's ``lastTransitionTime`` unless its status changed."""
    at = at or now()
    before = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        prev = before.get(c["type"])
        same = prev is not None and prev.get("status") == c["status"] and prev.get("lastTransitionTime")
        out.append({**c, "lastTransitionTime": prev["lastTransitionTime"] if same else at})
    return out


def router_endpoint(cluster: str, namespace: str) -> str:
    return f"http://{cluster}-router.{namespace}.svc.cluster.local"


def pool_status(pools: list[tuple[str, str, int, int]], statefulsets: dict[str, dict]) -> list[dict]:
    """``pools`` is (name, role, desired instances, instances per pod) from the spec; ``statefulsets``
    maps pool name to the live object. Counts are instances: a dense pod (``emulator.packing``)
    hosts several, all ready when its process is (only the last pod may host fewer)."""
    out = []
    for name, role, desired, per_pod in pools:
        st = (statefulsets.get(name) or {}).get("status", {})
        out.append(
            {
                "name": name,
                "role": role,
                "desired": desired,
                "ready": min(int(st.get("readyReplicas") or 0) * per_pod, desired),
                "updated": min(int(st.get("updatedReplicas") or 0) * per_pod, desired),
            }
        )
    return out


def counted(n: int, noun: str) -> str:
    """'1 instance', '3 instances': status texts are read by people in `kubectl get`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def cluster_status(
    *,
    generation: int,
    observed_generation: int | None,
    pools: list[dict],
    router: dict | None,
    endpoint: str,
    since_apply_s: float,
    deadline_s: float = PROGRESS_DEADLINE_S,
) -> dict:
    """The status block (without ``lastTransitionTime``; ``merge_conditions`` adds it)."""
    router_st = (router or {}).get("status", {})
    router_ready = int(router_st.get("availableReplicas") or 0) >= 1
    short = [p for p in pools if p["ready"] < p["desired"]]
    stale = [p for p in pools if p["updated"] < p["desired"]]
    ready = not short and router_ready
    in_time = since_apply_s < deadline_s
    progressing = observed_generation != generation or ((bool(stale) or not ready) and in_time)
    if ready:
        summary = (
            f"{counted(sum(p['ready'] for p in pools), 'instance')} in {counted(len(pools), 'pool')} ready; "
            f"router {endpoint}"
        )
    else:
        parts = [f"pool {p['name']}: {p['ready']}/{p['desired']} ready" for p in short]
        if not router_ready:
            parts.append("router: not available")
        summary = "; ".join(parts)
    degraded = not ready and not progressing
    return {
        "observedGeneration": observed_generation,
        "pools": [{k: p[k] for k in ("name", "role", "ready", "desired")} for p in pools],
        "router": endpoint,
        "conditions": [
            condition("Ready", ready, "AllReplicasReady" if ready else "ReplicasUnavailable", summary),
            condition("Progressing", progressing, "RollingOut" if progressing else "Complete", summary),
            condition("Degraded", degraded, "ProgressDeadlineExceeded" if degraded else "AsExpected", summary),
        ],
    }


def invalid_spec_status(generation: int, problems: list[str]) -> dict:
    """The spec cannot be used: no children are made; the field errors go into the conditions."""
    message = "; ".join(problems)
    return {
        "observedGeneration": generation,
        "conditions": [
            condition("Ready", False, "InvalidSpec", message),
            condition("Progressing", False, "InvalidSpec", "waiting for a valid spec"),
            condition("Degraded", True, "InvalidSpec", message),
        ],
    }
