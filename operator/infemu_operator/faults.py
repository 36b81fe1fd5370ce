"""A LoadTest's ``spec.faults`` carried out on the target cluster's pods.

Timing is from the load pod's container start (``startedAt``), which ``infemu loadtest`` in that
pod also knows (its PID 1's start), so the per-window accounting it writes lines up with what
the operator did. ``plan_step`` is pure: given the resolved faults, the seconds elapsed and the
status so far, it says what to start, flip (a flapping link) or clear. ``PodFaults`` does it:
a kill deletes the pod with no grace period (its StatefulSet is the supervisor: the pod comes
back and the router re-admits it); hang and slow go to the worker's ``/admin/fault``; link and
partition changes to the senders' ``/admin/link``, and the router's ``/admin/fault`` when a
partition group names the router — all over the pod network, with the cluster's internal token.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from emulator.faults.schedule import ROUTER, Fault, admin_calls, cut_at
from emulator.packing import pod_name, slot_of
from emulator.serve.internal import internal_headers
from emulator.spec import InferenceCluster
from infemu_operator.desired import PORT
from infemu_operator.kube import Kube


@dataclass(frozen=True)
class Step:
    fault: Fault
    action: str  # start | flip | clear | restarted
    cut: bool | None = None  # link faults: cut (True) or degraded (False) after this step


def plan_step(faults: list[Fault], elapsed_s: float, recorded: dict[str, dict]) -> list[Step]:
    """What is due now; ``recorded`` is status.faults by name (absent: not started)."""
    out = []
    for f in faults:
        rec = recorded.get(f.name)
        start = f.at_s or 0.0
        if rec is None:
            if elapsed_s >= start:
                out.append(Step(f, "start", cut_at(f, elapsed_s - start) if f.kind == "link" else None))
            continue
        if rec.get("state") != "Active":
            continue
        if f.duration_s is not None and elapsed_s >= start + f.duration_s:
            out.append(Step(f, "clear"))
        elif f.kind == "link" and f.flap_period_s is not None and rec.get("cut") != cut_at(f, elapsed_s - start):
            out.append(Step(f, "flip", cut_at(f, elapsed_s - start)))
    return out


class PodFaults:
    def __init__(self, kube: Kube, namespace: str, cluster: InferenceCluster, token: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.spec = cluster.spec
        self.cluster = cluster.name
        self.headers = internal_headers(token)

    def pod_name(self, instance: str) -> str:
        """The pod hosting an instance: its own, or a dense pod shared with others (``emulator.packing``)."""
        return pod_name(self.cluster, slot_of(self.spec, instance))

    def pod(self, instance: str) -> dict | None:
        return self.kube.get("v1", "Pod", self.namespace, self.pod_name(instance))

    def instance_url(self, instance: str) -> str | None:
        """An instance's address on the pod network: its pod's IP and its own port."""
        slot = slot_of(self.spec, instance)
        return self._url(self.kube.get("v1", "Pod", self.namespace, pod_name(self.cluster, slot)), slot.slot)

    def _url(self, pod: dict | None, slot: int = 0) -> str | None:
        ip = (pod or {}).get("status", {}).get("podIP")
        return f"http://{ip}:{PORT + slot}" if ip else None

    def _post(self, url: str | None, path: str, body: dict, what: str) -> str:
        if url is None:
            return f"{what}: failed: no pod IP"
        req = urllib.request.Request(
            f"{url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self.headers},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=5):  # the cluster's own pod network
                return f"{what}: ok"
        except (urllib.error.URLError, OSError) as exc:
            return f"{what}: failed: {exc}"

    def routers(self) -> list[dict]:
        return self.kube.list(
            "v1",
            "Pod",
            self.namespace,
            {"app.kubernetes.io/instance": self.cluster, "app.kubernetes.io/component": "router"},
        )

    def apply(self, fault: Fault, on: bool, cut: bool | None = None) -> list[str]:
        """Start (``on``) or clear one fault; one line per member, failures included."""
        lines: list[str] = []
        if fault.kind == "kill" and on:
            for name in fault.instances:
                self.kube.delete("v1", "Pod", self.namespace, self.pod_name(name), grace_period_s=0)
                lines.append(f"{name}: pod deleted")
        urls: dict[str, list[str | None]] = {}
        for call in admin_calls(fault, on, cut):
            if call.target not in urls:
                if call.target == ROUTER:
                    urls[call.target] = [self._url(p) for p in self.routers()]
                else:
                    urls[call.target] = [self.instance_url(call.target)]
            for url in urls[call.target]:
                result = self._post(url, call.path, call.body, call.label)
                if call.reported:
                    lines.append(result)
        return lines

    def incarnations(self, fault: Fault) -> dict[str, str | None]:
        """Which life of its pod each member is in: the pod's uid and its containers' restarts, or None
        while the pod is missing or not Ready. A new value means the process that carried the fault is
        gone (the pod was recreated, or its container restarted)."""
        pods = {
            p["metadata"]["name"]: p
            for p in self.kube.list("v1", "Pod", self.namespace, {"app.kubernetes.io/instance": self.cluster})
        }  # one list a tick, whatever the number of members
        out: dict[str, str | None] = {}
        for name in sorted(fault.members):
            pod = pods.get(self.pod_name(name))
            status = (pod or {}).get("status", {})
            ready = {c["type"]: c["status"] for c in status.get("conditions", [])}.get("Ready") == "True"
            restarts = sum(int(c.get("restartCount", 0)) for c in status.get("containerStatuses", []))
            out[name] = f"{pod['metadata'].get('uid', '')}/{restarts}" if pod is not None and ready else None
        return out

    def reapply_where_restarted(self, fault: Fault, applied: dict, cut: bool | None) -> tuple[dict, list[str]]:
        """A member pod recreated or restarted (and Ready again) since ``fault`` was applied lost it with
        its process; a slow GPU or a damaged link outlives the process, so it goes back on. Returns the
        pods' lives to record and, when it was applied again, one line naming the members and what each
        call did (empty otherwise). A member that was not Ready when the fault was applied (so it never
        got it) gets it once Ready."""
        lives = self.incarnations(fault)
        moved = sorted(n for n, life in lives.items() if life is not None and applied.get(n) != life)
        known = {**applied, **{n: life for n, life in lives.items() if life is not None}}
        if not moved:
            return known, []
        lines = self.apply(fault, True, cut)
        return known, [f"{fault.name}: {', '.join(moved)} restarted; {'; '.join(lines)}"]

    def restarted(self, fault: Fault, since: str) -> bool:
        """A kill is over once every killed pod is back (created after it) and Ready."""
        for name in fault.instances:
            pod = self.pod(name)
            if pod is None or pod["metadata"].get("creationTimestamp", "") < since:
                return False
            conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
            if conditions.get("Ready") != "True":
                return False
        return True
