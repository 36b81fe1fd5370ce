"""kopf handlers: thin (``register`` attaches them to a registry). Parse, call the pure reconcile, apply, write status.

InferenceCluster: create/update/resume apply ``desired_children`` (create, or patch on
conflict) adopted with owner references — deletion is garbage collection's job, so there is no
deletion handler. Pools removed from the spec are pruned. An invalid spec gives ``Ready=False``
with the field errors and no children (and no retry loop: the next edit triggers the update
handler). A timer refreshes the status from the children.

LoadTest: creation starts a Job (``infemu_operator.loadtest``); a timer follows it while it
runs and, when it ends, copies the summary into the status and a ConfigMap.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from emulator.errors import SpecError
from emulator.faults.resource import FAULT_KIND, parse_fault_resource, resolve_resource
from emulator.faults.schedule import cut_at
from emulator.loadtest import LOADTEST_KIND, parse_loadtest
from emulator.packing import per_pod
from emulator.spec import API_VERSION, KIND, InferenceCluster, parse_cluster
from infemu_operator.crds import FAULT_PLURAL, GROUP, LOADTEST_PLURAL, PLURAL, VERSION
from infemu_operator.desired import OperatorSettings, desired_children, internal_token
from infemu_operator.events import Event, condition_events, failing_pods, pod_events
from infemu_operator.faults import PodFaults, plan_step
from infemu_operator.gateway import INFERENCE_POOL_API, INFERENCE_POOL_KIND
from infemu_operator.kube import Kube, api_message, load_config
from infemu_operator.loadtest import (
    attainment_text,
    fault_problems_of,
    fault_schedule,
    job_name,
    job_outcome,
    loadtest_job,
    summary_config_map,
)
from infemu_operator.status import (
    cluster_status,
    condition,
    invalid_spec_status,
    merge_conditions,
    now,
    pool_status,
    router_endpoint,
)

STATUS_INTERVAL_S = 10.0
LOADTEST_INTERVAL_S = 5.0
FAULT_INTERVAL_S = 1.0  # a LoadTest's faults start and end within a second of their time
PRUNABLE = (("apps/v1", "StatefulSet"), ("v1", "Service"), (INFERENCE_POOL_API, INFERENCE_POOL_KIND))


FINALIZER = f"{GROUP}/kopf-finalizer"


class Runtime:
    """The process-wide API client and settings, set up once at operator startup."""

    kube: Kube | None = None
    settings: OperatorSettings = OperatorSettings()
    namespaces: tuple[str, ...] = ()  # empty: every namespace


def _kube() -> Kube:
    if Runtime.kube is None:
        load_config()
        Runtime.kube = Kube()
    return Runtime.kube


def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    Runtime.settings = OperatorSettings.from_env()
    # Events are posted deliberately (infemu_operator.events), not from every logger line
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
    # kopf holds a finalizer on each resource while its timers run; it blocks nothing while the
    # operator runs (there is no deletion handler) and is released at shutdown (below)
    settings.persistence.finalizer = FINALIZER
    # On deletion kopf stops the resource's timers before it drops that finalizer. A timer that has
    # not exited after a few zero-time cycles (its status call in flight) was polled again only after
    # kopf's default of 60 s, so a delete could hang for a minute: wait for it in-process for up to
    # a second, then poll every 2 s (kopf BackgroundSettings).
    settings.background.instant_exit_timeout = 1.0
    settings.background.cancellation_polling = 2.0
    _kube()


def release_finalizers(logger, **_: Any) -> None:
    """At operator shutdown, after kopf has stopped watching: drop our finalizer from every
    resource, so `kubectl delete` still works while no operator runs (after `helm uninstall`,
    say). The next operator to start puts it back as it resumes the resources."""
    kube = _kube()
    for kind in (KIND, LOADTEST_KIND, FAULT_KIND):
        for namespace in Runtime.namespaces or (None,):
            for obj in kube.list(API_VERSION, kind, namespace):
                meta = obj["metadata"]
                finalizers = meta.get("finalizers") or []
                if FINALIZER in finalizers:
                    kept = [f for f in finalizers if f != FINALIZER]
                    kube.patch(API_VERSION, kind, meta["namespace"], meta["name"], {"metadata": {"finalizers": kept}})
                    logger.info(f"released {kind} {meta['namespace']}/{meta['name']}")


def _as_cluster(name: str, namespace: str, spec: Any) -> InferenceCluster:
    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace}}
    return parse_cluster({**doc, "spec": _plain(spec)}, f"{KIND} {namespace}/{name}")


def _plain(value: Any) -> Any:
    """kopf hands out read-only mapping views; pydantic wants dicts and lists."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _known_status(status: Any, memo: Any) -> dict:
    """The freshest status we know: what this operator last wrote (kept in the object's memo),
    else what the watch delivered — a body can lag behind our own patches."""
    return memo.get("status") or _plain(status)


