"""The InferencePool the operator creates for a gateway, checked against the upstream CRD's
schema, and the workers' metrics checked against the extension's model-server protocol."""

from __future__ import annotations

import os

import jsonschema
import pytest
import yaml
from conftest import ROOT, example
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from emulator.serve.metrics import EngineMetrics
from emulator.spec import parse_cluster
from infemu_operator.desired import desired_children
from infemu_operator.gateway import INFERENCE_POOL_KIND

CRD = os.path.join(
    ROOT, "tests", "data", "gateway-api-inference-extension", "inference.networking.k8s.io_inferencepools.yaml"
)


def _schema() -> dict:
    with open(CRD, encoding="utf-8") as fh:
        crd = yaml.safe_load(fh)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def _cluster(file: str, pool: dict | None):
    with open(example(file), encoding="utf-8") as fh:
        doc = next(d for d in yaml.safe_load_all(fh) if d and d.get("kind") == "InferenceCluster")
    if pool is not None:
        doc["spec"]["gateway"] = {"inferencePool": pool}
    return parse_cluster(doc, file)


def _pool_and_pods(file: str, pool: dict | None):
    children = desired_children(_cluster(file, pool), "lab")
    pools = [c for c in children if c["kind"] == INFERENCE_POOL_KIND]
    pods = {
        c["metadata"]["name"]: c["spec"]["template"]["metadata"]["labels"]
        for c in children
        if c["kind"] in ("StatefulSet", "Deployment")
    }
    return pools, pods


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_no_inference_pool_unless_the_spec_asks():
    pools, _ = _pool_and_pods("quickstart.yaml", None)
    assert pools == []


@pytest.mark.parametrize("file", ["quickstart.yaml", "pd-llama70b-h100.yaml"])
def test_the_pool_is_valid_for_the_upstream_crd_and_selects_the_serving_workers_only(file):
    (pool,), pods = _pool_and_pods(file, {"enabled": True, "endpointPicker": {"name": "gw-epp", "port": 9002}})
    jsonschema.validate(pool, _schema())  # the CRD's structural schema (CEL rules: the API server, in e2e)
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {
        "kind": "Service",
        "name": "gw-epp",
        "port": {"number": 9002},
        "failureMode": "FailClose",
    }
    selected = {name for name, labels in pods.items() if _selects(pool["spec"]["selector"], labels)}
    assert selected == {name for name in pods if not name.endswith("-router")}
    roles = {name.rsplit("-", 1)[-1]: pods[name]["llm-d.ai/role"] for name in selected}
    assert roles == ({"agg": "both"} if file == "quickstart.yaml" else {"prefill": "prefill", "decode": "decode"})


def test_a_broken_pool_spec_names_the_field():
    from emulator.errors import SpecError

    with pytest.raises(SpecError) as err:
        _cluster("quickstart.yaml", {"enabled": True, "endpointPicker": {"name": "Bad_Name"}})
    assert "spec.gateway.inferencePool.endpointPicker.name" in str(err.value)


def test_workers_serve_the_model_server_protocol_metrics_an_endpoint_picker_reads():
    """Gateway API Inference Extension, docs/proposals/003-model-server-protocol: queue, running,
    KV-cache utilisation, the cache config (block size, GPU blocks) and the LoRA adapter info."""
    m = EngineMetrics("llama", 8192, {"block_size": "16", "num_gpu_blocks": "1000"})
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    for gauge in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert families[gauge].type == "gauge"
    (info,) = families["vllm:cache_config_info"].samples
    assert info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == "1000"
    (lora,) = families["vllm:lora_requests_info"].samples
    assert {"max_lora", "running_lora_adapters", "waiting_lora_adapters"} <= set(lora.labels)
    assert lora.value > 1.7e9  # the time of the last update, as vLLM reports it
