"""Gateway integration: a Gateway API Inference Extension ``InferencePool`` per InferenceCluster.

An inference gateway (kgateway, Istio, GKE's, ...) routes to an InferencePool through its
endpoint picker (EPP), which scrapes every selected pod's vLLM metrics (queue, running requests,
KV-cache usage, LoRA adapters: the extension's model-server protocol) and picks a pod per
request. infemu workers serve those metrics under vLLM's names, so an EPP treats them as vLLM.

The pool selects the cluster's serving workers (aggregated, prefill and decode pods; not the
router) on their HTTP port. Each worker pod carries ``llm-d.ai/role`` — ``both`` (aggregated),
``prefill`` or ``decode`` — the label llm-d's P/D-aware scheduler filters on.

Schema: inference.networking.k8s.io/v1 InferencePool, from kubernetes-sigs/
gateway-api-inference-extension (Apache-2.0), config/crd/bases/
inference.networking.k8s.io_inferencepools.yaml; a copy is in tests/data/ for validation.
"""

from __future__ import annotations

from emulator.roles import roles
from emulator.spec import InferenceCluster

INFERENCE_POOL_API = "inference.networking.k8s.io/v1"
INFERENCE_POOL_KIND = "InferencePool"
ROLE_LABEL = "llm-d.ai/role"
POOL_LABEL = "infemu.io/inference-pool"  # on serving worker pods: the pool's selector
SERVING_ROLES = {name: info.gateway_label for name, info in roles().items() if info.gateway_label}
DEFAULT_EPP_PORT = 9002  # the upstream EPP's gRPC ext-proc port


def pod_labels(cluster: InferenceCluster, role: str) -> dict[str, str]:
    """Labels a worker pod of ``role`` carries for gateways (none for roles that do not serve)."""
    if role not in SERVING_ROLES:
        return {}
    return {ROLE_LABEL: SERVING_ROLES[role], POOL_LABEL: cluster.name}


def inference_pool(cluster: InferenceCluster, namespace: str, port: int, labels: dict[str, str]) -> dict | None:
    """The InferencePool manifest, or None when the spec does not ask for one."""
    spec = cluster.spec.gateway.inference_pool
    if not spec.enabled:
        return None
    epp = spec.endpoint_picker
    return {
        "apiVersion": INFERENCE_POOL_API,
        "kind": INFERENCE_POOL_KIND,
        "metadata": {"name": cluster.name, "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {POOL_LABEL: cluster.name}},
            # a dense pod (emulator.packing) serves one instance per port: each is an endpoint of its own
            "targetPorts": [{"number": port + s} for s in range(cluster.spec.emulation.instances_per_process)],
            "appProtocol": "http",
            "endpointPickerRef": {
                "kind": "Service",
                "name": epp.name if epp else f"{cluster.name}-epp",
                "port": {"number": epp.port if epp else DEFAULT_EPP_PORT},
                "failureMode": epp.failure_mode if epp else "FailClose",
            },
        },
    }
