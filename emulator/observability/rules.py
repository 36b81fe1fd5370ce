"""Prometheus recording and alert rules for a spec's SLOs.

TTFT and per-token (ITL) attainment come from vLLM's histograms — the workers add the
SLO thresholds to the bucket boundaries, so ``le="<threshold>"`` is exact. DistServe's
per-request attainment (a request counts only when it meets *every* SLO) cannot be
derived from two histograms: the router counts it (``infemu_router_slo_requests_total``).
"""

from __future__ import annotations

from prometheus_client.utils import floatToGoString

from emulator.spec import SLOSpec

WINDOW = "5m"


def rules_for(slo: SLOSpec, window: str = WINDOW) -> dict:
    ttft = floatToGoString(round(slo.ttft_ms / 1e3, 6))
    tpot = floatToGoString(round(slo.tpot_ms / 1e3, 6))
    by = "sum by (model_name)"
    target = slo.attainment_target
    return {
        "groups": [
            {
                "name": "infemu-slo",
                "rules": [
                    {
                        "record": f"infemu:ttft_attainment:ratio_rate{window}",
                        "expr": f'{by} (rate(vllm:time_to_first_token_seconds_bucket{{le="{ttft}"}}[{window}]))'
                        f" / {by} (rate(vllm:time_to_first_token_seconds_count[{window}]))",
                    },
                    {
                        "record": f"infemu:itl_attainment:ratio_rate{window}",
                        "expr": f'{by} (rate(vllm:inter_token_latency_seconds_bucket{{le="{tpot}"}}[{window}]))'
                        f" / {by} (rate(vllm:inter_token_latency_seconds_count[{window}]))",
                    },
                    {
                        "record": f"infemu:slo_attainment:ratio_rate{window}",
                        "expr": f'{by} (rate(infemu_router_slo_requests_total{{met="true"}}[{window}]))'
                        f" / {by} (rate(infemu_router_slo_requests_total[{window}]))",
                    },
                    {
                        "record": f"infemu:goodput_requests:rate{window}",
                        "expr": f'{by} (rate(infemu_router_slo_requests_total{{met="true"}}[{window}]))',
                    },
                    {
                        "record": f"infemu:ttft_seconds:p90_{window}",
                        "expr": "histogram_quantile(0.9, sum by (model_name, le) "
                        f"(rate(vllm:time_to_first_token_seconds_bucket[{window}])))",
                    },
                    {
                        "record": f"infemu:itl_seconds:p90_{window}",
                        "expr": "histogram_quantile(0.9, sum by (model_name, le) "
                        f"(rate(vllm:inter_token_latency_seconds_bucket[{window}])))",
                    },
                ],
            },
            {
                "name": "infemu-alerts",
                "rules": [
                    {
                        "alert": "InfemuSLOAttainmentBelowTarget",
                        "expr": f"infemu:slo_attainment:ratio_rate{window} < {target}",
                        "for": "5m",
                        "labels": {"severity": "warning"},
                        "annotations": {
                            "summary": f"SLO attainment of {{{{ $labels.model_name }}}} is below "
                            f"{100 * target:g}% (TTFT <= {slo.ttft_ms:g} ms, "
                            f"TPOT <= {slo.tpot_ms:g} ms)"
                        },
                    },
                    {
                        "alert": "InfemuEmulationNotFaithful",
                        "expr": "max by (model_name) (infemu_emulation_overloaded) > 0",
                        "for": "2m",
                        "labels": {"severity": "warning"},
                        "annotations": {
                            "summary": "step timing error p99 exceeds 5% of the step: the host is too busy;"
                            " raise spec.emulation.timeDilation or run fewer instances"
                        },
                    },
                ],
            },
        ]
    }