def _post(body: Any, events: list[Event]) -> None:
    for ev in events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message[:1000])


def _set_status(patch: kopf.Patch, status: Any, memo: Any, new: dict, body: Any = None) -> None:
    """Patch the status; with ``body``, announce the condition transitions as Events."""
    known = _known_status(status, memo)
    new = {**new, "conditions": merge_conditions(known.get("conditions"), new.get("conditions", []))}
    for key, value in new.items():
        patch.status[key] = value
    memo["status"] = {**known, **new}
    if body is not None:
        _post(body, condition_events(known.get("conditions"), new["conditions"]))


def _essence(status: dict) -> tuple:
    conditions = [(c.get("type"), c.get("status"), c.get("message")) for c in status.get("conditions", [])]
    return conditions, status.get("pools")


def _live_status(cluster: InferenceCluster, namespace: str, generation: int, status: Any) -> dict:
    kube = _kube()
    pools = [(p.name, p.role, p.replicas, per_pod(cluster.spec, p)) for p in cluster.spec.pools]
    sts = {
        o["metadata"]["labels"].get("infemu.io/pool"): o
        for o in kube.list("apps/v1", "StatefulSet", namespace, {"app.kubernetes.io/instance": cluster.name})
    }
    router = kube.get("apps/v1", "Deployment", namespace, f"{cluster.name}-router")
    applied = status.get("appliedAt")
    since = (dt.datetime.now(dt.timezone.utc) - _parse_time(applied)).total_seconds() if applied else 0.0
    return cluster_status(
        generation=generation,
        observed_generation=status.get("observedGeneration"),
        pools=pool_status(pools, sts),
        router=router,
        endpoint=router_endpoint(cluster.name, namespace),
        since_apply_s=since,
    )


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def _prune(cluster: InferenceCluster, namespace: str, keep: list[dict], owner_uid: str, logger) -> None:
    """Delete children of pools that left the spec (owned by this resource, not desired any more)."""
    kube = _kube()
    wanted = {(o["kind"], o["metadata"]["name"]) for o in keep}
    for api_version, kind in PRUNABLE:
        try:
            found = kube.list(api_version, kind, namespace, {"app.kubernetes.io/instance": cluster.name})
        except ApiException as exc:
            if exc.status == 404:  # an optional API this cluster does not serve (InferencePool)
                continue
            raise
        for obj in found:
            meta = obj["metadata"]
            owned = any(r.get("uid") == owner_uid for r in meta.get("ownerReferences", []))
            if owned and (kind, meta["name"]) not in wanted:
                kube.delete(api_version, kind, namespace, meta["name"])
                logger.info(f"pruned {kind} {meta['name']}: its pool left the spec")


def _apply_optional(kube: Kube, obj: dict, body: Any, logger) -> None:
    """Apply an object of an API the cluster may not serve (the InferencePool of the Gateway API
    Inference Extension): without it the cluster still serves; the user gets a Warning saying
    what to install."""
    try:
        kube.apply(obj)
    except ApiException as exc:
        if exc.status != 404:
            raise
        message = (
            f"{obj['kind']} {obj['metadata']['name']} not created: this cluster does not serve "
            f"{obj['apiVersion']} (install the Gateway API Inference Extension CRDs; docs/gateway.md)"
        )
        logger.warning(message)
        _post(body, [Event("Warning", "InferencePoolUnavailable", message)])


