"""The operator's pure parts: status from children, the LoadTest Job, its outcome, settings."""

from __future__ import annotations

import json

import pytest
from conftest import example, example_files

from emulator.errors import SpecError
from emulator.loadtest import LoadTestSpec, compact_summary, parse_loadtest
from emulator.spec import load_clusters
from infemu_operator.desired import OperatorSettings
from infemu_operator.loadtest import attainment_text, job_outcome, loadtest_job, summary_config_map
from infemu_operator.status import cluster_status, invalid_spec_status, merge_conditions, pool_status

kubernetes_validate = pytest.importorskip("kubernetes_validate")
QUICKSTART = load_clusters(example("quickstart.yaml"))[0]


def _status(ready: dict, updated: dict | None = None, router: int = 1, observed: int = 1, since: float = 5.0):
    updated = updated or ready
    sts = {n: {"status": {"readyReplicas": r, "updatedReplicas": updated[n]}} for n, r in ready.items()}
    pools = pool_status([(n, "decode", 2, 1) for n in ready], sts)
    st = cluster_status(
        generation=1,
        observed_generation=observed,
        pools=pools,
        router={"status": {"availableReplicas": router}},
        endpoint="http://c-router.ns.svc.cluster.local",
        since_apply_s=since,
    )
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


def test_conditions_follow_the_children():
    assert _status({"a": 2, "b": 2}) == {
        "Ready": ("True", "AllReplicasReady"),
        "Progressing": ("False", "Complete"),
        "Degraded": ("False", "AsExpected"),
    }
    starting = _status({"a": 1, "b": 2})
    assert starting["Ready"][0] == "False" and starting["Progressing"][0] == "True"
    assert starting["Degraded"][0] == "False"
    stuck = _status({"a": 1, "b": 2}, since=3600)  # past the 600 s progress deadline
    assert stuck["Degraded"] == ("True", "ProgressDeadlineExceeded") and stuck["Progressing"][0] == "False"
    rolling = _status({"a": 2, "b": 2}, updated={"a": 1, "b": 2})  # ready, but a template rollout runs
    assert rolling["Ready"][0] == "True" and rolling["Progressing"][0] == "True"
    assert _status({"a": 2}, router=0)["Ready"][0] == "False"
    assert _status({"a": 2}, observed=0)["Progressing"][0] == "True"  # a newer generation not yet applied


def test_a_dense_pools_status_counts_instances_not_pods():
    sts = {"agg": {"status": {"readyReplicas": 2, "updatedReplicas": 1}}}
    (pool,) = pool_status([("agg", "aggregated", 5, 2)], sts)  # three pods: 2 + 2 + 1 instances
    assert (pool["ready"], pool["updated"], pool["desired"]) == (4, 2, 5)
    sts["agg"]["status"] = {"readyReplicas": 3, "updatedReplicas": 3}
    (pool,) = pool_status([("agg", "aggregated", 5, 2)], sts)
    assert pool["ready"] == pool["updated"] == 5


def test_dense_pods_take_faults_on_their_instances_port(monkeypatch):
    """A fault on an instance of a dense pod goes to that pod, on that instance's own port."""
    from emulator.faults.schedule import Fault
    from emulator.spec import InferenceCluster
    from infemu_operator.faults import PodFaults

    doc = QUICKSTART.model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["pools"][0]["replicas"] = 4
    doc["spec"]["topology"]["gpusPerNode"] = 4
    doc["spec"]["emulation"] = {"instancesPerProcess": 2}
    cluster = InferenceCluster.model_validate(doc)

    class Pods:
        def get(self, api, kind, ns, name):
            return {"metadata": {"name": name}, "status": {"podIP": f"10.0.0.{name[-1]}"}}

        def list(self, api, kind, ns, labels):
            return []  # no router pod: the fault's annotation goes nowhere

    posts = []
    faults = PodFaults(Pods(), "lab", cluster, "t0ken")
    monkeypatch.setattr(faults, "_post", lambda url, path, body, what: posts.append((url, path)) or f"{what}: ok")
    assert faults.pod_name("agg-3") == "quickstart-agg-1" and faults.pod_name("agg-0") == "quickstart-agg-0"
    hang = Fault(0, "h", "hang", 0.0, None, None, instances=("agg-3", "agg-0"))
    faults.apply(hang, on=True)
    assert ("http://10.0.0.1:8001", "/admin/fault") in posts and ("http://10.0.0.0:8000", "/admin/fault") in posts


