"""Command-line overrides of a spec's workload, validated like the spec itself.

Lengths given on the command line are exact (a fixed distribution); ``--rate``
makes arrivals open-loop Poisson unless the spec already names an open-loop
law; ``--requests`` and ``--duration`` each replace the spec's stop condition.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from emulator.errors import SpecError
from emulator.spec import ClusterSpec, InferenceCluster, WorkloadSpec, format_validation_error
from emulator.workload.plan import detect_trace_format


@dataclass(frozen=True)
class WorkloadOverrides:
    rate: float | None = None
    requests: int | None = None
    duration: float | None = None
    concurrency: int | None = None
    input_len: int | None = None
    output_len: int | None = None
    trace: str | None = None
    trace_format: str | None = None
    seed: int | None = None
    warmup_requests: int | None = None
    prompt_pool: int | None = None
    max_connections: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in vars(self).values())


def apply_overrides(cluster: InferenceCluster, ov: WorkloadOverrides) -> InferenceCluster:
    if not ov.any():
        return cluster
    wl = cluster.spec.workload.model_dump(by_alias=True, exclude_none=True)
    arrival = dict(wl.get("arrival", {"type": "poisson"}))
    if ov.trace is not None:
        arrival = {"type": "trace", "path": ov.trace, "format": ov.trace_format or detect_trace_format(ov.trace)}
        wl["inputLength"] = {"type": "trace"}
        wl["outputLength"] = {"type": "trace"}
        wl.pop("requests", None)
        wl.pop("duration", None)
    if ov.concurrency is not None:
        arrival = {"type": "concurrency", "n": ov.concurrency}
    if ov.rate is not None:
        wl["rate"] = ov.rate
        if arrival.get("type") in ("concurrency", "trace") and ov.concurrency is None and ov.trace is None:
            arrival = {"type": "poisson"}
    if ov.requests is not None:
        wl["requests"] = ov.requests
        if ov.duration is None:
            wl.pop("duration", None)
    if ov.duration is not None:
        wl["duration"] = ov.duration
        if ov.requests is None:
            wl.pop("requests", None)
    if ov.input_len is not None:
        wl["inputLength"] = {"type": "fixed", "value": ov.input_len}
    if ov.output_len is not None:
        wl["outputLength"] = {"type": "fixed", "value": ov.output_len}
    if ov.seed is not None:
        wl["seed"] = ov.seed
    client = dict(wl.get("client", {}))
    if ov.warmup_requests is not None:
        client["warmupRequests"] = ov.warmup_requests
    if ov.prompt_pool is not None:
        client["promptPool"] = ov.prompt_pool
    if ov.max_connections is not None:
        client["maxConnections"] = ov.max_connections
    if client:
        wl["client"] = client
    wl["arrival"] = arrival
    try:
        workload = WorkloadSpec.model_validate(wl)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, wl, "command line: spec.workload.")) from None
    spec: ClusterSpec = cluster.spec.model_copy(update={"workload": workload})
    return cluster.model_copy(update={"spec": spec})
