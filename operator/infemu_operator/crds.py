"""The ``InferenceCluster`` CRD, generated from the same pydantic spec the CLI validates with.

Pydantic's JSON Schema becomes a Kubernetes *structural* schema: references inlined, every
field typed, ``Optional`` as ``nullable``, discriminated unions merged into one object whose
``type`` is an enum (the API server cannot branch on a discriminator; the operator's pydantic
validation still enforces each variant), JSON Schema 2020 exclusive bounds rewritten the
OpenAPI 3.0 way, titles and defaults dropped (pydantic applies the defaults). Cross-field rules
(TP divides the heads, weights fit, ...) stay in the operator, which reports them as a
``Ready=False`` condition naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from emulator.faults.resource import FAULT_KIND, FaultResourceSpec
from emulator.loadtest import LOADTEST_KIND, LoadTestSpec
from emulator.spec import API_VERSION, KIND, ClusterSpec

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "inferenceclusters"
LOADTEST_PLURAL = "loadtests"
FAULT_PLURAL = "faults"


def _resolve(node: Any, defs: dict) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _resolve(defs[node["$ref"].split("/")[-1]], defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _merge_union(variants: list[dict]) -> dict:
    props: dict[str, Any] = {}
    tags = []
    for v in variants:
        for name, sub in v.get("properties", {}).items():
            if name == "type":
                tags.extend(sub.get("enum") or [sub.get("const")])
                continue
            props.setdefault(name, sub)
    return {"type": "object", "properties": {"type": {"type": "string", "enum": tags}, **props}, "required": ["type"]}


def structural(node: Any) -> Any:
    """Rewrite one (resolved) JSON Schema node into a structural OpenAPI v3 schema node."""
    if not isinstance(node, dict):
        return node
    if "oneOf" in node:  # a discriminated union
        merged = _merge_union([structural(v) for v in node["oneOf"]])
        if "description" in node:
            merged["description"] = node["description"]
        return merged
    if "anyOf" in node:
        non_null = [v for v in node["anyOf"] if v.get("type") != "null"]
        out = structural(non_null[0]) if len(non_null) == 1 else {"x-kubernetes-preserve-unknown-fields": True}
        if len(non_null) < len(node["anyOf"]):
            out = {**out, "nullable": True}
        if "description" in node:
            out["description"] = node["description"]
        return out
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "default", "additionalProperties", "discriminator"):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out["properties"] = {k: structural(v) for k, v in value.items()}
        elif key == "items":
            out["items"] = structural(value)
        else:
            out[key] = value
    if "properties" in out:
        out["type"] = "object"
        out.pop("required", None) if not out.get("required") else None
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if not any(k in out for k in ("type", "x-kubernetes-preserve-unknown-fields")):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def spec_schema(model: type[BaseModel] = ClusterSpec) -> dict:
    raw = model.model_json_schema(by_alias=True)
    return structural(_resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {})))


CONDITIONS_SCHEMA = {
    "type": "array",
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
    "items": {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
        },
    },
}

STATUS_SCHEMA = {
    "type": "object",
    "properties": {
        "observedGeneration": {"type": "integer", "nullable": True},
        "appliedAt": {"type": "string", "format": "date-time"},
        "conditions": CONDITIONS_SCHEMA,
        "pools": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "role": {"type": "string"},
                    "ready": {"type": "integer"},
                    "desired": {"type": "integer"},
                },
            },
        },
        "router": {"type": "string"},
    },
    "x-kubernetes-preserve-unknown-fields": True,  # kopf keeps its handler progress here
}

FAULT_ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"type": "string"},
        "targets": {"type": "array", "items": {"type": "string"}},
        "state": {"type": "string", "enum": ["Active", "Restarting", "Cleared", "Failed"]},
        "startedAt": {"type": "string", "format": "date-time"},
        "endedAt": {"type": "string", "format": "date-time"},
        "cut": {"type": "boolean"},
        "message": {"type": "string"},
        # each member's pod life (uid/restarts) the fault was last applied to: a new life gets it again
        "appliedTo": {"type": "object", "additionalProperties": {"type": "string", "nullable": True}},
    },
}

FAULT_STATUS_SCHEMA = {**FAULT_ITEM_SCHEMA, "x-kubernetes-preserve-unknown-fields": True}


LOADTEST_STATUS_SCHEMA = {
    "type": "object",
    "properties": {
        "phase": {"type": "string", "enum": ["Pending", "Running", "Succeeded", "Failed"]},
        "message": {"type": "string"},
        "job": {"type": "string"},
        "target": {"type": "string"},
        "summaryConfigMap": {"type": "string"},
        "attainment": {"type": "string", "description": "SLO attainment of the run as a percentage, e.g. 97.5%"},
        "startTime": {"type": "string", "format": "date-time"},
        "completionTime": {"type": "string", "format": "date-time"},
        "conditions": CONDITIONS_SCHEMA,
        "summary": {
            "type": "object",
            "description": "the same keys as `infemu sim --json`",
            "x-kubernetes-preserve-unknown-fields": True,
        },
        "faults": {
            "type": "array",
            "description": "each spec.faults entry as the operator carried it out",
            "items": FAULT_ITEM_SCHEMA,
        },
    },
    "x-kubernetes-preserve-unknown-fields": True,
}


def _crd(
    kind: str, plural: str, short_names: list[str], spec: dict, status: dict, columns: list[dict], description: str
) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": plural,
                "singular": kind.lower(),
                "kind": kind,
                "shortNames": short_names,
                "categories": ["infemu"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *columns,
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def inference_cluster_crd() -> dict:
    return _crd(
        KIND,
        PLURAL,
        ["ic", "infc"],
        spec_schema(ClusterSpec),
        STATUS_SCHEMA,
        [
            {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
            {"name": "GPU", "type": "string", "jsonPath": ".spec.gpu"},
            {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
            {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
            {"name": "Router", "type": "string", "jsonPath": ".status.router", "priority": 1},
        ],
        "An emulated LLM inference cluster (infemu).",
    )


def loadtest_crd() -> dict:
    return _crd(
        LOADTEST_KIND,
        LOADTEST_PLURAL,
        ["lt"],
        spec_schema(LoadTestSpec),
        LOADTEST_STATUS_SCHEMA,
        [
            {"name": "Cluster", "type": "string", "jsonPath": ".spec.cluster"},
            {"name": "Workload", "type": "string", "jsonPath": ".spec.workload"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Attainment", "type": "string", "jsonPath": ".status.attainment"},
            {"name": "TTFT-p99", "type": "number", "jsonPath": ".status.summary.ttft_ms.p99", "priority": 1},
        ],
        "A Locust load test against an InferenceCluster's router (infemu); its spec is read once, at creation.",
    )


def fault_crd() -> dict:
    return _crd(
        FAULT_KIND,
        FAULT_PLURAL,
        ["flt"],
        spec_schema(FaultResourceSpec),
        FAULT_STATUS_SCHEMA,
        [
            {"name": "Cluster", "type": "string", "jsonPath": ".spec.cluster"},
            {"name": "Kind", "type": "string", "jsonPath": ".spec.kind"},
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "Started", "type": "date", "jsonPath": ".status.startedAt", "priority": 1},
        ],
        "A fault on a running InferenceCluster's pods, carried out at once and cleared when its duration is "
        "over or it is deleted (infemu chaos).",
    )


def all_crds() -> dict[str, dict]:
    """File name -> CRD, as the chart's crds/ folder holds them."""
    return {f"{c['metadata']['name']}.yaml": c for c in (inference_cluster_crd(), loadtest_crd(), fault_crd())}