def test_last_transition_time_moves_only_on_a_status_change():
    first = merge_conditions(None, [{"type": "Ready", "status": "False"}], at="2026-01-01T00:00:00Z")
    same = merge_conditions(first, [{"type": "Ready", "status": "False", "message": "x"}], at="2026-01-02T00:00:00Z")
    flipped = merge_conditions(same, [{"type": "Ready", "status": "True"}], at="2026-01-03T00:00:00Z")
    assert [c["lastTransitionTime"] for c in (*first, *same, *flipped)] == [
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00Z",
        "2026-01-03T00:00:00Z",
    ]


def test_invalid_spec_status_carries_the_field():
    st = invalid_spec_status(4, ["spec.pools[0].tp: 3 does not divide the model's 32 attention heads"])
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "spec.pools[0].tp" in ready["message"] and st["observedGeneration"] == 4


@pytest.mark.parametrize("path", example_files("LoadTest"))
def test_loadtest_examples_become_a_strictly_valid_job(path):
    import yaml

    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d and d["kind"] == "LoadTest"]
    for doc in docs:
        lt = parse_loadtest({**doc, "metadata": {**doc["metadata"], "namespace": "lab"}})
        job = loadtest_job(lt, QUICKSTART, "lab", OperatorSettings())
        kubernetes_validate.validate(job, "1.30", strict=True)
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
        container = pod["containers"][0]
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container["terminationMessagePath"] == "/dev/termination-log"
        args = container["args"]
        # the target cluster's SLO is the default
        assert args[args.index("--ttft-ms") + 1] == f"{QUICKSTART.spec.slo.ttft_ms:g}"
        assert args[args.index("--model") + 1] == QUICKSTART.spec.model.name
        kubernetes_validate.validate(summary_config_map(lt.metadata.name, "lab", {"requests": 1}), "1.30", strict=True)


def test_loadtest_spec_errors_name_the_field():
    with pytest.raises(SpecError) as err:
        parse_loadtest(
            {
                "apiVersion": "infemu.io/v1alpha1",
                "kind": "LoadTest",
                "metadata": {"name": "x"},
                "spec": {"cluster": "c", "workers": 0},
            }
        )
    assert err.value.problems == ["spec.workers: 0: Input should be greater than or equal to 1"]


def test_loadtest_workloads_are_the_locust_user_classes():
    from typing import get_args

    from loadgen.workloads import WORKLOADS

    assert get_args(LoadTestSpec.model_fields["workload"].annotation) == WORKLOADS


def _pod(message: str, code: int = 0) -> dict:
    term = {"exitCode": code, "message": message, "reason": "Completed" if code == 0 else "Error"}
    return {"status": {"containerStatuses": [{"name": "locust", "state": {"terminated": term}}]}}


def test_job_outcome_reads_the_summary_from_the_termination_message():
    summary = {"requests": 10, "completed": 9, "failed": 1, "slo_attainment": 0.8}
    assert job_outcome({"status": {"active": 1}}, []) == ("Running", None, "1 pod(s) active")
    phase, got, message = job_outcome({"status": {"succeeded": 1}}, [_pod(json.dumps(summary))])
    assert (phase, got) == ("Succeeded", summary) and message == "9 of 10 requests completed"
    phase, got, message = job_outcome({"status": {"failed": 1}}, [_pod("error: locust exited with code 1", 1)])
    assert phase == "Failed" and got is None and "locust exited" in message
    nothing = {"requests": 5, "completed": 0, "failed": 5}
    assert job_outcome({"status": {"failed": 1}}, [_pod(json.dumps(nothing), 1)]) == (
        "Failed",
        nothing,
        "0 of 5 requests completed",
    )
    gone = {"status": {"failed": 1, "conditions": [{"type": "Failed", "message": "DeadlineExceeded"}]}}
    assert job_outcome(gone, []) == ("Failed", None, "DeadlineExceeded")


