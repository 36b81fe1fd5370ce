"""A ``LoadTest`` as a Job, and the Job's outcome as status — both pure functions.

The Job runs one pod: ``infemu loadtest`` (Locust master plus ``spec.workers`` forked workers)
against the target cluster's router Service. Its summary comes back through the container's
termination message (``/dev/termination-log``, 4 KiB), so the load pod needs no API access at
all; the operator reads the message from the pod status and copies it into the resource's
status and a ``<name>-summary`` ConfigMap.
"""

from __future__ import annotations

import json

from emulator.faults.schedule import Fault, fault_problems, resolve_faults
from emulator.loadtest import TERMINATION_LOG, LoadTest
from emulator.spec import InferenceCluster
from emulator.topology import place
from infemu_operator.desired import OperatorSettings, labels, object_meta, resources, security_context
from infemu_operator.status import router_endpoint

GRACE_S = 300  # on top of the test's duration: image pull, Locust start and stop, stragglers


def job_name(loadtest: str) -> str:
    return f"{loadtest}-locust"


def fault_schedule(lt: LoadTest, cluster: InferenceCluster) -> list[Fault]:
    """The LoadTest's faults resolved against its target cluster (call ``fault_problems`` first)."""
    with_faults = cluster.spec.model_copy(update={"faults": list(lt.spec.faults)})
    return resolve_faults(with_faults, place(with_faults))


def fault_problems_of(lt: LoadTest, cluster: InferenceCluster) -> list[str]:
    """The LoadTest's faults checked as spec.faults are, plus what only ``infemu run`` can time."""
    with_faults = cluster.spec.model_copy(update={"faults": list(lt.spec.faults)})
    problems = fault_problems(with_faults, place(with_faults))
    for k, f in enumerate(lt.spec.faults):
        if f.kind == "burst":
            problems.append(f"spec.faults[{k}].kind: a LoadTest's bursts are its load shape; use arrival.type: burst")
        if f.after_requests is not None:
            problems.append(
                f"spec.faults[{k}].afterRequests: the operator times faults from the load pod's start; use atSeconds"
            )
    return problems


def _timeline(faults: list[Fault]) -> list[dict]:
    """What the load pod accounts windows by: each fault as planned, from its container's start."""
    return [
        {
            "name": f.name,
            "kind": f.kind,
            "targets": list(f.instances) or [n for g in f.groups for n in g],
            "start_s": f.at_s or 0.0,
            "end_s": (f.at_s or 0.0) + (f.duration_s or 0.0) if f.duration_s is not None or f.kind == "kill" else None,
        }
        for f in faults
    ]


def loadtest_job(lt: LoadTest, cluster: InferenceCluster, namespace: str, settings: OperatorSettings) -> dict:
    spec = lt.spec
    slo = spec.slo or cluster.spec.slo
    lbl = labels(lt.metadata.name, "loadgen")
    args = [
        "infemu",
        "loadtest",
        "--target",
        router_endpoint(cluster.name, namespace),
        "--model",
        cluster.spec.model.name,
        "--workload",
        spec.workload,
        "--arrival",
        spec.arrival.type,
        "--users",
        str(spec.arrival.users),
        "--duration",
        f"{spec.duration_seconds:g}",
        "--workers",
        str(spec.workers),
        "--seed",
        str(spec.seed),
        "--ttft-ms",
        f"{slo.ttft_ms:g}",
        "--tpot-ms",
        f"{slo.tpot_ms:g}",
        "--out",
        "/tmp/loadtest",
        "--summary-file",
        TERMINATION_LOG,
    ]
    if spec.faults:
        args += ["--faults-json", json.dumps(_timeline(fault_schedule(lt, cluster)), separators=(",", ":"))]
    container = {
        "name": "locust",
        "image": settings.image,
        "imagePullPolicy": settings.pull_policy,
        "args": args,
        "resources": resources(settings),
        "securityContext": security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        # the summary on success; on a crash, the log's tail (the error) becomes the message
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(job_name(lt.metadata.name), namespace, lbl),
        "spec": {
            "backoffLimit": 0,  # a load test that failed is a result, not something to retry
            "activeDeadlineSeconds": int(spec.duration_seconds) + GRACE_S,
            "template": {
                "metadata": {"labels": lbl},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                    "enableServiceLinks": False,
                },
            },
        },
    }


def _terminated(pod: dict) -> dict | None:
    for cs in pod.get("status", {}).get("containerStatuses", []):
        if cs.get("name") == "locust":
            return cs.get("state", {}).get("terminated")
    return None


def job_outcome(job: dict, pods: list[dict]) -> tuple[str, dict | None, str]:
    """(phase, summary or None, message) of a load-test Job and its pods."""
    st = job.get("status", {})
    if not st.get("succeeded") and not st.get("failed"):
        return "Running", None, f"{st.get('active', 0)} pod(s) active"
    for pod in pods:
        term = _terminated(pod)
        if term is None:
            continue
        text = (term.get("message") or "").strip()
        try:
            summary = json.loads(text)
        except ValueError:
            summary = None
        if isinstance(summary, dict):
            done = f"{summary.get('completed')} of {summary.get('requests')} requests completed"
            return ("Succeeded" if st.get("succeeded") else "Failed"), summary, done
        return "Failed", None, text[-500:] or term.get("reason", "failed")
    reason = next((c.get("message") for c in st.get("conditions", []) if c.get("type") == "Failed"), None)
    return "Failed", None, reason or "the load-test pod is gone; no summary was recorded"


def summary_config_map(lt_name: str, namespace: str, summary: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(f"{lt_name}-summary", namespace, labels(lt_name, "loadgen")),
        "data": {"summary.json": json.dumps(summary, indent=2)},
    }


def attainment_text(summary: dict) -> str:
    """The summary's SLO attainment (a fraction) as `kubectl get` shows it: '97.5%', or 'n/a'."""
    value = summary.get("slo_attainment")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "n/a"
    return f"{100 * value:.1f}%"