def reconcile_cluster(body, spec, name, namespace, meta, status, patch, memo, logger, **_: Any) -> None:
    generation = meta.get("generation", 0)
    try:
        cluster = _as_cluster(name, namespace, spec)
    except SpecError as exc:
        _set_status(patch, status, memo, invalid_spec_status(generation, exc.problems))
        message = "invalid spec, nothing applied: " + "; ".join(exc.problems)
        logger.error(message)
        _post(body, [Event("Warning", "InvalidSpec", message)])
        return
    # the uid keys the cluster's internal token (desired.internal_token)
    children = desired_children(cluster, namespace, Runtime.settings, meta.get("uid"))
    kube = _kube()
    try:
        for obj in children:
            kopf.append_owner_reference(obj, owner=body)
            if obj["kind"] == INFERENCE_POOL_KIND:
                _apply_optional(kube, obj, body, logger)
            else:
                kube.apply(obj)
        _prune(cluster, namespace, children, meta["uid"], logger)
    except ApiException as exc:
        message = f"applying children failed: {api_message(exc)}"
        degraded = [
            condition("Ready", False, "ApplyFailed", message),
            condition("Degraded", True, "ApplyFailed", message),
        ]
        _set_status(patch, status, memo, {"conditions": degraded}, body)
        raise kopf.TemporaryError(message, delay=30) from exc
    applied = {**_known_status(status, memo), "observedGeneration": generation, "appliedAt": now()}
    live = _live_status(cluster, namespace, generation, applied)
    _set_status(patch, status, memo, {**live, "appliedAt": applied["appliedAt"]}, body)
    message = f"applied {len(children)} objects for generation {generation}"
    logger.info(message)
    _post(body, [Event("Normal", "Applied", message)])


def refresh_cluster_status(body, spec, name, namespace, meta, status, patch, memo, **_: Any) -> None:
    try:
        cluster = _as_cluster(name, namespace, spec)
    except SpecError:
        return  # the InvalidSpec conditions stay as the reconcile wrote them
    known = _known_status(status, memo)
    live = _live_status(cluster, namespace, meta.get("generation", 0), known)
    live.pop("observedGeneration")  # the reconcile's to set: a timer racing it must not roll it back
    if _essence(known) != _essence(live):  # patch only on a change: no write, no event, every tick
        _set_status(patch, status, memo, live, body)
    pods = _kube().list("v1", "Pod", namespace, {"app.kubernetes.io/instance": cluster.name})
    failing = failing_pods(pods)
    _post(body, pod_events(memo.get("failing") or {}, failing))
    memo["failing"] = failing


# ---- LoadTest -------------------------------------------------------------------------


def start_loadtest(body, spec, name, namespace, status, patch, logger, **_: Any) -> None:
    if status.get("job") or status.get("phase") in ("Succeeded", "Failed"):
        return  # already started (resume after an operator restart)
    doc = {"apiVersion": API_VERSION, "kind": LOADTEST_KIND, "metadata": {"name": name, "namespace": namespace}}
    try:
        lt = parse_loadtest({**doc, "spec": _plain(spec)}, f"{LOADTEST_KIND} {namespace}/{name}")
    except SpecError as exc:
        _finish(patch, status, "Failed", "InvalidSpec", "; ".join(exc.problems), body)
        return
    kube = _kube()
    target = kube.get(API_VERSION, KIND, namespace, lt.spec.cluster)
    if target is None:
        message = f"spec.cluster: InferenceCluster {namespace}/{lt.spec.cluster} does not exist (yet); retrying"
        patch.status["phase"] = "Pending"
        patch.status["message"] = message
        raise kopf.TemporaryError(message, delay=15)
    try:
        cluster = _as_cluster(lt.spec.cluster, namespace, target.get("spec", {}))
    except SpecError as exc:
        _finish(patch, status, "Failed", "TargetInvalid", "; ".join(exc.problems), body)
        return
    problems = fault_problems_of(lt, cluster)
    if problems:
        _finish(patch, status, "Failed", "InvalidSpec", "; ".join(problems), body)
        return
    job = loadtest_job(lt, cluster, namespace, Runtime.settings)
    kopf.append_owner_reference(job, owner=body)
    try:
        kube.apply(job)
    except ApiException as exc:
        raise kopf.TemporaryError(f"creating the Job failed: {api_message(exc)}", delay=30) from exc
    patch.status["phase"] = "Running"
    patch.status["job"] = job["metadata"]["name"]
    patch.status["target"] = router_endpoint(cluster.name, namespace)
    patch.status["startTime"] = now()
    patch.status["message"] = f"{lt.spec.arrival.users} {lt.spec.workload} users for {lt.spec.duration_seconds:g} s"
    message = f"started Job {job['metadata']['name']} against {patch.status['target']}"
    logger.info(message)
    _post(body, [Event("Normal", "Started", message)])