def test_a_full_summary_fits_a_termination_message():
    from emulator.results import RequestRecord, summarize

    records = [RequestRecord(f"r{i}", i * 0.1, 100, 50, i * 0.1 + 0.2, i * 0.1 + 2.0, True) for i in range(100)]
    text = compact_summary(summarize(records, 500, 50))
    assert len(text.encode()) <= 4096 and json.loads(text)["requests"] == 100


def test_operator_settings_come_from_the_charts_env():
    s = OperatorSettings.from_env({"INFEMU_IMAGE": "infemu:dev", "INFEMU_SHAPING": "tc", "INFEMU_WORKER_CPU": "1"})
    assert (s.image, s.shaping, s.cpu) == ("infemu:dev", "tc", "1")
    with pytest.raises(ValueError, match="INFEMU_SHAPING"):
        OperatorSettings.from_env({"INFEMU_SHAPING": "netem"})


def test_attainment_reads_as_a_percentage_and_missing_values_say_so():
    assert attainment_text({"slo_attainment": 1}) == "100.0%"
    assert attainment_text({"slo_attainment": 0.975}) == "97.5%"
    assert attainment_text({}) == "n/a" and attainment_text({"slo_attainment": None}) == "n/a"


def test_status_texts_count_in_the_singular_and_the_plural():
    from infemu_operator.status import cluster_status

    def ready(pools):
        st = cluster_status(
            generation=1,
            observed_generation=1,
            pools=[{"name": n, "role": "aggregated", "ready": r, "desired": r, "updated": r} for n, r in pools],
            router={"status": {"availableReplicas": 1}},
            endpoint="http://r",
            since_apply_s=1.0,
        )
        return st["conditions"][0]["message"]

    assert ready([("agg", 1)]).startswith("1 instance in 1 pool ready")
    assert ready([("a", 2), ("b", 1)]).startswith("3 instances in 2 pools ready")


def test_condition_events_announce_each_transition_once():
    from infemu_operator.events import condition_events

    def conds(ready, degraded, reason="AsExpected"):
        return [
            {"type": "Ready", "status": ready, "reason": "R", "message": "m"},
            {"type": "Degraded", "status": degraded, "reason": reason, "message": "d"},
        ]

    up = condition_events(conds("False", "False"), conds("True", "False"))
    assert [(e.type, e.reason) for e in up] == [("Normal", "Ready")]
    assert condition_events(conds("True", "False"), conds("True", "False")) == []  # no change, no Event
    down = condition_events(conds("True", "False"), conds("False", "True", "ProgressDeadlineExceeded"))
    assert [(e.type, e.reason) for e in down] == [("Warning", "NotReady"), ("Warning", "ProgressDeadlineExceeded")]
    assert condition_events(None, conds("False", "False")) == []  # still coming up: nothing to report


