"""A small, dict-in dict-out Kubernetes REST layer over the official client's ``ApiClient``.

The reconcile works on plain manifests (dicts), so typed models would only add a round trip
through generated classes. Every call here goes through ``ApiClient.call_api`` — the client's
own auth, TLS and kubeconfig handling — with ``_preload_content=False`` and JSON parsing of our
own. ``apply`` is the operator's idempotency primitive: create, and on 409 (already exists)
merge-patch the same manifest.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

# kind -> plural for everything the operator reads or writes (RESTMapper, minus discovery)
PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "Pod": "pods",
    "StatefulSet": "statefulsets",
    "Deployment": "deployments",
    "Job": "jobs",
    "InferenceCluster": "inferenceclusters",
    "LoadTest": "loadtests",
    "Fault": "faults",
    "InferencePool": "inferencepools",
}
MERGE_PATCH = "application/merge-patch+json"


def load_config() -> None:
    """In a pod: the service account; elsewhere: the current kubeconfig context (like kubectl)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        # read $KUBECONFIG now: the client evaluates its default path once, at import time
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None, subresource: str = "") -> str:
    """The REST path; ``namespace=None`` lists across every namespace."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    out = f"{base}/namespaces/{namespace}/{PLURALS[kind]}" if namespace else f"{base}/{PLURALS[kind]}"
    if name:
        out += f"/{name}"
    if subresource:
        out += f"/{subresource}"
    return out


class Kube:
    """Namespaced CRUD on manifests. Errors surface as ``ApiException`` with the server's message."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or client.ApiClient()

    def _call(
        self, method: str, url: str, body: Any = None, query: list | None = None, content_type: str | None = None
    ) -> dict:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        resp = self.api.call_api(
            url,
            method,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
        )
        data = resp.data
        return json.loads(data) if data else {}

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self._call("GET", path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self, api_version: str, kind: str, namespace: str | None, labels: dict[str, str] | None = None
    ) -> list[dict]:
        """Objects matching every label; the selector is also applied here, so a server (or an
        emulator) that ignores ``labelSelector`` cannot widen the result."""
        labels = labels or {}
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in labels.items()))] if labels else []
        items = self._call("GET", path(api_version, kind, namespace), query=query).get("items", [])
        return [o for o in items if all(o.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items())]

    def create(self, obj: dict) -> dict:
        meta = obj["metadata"]
        return self._call("POST", path(obj["apiVersion"], obj["kind"], meta["namespace"]), body=obj)

    def patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict, subresource: str = "") -> dict:
        url = path(api_version, kind, namespace, name, subresource)
        return self._call("PATCH", url, body=patch, content_type=MERGE_PATCH)

    def delete(self, api_version: str, kind: str, namespace: str, name: str, grace_period_s: int | None = None) -> None:
        body: dict = {"propagationPolicy": "Background"}
        if grace_period_s is not None:  # 0: killed at once, as a crash would (a chaos kill)
            body["gracePeriodSeconds"] = grace_period_s
        try:
            self._call("DELETE", path(api_version, kind, namespace, name), body=body)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def apply(self, obj: dict) -> str:
        """Create, or merge-patch on conflict. Returns ``"created"`` or ``"patched"``."""
        try:
            self.create(obj)
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
        meta = obj["metadata"]
        self.patch(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"], obj)
        return "patched"


def api_message(exc: ApiException) -> str:
    """The API server's own message (what ``kubectl`` prints), not the client's HTTP dump."""
    try:
        return json.loads(exc.body).get("message") or str(exc.reason)
    except (TypeError, ValueError):
        return f"{exc.status} {exc.reason}"