def _finish(patch: kopf.Patch, status: Any, phase: str, reason: str, message: str, body: Any) -> None:
    _post(body, [Event("Normal" if phase == "Succeeded" else "Warning", reason, message)])
    patch.status["phase"] = phase
    patch.status["message"] = message
    patch.status["completionTime"] = now()
    done = condition("Complete", phase == "Succeeded", reason, message)
    patch.status["conditions"] = merge_conditions(status.get("conditions"), [done])


def follow_loadtest(body, name, namespace, status, patch, logger, **_: Any) -> None:
    kube = _kube()
    job = kube.get("batch/v1", "Job", namespace, status.get("job") or job_name(name))
    if job is None:
        _finish(patch, status, "Failed", "JobMissing", "the load-test Job was deleted before it finished", body)
        return
    pods = kube.list("v1", "Pod", namespace, {"job-name": job["metadata"]["name"]})
    phase, summary, message = job_outcome(job, pods)
    if phase == "Running":
        return
    if summary is not None:
        cm = summary_config_map(name, namespace, summary)
        kopf.append_owner_reference(cm, owner=body)
        kube.apply(cm)
        patch.status["summary"] = summary
        patch.status["summaryConfigMap"] = cm["metadata"]["name"]
        patch.status["attainment"] = attainment_text(summary)
    _finish(patch, status, phase, "JobSucceeded" if phase == "Succeeded" else "JobFailed", message, body)
    logger.info(f"load test {phase.lower()}: {message}")


def _running(status, **_: Any) -> bool:
    return status.get("phase") == "Running"


def _with_faults(spec, status, **_: Any) -> bool:
    return status.get("phase") == "Running" and bool(spec.get("faults"))


def _load_started(kube: Kube, namespace: str, job: str) -> dt.datetime | None:
    """When the load pod's container started: the clock the LoadTest's faults are timed by."""
    for pod in kube.list("v1", "Pod", namespace, {"job-name": job}):
        for cs in pod.get("status", {}).get("containerStatuses", []):
            started = (cs.get("state", {}).get("running") or {}).get("startedAt")
            if cs.get("name") == "locust" and started:
                return dt.datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    return None


