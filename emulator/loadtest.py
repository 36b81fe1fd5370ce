"""The ``LoadTest`` resource and ``infemu loadtest``: Locust against an already running router.

On Kubernetes the operator turns a ``LoadTest`` into a Job whose one container runs
``infemu loadtest`` (Locust master plus ``workers`` forked workers) against the target
cluster's router Service; the summary — the same keys as ``infemu sim --json`` — is written to
the container's termination message, where the operator reads it into the resource's status
and a ConfigMap. Outside Kubernetes the same command drives any OpenAI-compatible endpoint.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Literal

from pydantic import Field

from emulator.spec import API_VERSION, FaultSpec, Metadata, SLOSpec, _Model, validate_document

LOADTEST_KIND = "LoadTest"
# the Locust user classes of loadgen.users (a test keeps the two lists equal)
Workload = Literal["chat", "coding", "summarization", "agentic", "multihop", "rag"]
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096  # bytes the kubelet keeps of a termination message (core/v1 Container)


class LoadTestArrival(_Model):
    """Locust is closed loop: ``users`` concurrent users, each sending its next request when the
    last one ends. ``stages`` ramps the users up and down, ``burst`` alternates base and peak."""

    type: Literal["closed", "stages", "burst"] = "closed"
    users: int = Field(4, ge=1, le=10_000, description="concurrent users (the peak for stages and burst)")


class LoadTestSpec(_Model):
    cluster: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="the InferenceCluster (same namespace) whose router receives the load",
    )
    workload: Workload = "chat"
    arrival: LoadTestArrival = LoadTestArrival()
    duration_seconds: float = Field(60.0, gt=0, le=86_400)
    workers: int = Field(1, ge=1, le=64, description="Locust worker processes beside the master")
    seed: int = Field(0, ge=0, le=2**53 - 1)
    slo: SLOSpec | None = Field(None, description="defaults to the target cluster's spec.slo")
    faults: list[FaultSpec] = Field(
        default_factory=list,
        max_length=64,
        description="Faults the operator carries out on the target cluster's pods during the test, timed from "
        "the load pod's start (atSeconds; afterRequests is for infemu run and the simulator).",
    )


class LoadTest(_Model):
    api_version: Literal["infemu.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["LoadTest"] = LOADTEST_KIND
    metadata: Metadata
    spec: LoadTestSpec
    status: dict[str, Any] | None = None


def parse_loadtest(data: Any, source: str = "") -> LoadTest:
    return validate_document(LoadTest, data, source)


def compact_summary(summary: dict) -> str:
    """The summary as JSON small enough for a termination message (4 KiB): floats rounded; when the
    fault windows do not fit, each keeps its outcome counts (requests.jsonl in the pod has the rest)."""

    def rnd(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        return v

    text = json.dumps(rnd(summary), separators=(",", ":"))
    if len(text.encode()) > TERMINATION_LIMIT and summary.get("faults"):
        keep = ("sent", "completed", "failed", "lost", "slo_attainment")
        faults = [
            {
                "name": f["name"],
                "start_s": f["start_s"],
                "end_s": f["end_s"],
                **{w: {k: f[w][k] for k in keep} for w in ("before", "during", "after")},
            }
            for f in summary["faults"]
        ]
        text = json.dumps(rnd({**summary, "faults": faults}), separators=(",", ":"))
    if len(text.encode()) > TERMINATION_LIMIT:
        raise ValueError(f"summary is {len(text)} bytes; a termination message holds {TERMINATION_LIMIT}")
    return text


def run_loadtest(
    target: str,
    model: str,
    workload: str,
    arrival: LoadTestArrival,
    duration_s: float,
    workers: int,
    seed: int,
    slo: SLOSpec,
    out_dir: str,
    summary_file: str | None = None,
    faults: list[dict] | None = None,
) -> dict:
    """Drive ``target`` with Locust and return the summary; also written to ``out_dir`` and,
    when given, ``summary_file`` (a pod's termination log). ``faults``: the schedule the operator
    plays, timed from this container's start ({name, kind, targets, start_s, end_s})."""
    from emulator.locust_driver import LocustLoad, run_locust
    from emulator.report import write_json
    from emulator.results import goodput, summarize

    shape = None if arrival.type == "closed" else arrival.type
    load = LocustLoad(workload, arrival.users, duration_s, shape, processes=workers)
    origin = time.perf_counter() - container_age_s()  # the container's start on the monotonic clock
    records, first_request = run_locust(load, target.rstrip("/"), model, out_dir, seed, with_origin=True)
    summary = summarize(records, slo.ttft_ms, slo.tpot_ms, slo.e2e_ms)
    if faults:
        from emulator.faults.accounting import fault_accounting

        # the operator times faults from the container's start; records count from the first request
        shift = first_request - origin
        timeline = [
            {**f, "start_s": f["start_s"] - shift, "end_s": None if f["end_s"] is None else f["end_s"] - shift}
            for f in faults
        ]
        end = max((r.finish_s for r in records if r.finish_s is not None), default=0.0)
        summary["faults"] = fault_accounting(records, timeline, slo.ttft_ms, slo.tpot_ms, end)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "summary.json"), summary)
    write_json(
        os.path.join(out_dir, "goodput.json"),
        goodput(records, slo.ttft_ms, slo.tpot_ms, summary["duration_s"], slo.e2e_ms),
    )
    with open(os.path.join(out_dir, "requests.jsonl"), "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_json()) + "\n")
    if summary_file:
        with open(summary_file, "w", encoding="utf-8") as fh:
            fh.write(compact_summary(summary))
    return summary


def container_age_s() -> float:
    """Seconds since this container started (PID 1 of a pod: the kubelet's ``startedAt``, which the
    operator times faults from); outside Kubernetes, since this process started. From /proc: the
    start time in clock ticks since boot, against the uptime."""
    pid = 1 if os.environ.get("KUBERNETES_SERVICE_HOST") else os.getpid()
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            start_ticks = int(fh.read().rsplit(") ", 1)[1].split()[19])
        with open("/proc/uptime", encoding="utf-8") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
