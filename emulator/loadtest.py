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
from typing import Any, Literal

from pydantic import Field, ValidationError

from emulator.errors import SpecError
from emulator.spec import API_VERSION, Metadata, SLOSpec, _Model, format_validation_error

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
    seed: int = 0
    slo: SLOSpec | None = Field(None, description="defaults to the target cluster's spec.slo")


class LoadTest(_Model):
    api_version: Literal["infemu.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["LoadTest"] = LOADTEST_KIND
    metadata: Metadata
    spec: LoadTestSpec
    status: dict[str, Any] | None = None


def parse_loadtest(data: Any, source: str = "") -> LoadTest:
    prefix = f"{source}: " if source else ""
    try:
        return LoadTest.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, data, prefix)) from None


def compact_summary(summary: dict) -> str:
    """The summary as JSON small enough for a termination message (4 KiB): floats rounded."""

    def rnd(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        return v

    text = json.dumps(rnd(summary), separators=(",", ":"))
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
) -> dict:
    """Drive ``target`` with Locust and return the summary; also written to ``out_dir`` and,
    when given, ``summary_file`` (a pod's termination log)."""
    from emulator.locust_driver import LocustLoad, run_locust
    from emulator.report import write_json
    from emulator.results import goodput, summarize

    shape = None if arrival.type == "closed" else arrival.type
    load = LocustLoad(workload, arrival.users, duration_s, shape, processes=workers)
    records = run_locust(load, target.rstrip("/"), model, out_dir, seed)
    summary = summarize(records, slo.ttft_ms, slo.tpot_ms)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "summary.json"), summary)
    write_json(os.path.join(out_dir, "goodput.json"), goodput(records, slo.ttft_ms, slo.tpot_ms, summary["duration_s"]))
    with open(os.path.join(out_dir, "requests.jsonl"), "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_json()) + "\n")
    if summary_file:
        with open(summary_file, "w", encoding="utf-8") as fh:
            fh.write(compact_summary(summary))
    return summary