def play_faults(body, spec, name, namespace, status, patch, logger, **_: Any) -> None:
    """Each second while the test runs: start, flip or clear what is due; record it in
    ``status.faults`` and as Events (FaultInjected, FaultCleared)."""
    kube = _kube()
    started = _load_started(kube, namespace, status.get("job") or job_name(name))
    if started is None:
        return  # the load pod is not running yet: the faults' clock has not started
    doc = {"apiVersion": API_VERSION, "kind": LOADTEST_KIND, "metadata": {"name": name, "namespace": namespace}}
    lt = parse_loadtest({**doc, "spec": _plain(spec)})
    target = kube.get(API_VERSION, KIND, namespace, lt.spec.cluster)
    if target is None:
        return
    cluster = _as_cluster(lt.spec.cluster, namespace, target.get("spec", {}))
    pods = PodFaults(kube, namespace, cluster, internal_token(target["metadata"]["uid"]))
    faults = fault_schedule(lt, cluster)
    recorded = {r["name"]: dict(r) for r in (status.get("faults") or [])}
    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    events = []
    for step in plan_step(faults, elapsed, recorded):
        f = step.fault
        lines = pods.apply(f, step.action != "clear", step.cut)
        failed = [line for line in lines if ": failed: " in line]
        summary = "; ".join(failed or lines)[:1000]
        if step.action == "start":
            state = "Restarting" if f.kind == "kill" else "Active"
            targets = list(f.instances) or [n for g in f.groups for n in g]
            recorded[f.name] = {"name": f.name, "kind": f.kind, "targets": targets, "state": state, "startedAt": now()}
            if f.kind != "kill":
                recorded[f.name]["appliedTo"] = pods.incarnations(f)
            events.append(Event("Warning" if failed else "Normal", "FaultInjected", f"{f.name} ({f.kind}): {summary}"))
        elif step.action == "flip":
            recorded[f.name]["cut"] = step.cut
        else:
            recorded[f.name].update(state="Cleared", endedAt=now())
            events.append(Event("Normal", "FaultCleared", f"{f.name} ({f.kind}): {summary}"))
        if step.cut is not None:
            recorded[f.name]["cut"] = step.cut
        recorded[f.name]["message"] = summary
    for f in faults:  # a fault outlives a restart of its pods (a kill's, or a crash): on again once Ready
        rec = recorded.get(f.name)
        if rec and rec.get("state") == "Active" and f.kind != "kill":
            rec["appliedTo"], reapplied = pods.reapply_where_restarted(f, rec.get("appliedTo") or {}, rec.get("cut"))
            events += [Event("Normal", "FaultReapplied", line[:1000]) for line in reapplied]
    for f in faults:  # a kill is over when its pods are back and Ready (their StatefulSet restarts them)
        rec = recorded.get(f.name)
        if rec and rec.get("state") == "Restarting" and pods.restarted(f, rec["startedAt"]):
            rec.update(state="Cleared", endedAt=now())
            events.append(Event("Normal", "FaultCleared", f"{f.name}: {', '.join(f.instances)} back and Ready"))
    order = [f.name for f in faults]
    patch.status["faults"] = sorted(recorded.values(), key=lambda r: order.index(r["name"]))
    for e in events:
        logger.info(f"{e.reason}: {e.message}")
    _post(body, events)


# ---- Fault ------------------------------------------------------------------------------


def _fault_context(spec, name: str, namespace: str):
    """(the resolved fault, its executor, the target's body); SpecError for a bad spec or target."""
    doc = {"apiVersion": API_VERSION, "kind": FAULT_KIND, "metadata": {"name": name, "namespace": namespace}}
    fr = parse_fault_resource({**doc, "spec": _plain(spec)}, f"{FAULT_KIND} {namespace}/{name}")
    kube = _kube()
    target = kube.get(API_VERSION, KIND, namespace, fr.spec.cluster)
    if target is None or not target.get("metadata", {}).get("uid"):
        raise SpecError([f"spec.cluster: InferenceCluster {namespace}/{fr.spec.cluster} does not exist"])
    cluster = _as_cluster(fr.spec.cluster, namespace, target.get("spec", {}))
    fault = resolve_resource(fr, cluster)
    return fault, PodFaults(kube, namespace, cluster, internal_token(target["metadata"]["uid"])), target


def start_fault(body, spec, name, namespace, status, patch, logger, **_: Any) -> None:
    """A Fault is carried out once, at creation (resume: only if it never started)."""
    if status.get("state"):
        return
    try:
        fault, pods, target = _fault_context(spec, name, namespace)
    except SpecError as exc:
        message = "; ".join(exc.problems)
        patch.status.update(state="Failed", message=message[:1000], startedAt=now())
        _post(body, [Event("Warning", "InvalidSpec", message)])
        return
    lines = pods.apply(fault, True)
    failed = [line for line in lines if ": failed: " in line]
    message = "; ".join(failed or lines)[:1000]
    patch.status.update(
        name=name,
        kind=fault.kind,
        targets=list(fault.instances) or [n for g in fault.groups for n in g],
        state="Restarting" if fault.kind == "kill" else "Active",
        startedAt=now(),
        message=message,
    )
    if fault.kind != "kill":  # the pods' lives it was applied to (a restart loses it: follow_fault)
        patch.status["appliedTo"] = pods.incarnations(fault)
    event = Event("Warning" if failed else "Normal", "FaultInjected", f"{name} ({fault.kind}): {message}")
    _post(body, [event])
    _post(target, [event])  # `kubectl describe` of the cluster shows its faults too
    logger.info(event.message)