def test_failing_pods_name_the_reason_and_starting_pods_are_not_failing():
    from infemu_operator.events import failing_pods, pod_events

    def pod(name, **status):
        return {"metadata": {"name": name}, "status": status}

    starting = pod(
        "a", phase="Pending", containerStatuses=[{"name": "w", "state": {"waiting": {"reason": "ContainerCreating"}}}]
    )
    pulling = pod(
        "b",
        phase="Pending",
        containerStatuses=[
            {"name": "w", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}
        ],
    )
    crashing = pod(
        "c",
        phase="Running",
        containerStatuses=[
            {
                "name": "w",
                "restartCount": 2,
                "state": {"running": {}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
            }
        ],
    )
    failing = failing_pods([starting, pulling, crashing])
    assert set(failing) == {"b", "c"} and "ImagePullBackOff" in failing["b"] and "exit code 1" in failing["c"]
    assert [e.message.split(":")[0] for e in pod_events({}, failing)] == ["b", "c"]
    assert pod_events(failing, failing) == []  # already announced


def test_a_fault_goes_back_on_a_pod_that_was_recreated_or_restarted_while_it_was_active(monkeypatch):
    """A slowdown outlives its process on Kubernetes too: when a target's pod is recreated (a new uid)
    or its container restarts, the Fault's timer applies it again once the pod is Ready, with one
    FaultReapplied event, and records the pod's new life; an unchanged pod gets nothing."""
    import logging

    from emulator.faults.schedule import Fault
    from infemu_operator import handlers
    from infemu_operator.faults import PodFaults

    pods: dict[str, dict] = {}

    def pod(uid: str, restarts: int, ready: bool) -> dict:
        return {
            "metadata": {"name": "quickstart-agg-0", "uid": uid},
            "status": {
                "podIP": "10.0.0.7",
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                "containerStatuses": [{"name": "worker", "restartCount": restarts}],
            },
        }

    class Kube:
        def get(self, api, kind, ns, name):
            return pods.get(name)

        def list(self, api, kind, ns, labels):
            if labels.get("app.kubernetes.io/component") == "router":
                return []  # no router pod: the fault's annotation goes nowhere
            assert labels == {"app.kubernetes.io/instance": "quickstart"}
            return list(pods.values())

    faults = PodFaults(Kube(), "lab", QUICKSTART, "t0ken")
    posts: list[tuple[str, dict]] = []
    monkeypatch.setattr(faults, "_post", lambda url, path, body, what: posts.append((url, body)) or f"{what}: ok")
    events: list[str] = []
    monkeypatch.setattr(handlers, "_post", lambda obj, evs: events.extend(e.reason for e in evs))
    slow = Fault(0, "s", "slow", 0.0, None, None, instances=("agg-0",), factor=3.0)

    class Patch:
        def __init__(self) -> None:
            self.status: dict = {}

    monkeypatch.setattr(handlers, "_fault_context", lambda spec, name, ns: (slow, faults, {}))

    def follow(applied: dict) -> Patch:
        """One tick of the Fault's timer (its duration is not over)."""
        patch = Patch()
        status = {"state": "Active", "startedAt": handlers.now(), "appliedTo": applied}
        handlers.follow_fault({}, {}, "s", "lab", status, patch, logging.getLogger("t"))
        return patch

    pods["quickstart-agg-0"] = pod("u1", 0, True)
    assert faults.incarnations(slow) == {"agg-0": "u1/0"}
    assert follow({"agg-0": "u1/0"}).status == {} and not posts  # the same life: nothing to do
    pods["quickstart-agg-0"] = pod("u2", 0, False)  # recreated, not Ready yet: wait
    assert follow({"agg-0": "u1/0"}).status == {} and not posts
    pods["quickstart-agg-0"] = pod("u2", 0, True)
    patch = follow({"agg-0": "u1/0"})
    assert posts == [("http://10.0.0.7:8000", {"slow": 3.0})]
    assert events == ["FaultReapplied", "FaultReapplied"]  # on the Fault and on its cluster
    assert patch.status["appliedTo"] == {"agg-0": "u2/0"}
    pods["quickstart-agg-0"] = pod("u2", 1, True)  # its container restarted in place
    assert follow({"agg-0": "u2/0"}).status["appliedTo"] == {"agg-0": "u2/1"} and len(posts) == 2
    # a fault started while its pod was not Ready never reached it: it goes on once the pod is Ready
    assert follow({"agg-0": None}).status["appliedTo"] == {"agg-0": "u2/1"} and len(posts) == 3
