"""Regenerate dashboards/grafana/infemu-fleet.json (the panels' queries live here, reviewed as code).

python tools/make_dashboard.py
"""

from __future__ import annotations

import json
import os

SEL = 'model_name=~"$model_name", namespace=~"$namespace"'
# Per-instance panels group by pod and scrape endpoint (the port's name, ServiceMonitor targets):
# a dense pod (spec.emulation.instancesPerProcess) hosts one instance per port.
NS = 'namespace=~"$namespace"'  # the router's and the retrievers' families carry no model label
PANELS = [
    (
        "SLO attainment (per request, router)",
        "percentunit",
        [
            (
                'sum(rate(infemu_router_slo_requests_total{met="true", ' + SEL + "}[$__rate_interval]))"
                " / sum(rate(infemu_router_slo_requests_total{" + SEL + "}[$__rate_interval]))",
                "joint",
            )
        ],
    ),
    (
        "TTFT / ITL attainment (histograms)",
        "percentunit",
        [
            ('infemu:ttft_attainment:ratio_rate5m{model_name=~"$model_name"}', "TTFT"),
            ('infemu:itl_attainment:ratio_rate5m{model_name=~"$model_name"}', "ITL"),
        ],
    ),
    (
        "TTFT quantiles",
        "s",
        [
            (
                f"histogram_quantile({q}, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{{{SEL}}}"
                "[$__rate_interval])))",
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.9, 0.99)
        ],
    ),
    (
        "Inter-token latency quantiles",
        "s",
        [
            (
                f"histogram_quantile({q}, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket{{{SEL}}}"
                "[$__rate_interval])))",
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.9, 0.99)
        ],
    ),
    (
        "Throughput",
        "short",
        [
            (f"sum(rate(vllm:generation_tokens_total{{{SEL}}}[$__rate_interval]))", "output tok/s"),
            (f"sum(rate(vllm:prompt_tokens_total{{{SEL}}}[$__rate_interval]))", "prompt tok/s"),
            (f"sum(rate(vllm:request_success_total{{{SEL}}}[$__rate_interval]))", "requests/s"),
        ],
    ),
    (
        "Queue per instance",
        "short",
        [
            (f"sum by (pod, endpoint) (vllm:num_requests_waiting{{{SEL}}})", "waiting {{pod}} {{endpoint}}"),
            (f"sum by (pod, endpoint) (vllm:num_requests_running{{{SEL}}})", "running {{pod}} {{endpoint}}"),
        ],
    ),
    (
        "KV-cache usage per instance",
        "percentunit",
        [(f"max by (pod, endpoint) (vllm:kv_cache_usage_perc{{{SEL}}})", "{{pod}} {{endpoint}}")],
    ),
    (
        "Link utilisation per tier (logical bytes/s)",
        "Bps",
        [
            (
                f"sum by (tier, direction) (rate(infemu_link_bytes_total{{{SEL}}}[$__rate_interval]))",
                "{{tier}} {{direction}}",
            )
        ],
    ),
    (
        "KV transfer time",
        "s",
        [
            (
                "histogram_quantile(0.9, sum by (le) "
                f"(rate(infemu_kv_transfer_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                "p90",
            )
        ],
    ),
    (
        "MoE / AFD: each side's busy share of the step (1 - micro-batch bubble)",
        "percentunit",
        [
            (
                f"sum by (pod, endpoint, side) (rate(infemu_afd_busy_seconds_total{{{SEL}}}[$__rate_interval]))"
                " / on (pod, endpoint) group_left"
                f" sum by (pod, endpoint) (rate(infemu_afd_step_seconds_total{{{SEL}}}[$__rate_interval]))",
                "{{side}} {{pod}} {{endpoint}}",
            )
        ],
    ),
    (
        "MoE / AFD: activation exchange (logical bytes/s per tier, and its share of the step)",
        "Bps",
        [
            (
                f'sum by (tier, direction) (rate(infemu_link_bytes_total{{direction=~"afd_.*", {SEL}}}'
                "[$__rate_interval]))",
                "{{tier}} {{direction}}",
            ),
        ],
    ),
    (
        "RAG pipelines: end-to-end latency p90 by pipeline type",
        "s",
        [
            (
                "histogram_quantile(0.9, sum by (le, pipeline) (rate(infemu_pipeline_e2e_seconds_bucket"
                f"{{{NS}}}[$__rate_interval])))",
                "{{pipeline}}",
            )
        ],
    ),
    (
        "RAG pipelines: mean time per request in each stage",
        "s",
        [
            (
                f"sum by (stage) (rate(infemu_pipeline_stage_seconds_sum{{{NS}}}[$__rate_interval]))"
                f' / scalar(sum(rate(infemu_pipeline_requests_total{{outcome="ok", {NS}}}[$__rate_interval])))',
                "{{stage}}",
            )
        ],
    ),
    (
        "Retriever: mean batch (queries per retrieval batch)",
        "short",
        [
            (
                f"sum(rate(infemu_retrieval_batch_size_sum{{{NS}}}[$__rate_interval]))"
                f" / sum(rate(infemu_retrieval_batch_size_count{{{NS}}}[$__rate_interval]))",
                "mean batch",
            )
        ],
    ),
    (
        "KV store: share of asked-for blocks held, and traffic (logical bytes/s)",
        "Bps",
        [
            (
                f'sum by (direction) (rate(infemu_link_bytes_total{{direction=~"kvstore_.*", {SEL}}}'
                "[$__rate_interval]))",
                "{{direction}}",
            ),
            (
                f"sum(rate(infemu_kvstore_hit_blocks_total{{{SEL}}}[$__rate_interval]))"
                f" / sum(rate(infemu_kvstore_lookup_blocks_total{{{SEL}}}[$__rate_interval]))",
                "hit share (0-1)",
            ),
        ],
    ),
    (
        "Emulation timing error (p99, and as a share of the step)",
        "s",
        [
            (
                f"max by (pod, endpoint) (infemu_iteration_timing_error_p99_seconds{{{SEL}}})",
                "p99 {{pod}} {{endpoint}}",
            ),
            (f"max by (pod, endpoint) (infemu_emulation_overloaded{{{SEL}}})", "overloaded {{pod}} {{endpoint}}"),
        ],
    ),
]


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(targets)
                ],
            }
        )
    var = {
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "refresh": 2,
        "current": {"text": "All", "value": "$__all"},
    }
    return {
        "title": "infemu fleet",
        "uid": "infemu-fleet",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "tags": ["infemu", "vllm", "slo"],
        "templating": {
            "list": [
                {"type": "datasource", "name": "datasource", "query": "prometheus", "current": {}},
                {
                    **var,
                    "name": "namespace",
                    "label": "namespace",
                    "definition": "label_values(vllm:num_requests_running, namespace)",
                    "query": {"query": "label_values(vllm:num_requests_running, namespace)", "refId": "ns"},
                },
                {
                    **var,
                    "name": "model_name",
                    "label": "model",
                    "definition": "label_values(vllm:num_requests_running, model_name)",
                    "query": {"query": "label_values(vllm:num_requests_running, model_name)", "refId": "model"},
                },
            ]
        },
        # the chaos run's faults (the injector's infemu_fault_active annotation) as regions on every panel
        "annotations": {
            "list": [
                {
                    "name": "Injected faults",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "enable": True,
                    "iconColor": "red",
                    "expr": "max by (fault, kind) (infemu_fault_active) > 0",
                    "step": "1s",
                    "titleFormat": "{{fault}} ({{kind}})",
                    "tagKeys": "kind",
                }
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    out = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dashboards", "grafana", "infemu-fleet.json"
    )
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(dashboard(), fh, indent=2)
        fh.write("\n")
    print(out)