def _end_fault(body, target, patch, name: str, message: str, logger) -> None:
    patch.status.update(state="Cleared", endedAt=now(), message=message[:1000])
    event = Event("Normal", "FaultCleared", f"{name}: {message}")
    _post(body, [event])
    if target is not None:
        _post(target, [event])
    logger.info(event.message)


def follow_fault(body, spec, name, namespace, status, patch, logger, **_: Any) -> None:
    """Clear a Fault when its duration is over; a kill is over when its pods are back and Ready."""
    try:
        fault, pods, target = _fault_context(spec, name, namespace)
    except SpecError as exc:  # its cluster went away meanwhile
        patch.status.update(state="Failed", endedAt=now(), message="; ".join(exc.problems)[:1000])
        return
    started = dt.datetime.strptime(status["startedAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    if fault.kind == "kill":
        if pods.restarted(fault, status["startedAt"]):
            _end_fault(body, target, patch, name, f"{', '.join(fault.instances)} back and Ready", logger)
        return
    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    if fault.duration_s is not None and elapsed >= fault.duration_s:
        lines = pods.apply(fault, False)
        _end_fault(body, target, patch, name, "; ".join(lines) or "cleared", logger)
        return
    cut = cut_at(fault, elapsed) if fault.flap_period_s is not None else None
    if cut is not None and status.get("cut") != cut:
        pods.apply(fault, True, cut)
        patch.status["cut"] = cut
    applied = dict(status.get("appliedTo") or {})
    lives, reapplied = pods.reapply_where_restarted(fault, applied, cut)
    if lives != applied:
        patch.status["appliedTo"] = lives
    for line in reapplied:
        event = Event("Normal", "FaultReapplied", line[:1000])
        _post(body, [event])
        _post(target, [event])
        logger.info(event.message)


def stop_fault(body, spec, name, namespace, status, logger, **_: Any) -> None:
    """Deleting an active Fault clears it (the finalizer holds the deletion until it has)."""
    if status.get("state") != "Active":
        return
    try:
        fault, pods, target = _fault_context(spec, name, namespace)
    except SpecError:
        return  # its cluster is gone: nothing left to clear
    lines = pods.apply(fault, False)
    _post(target, [Event("Normal", "FaultCleared", f"{name} deleted: {'; '.join(lines) or 'cleared'}")])
    logger.info(f"fault {name} cleared on deletion")


def _fault_active(status, **_: Any) -> bool:
    return status.get("state") in ("Active", "Restarting")


def register(
    registry: kopf.OperatorRegistry,
    namespaces: tuple[str, ...] = (),
    status_interval_s: float = STATUS_INTERVAL_S,
    loadtest_interval_s: float = LOADTEST_INTERVAL_S,
) -> kopf.OperatorRegistry:
    """Attach every handler to ``registry`` (the operator's default one, or a test's own with
    shorter timer intervals); ``namespaces`` are the watched ones (empty: every namespace)."""
    Runtime.namespaces = tuple(namespaces)
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(release_finalizers)
    for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
        on(GROUP, VERSION, PLURAL, registry=registry)(reconcile_cluster)
    kopf.timer(GROUP, VERSION, PLURAL, registry=registry, interval=status_interval_s, initial_delay=status_interval_s)(
        refresh_cluster_status
    )
    for on in (kopf.on.create, kopf.on.resume):
        on(GROUP, VERSION, LOADTEST_PLURAL, registry=registry)(start_loadtest)
    kopf.timer(GROUP, VERSION, LOADTEST_PLURAL, registry=registry, interval=loadtest_interval_s, when=_running)(
        follow_loadtest
    )
    kopf.timer(GROUP, VERSION, LOADTEST_PLURAL, registry=registry, interval=FAULT_INTERVAL_S, when=_with_faults)(
        play_faults
    )
    for on in (kopf.on.create, kopf.on.resume):
        on(GROUP, VERSION, FAULT_PLURAL, registry=registry)(start_fault)
    kopf.timer(GROUP, VERSION, FAULT_PLURAL, registry=registry, interval=FAULT_INTERVAL_S, when=_fault_active)(
        follow_fault
    )
    kopf.on.delete(GROUP, VERSION, FAULT_PLURAL, registry=registry)(stop_fault)
    return registry
