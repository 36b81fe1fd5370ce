"""The ``Fault`` resource: one fault on a running InferenceCluster's pods, now, on Kubernetes.

``kubectl apply`` it and the operator carries it out at once (as ``infemu fault inject`` does on a
local cluster); it is cleared when ``durationSeconds`` is over or when the resource is deleted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, model_validator

from emulator.faults.schedule import Fault, resolve_one
from emulator.spec import (
    API_VERSION,
    FaultAction,
    FaultSpec,
    InferenceCluster,
    Metadata,
    _Model,
    validate_document,
)

FAULT_KIND = "Fault"


class FaultResourceSpec(FaultAction):
    cluster: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="the InferenceCluster (same namespace) whose pods it hits",
    )

    @model_validator(mode="after")
    def _on_pods(self) -> FaultResourceSpec:
        if self.kind == "burst":
            raise ValueError("a burst is load, not a fault on pods: use a LoadTest with arrival.type: burst")
        return self


class FaultResource(_Model):
    api_version: Literal["infemu.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["Fault"] = FAULT_KIND
    metadata: Metadata
    spec: FaultResourceSpec
    status: dict[str, Any] | None = None


def parse_fault_resource(data: Any, source: str = "") -> FaultResource:
    return validate_document(FaultResource, data, source)


def resolve_resource(fr: FaultResource, cluster: InferenceCluster) -> Fault:
    """The resource's fault against its cluster's topology, named after the resource."""
    action = fr.spec.model_dump(by_alias=True, exclude_none=True, exclude={"cluster"})
    fault = resolve_one(cluster.spec, FaultSpec.model_validate({**action, "atSeconds": 0}), "spec")
    return dataclasses.replace(fault, name=fr.metadata.name)
