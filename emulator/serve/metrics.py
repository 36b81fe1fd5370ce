"""The metrics adapter: engine stats and request timings in, vLLM's Prometheus families out.

Names, types, labels (``model_name``, ``engine``) and buckets follow vLLM v1's
``vllm/v1/metrics/loggers.py`` (current names and the legacy ones routers still
scrape), plus ``infemu_*`` families for the emulation's own fidelity and for
KV transfers. The engine never imports prometheus_client (STYLE principle 9).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

disable_created_metrics()  # vLLM does the same: no *_created series

PROMPT_TOKEN_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")  # vLLM's source label

TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
TPOT_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
REQUEST_LATENCY_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]
ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
TIMING_ERROR_BUCKETS = [-0.001, 0.0, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5]
TRANSFER_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
FINISH_REASONS = ("stop", "length", "abort")


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """vLLM's [1, 2, 5, 10, 20, 50, ...] up to max_value."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_value:
                return out
            out.append(v)
        exp += 1


def with_thresholds(buckets: list[float], thresholds: list[float]) -> list[float]:
    """vLLM's buckets plus the SLO thresholds, so attainment can be read from the histogram."""
    return sorted({*buckets, *(round(t, 6) for t in thresholds if t > 0)})


class ArrayHistogram(Collector):
    """A histogram that takes many values in one call, exposed exactly as prometheus_client's Histogram
    (same buckets with +Inf, ``_count`` and ``_sum``). The per-token families take a finished request's
    token gaps as one array: one ``observe`` per gap was two Python calls per streamed token on the
    worker's hot path."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        labelvalues: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._doc = name, documentation
        self._labelnames, self._labelvalues = list(labelnames), list(labelvalues)
        self._bounds = np.array([*buckets, np.inf], dtype=np.float64)
        self._les = [floatToGoString(b) for b in self._bounds]
        self._counts = np.zeros(len(self._bounds), dtype=np.int64)
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        if len(values):
            # a value equal to a bound counts in that bound's bucket (le: less than or equal)
            self._counts += np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._les))
            # added one by one, as Histogram.observe does (np.sum's pairwise order differs in the last bits)
            self._sum = float(np.add.accumulate(np.concatenate(([self._sum], values)))[-1])

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        cumulative = np.cumsum(self._counts).tolist()
        family.add_metric(
            self._labelvalues, [(le, float(c)) for le, c in zip(self._les, cumulative, strict=True)], self._sum
        )
        yield family


class EngineMetrics:
    """One engine's families in its own registry (several engines may share a process)."""

    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        cache_info: dict[str, str],
        engine: str = "0",
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        lv = (model_name, engine)
        r = self.registry

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(*lv)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=r).labels(*lv)

        def hist(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*lv)

        # the process, Python and GC families prometheus_client exports by default, as vLLM's API
        # server does in single-process mode (docs/design/metrics.md, "Built in Python/Process Metrics")
        for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(default)
        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        waiting_by_reason = Gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of requests waiting to be processed, by reason: capacity (KV blocks, the batch or "
            "token budget) or deferred (here: a KV pull from a prefill instance in flight).",
            [*labels, "reason"],
            registry=r,
        )
        self.waiting_capacity = waiting_by_reason.labels(*lv, "capacity")
        self.waiting_deferred = waiting_by_reason.labels(*lv, "deferred")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.gpu_cache_usage = gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
        )
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            [*sorted(cache_info), "engine"],
            registry=r,
        )
        info.labels(**cache_info, engine=engine).set(1)
        # The LoRA metric the Gateway API Inference Extension's endpoint picker reads for adapter
        # affinity (its model-server protocol, proposal 003; vLLM's name and labels; the value is
        # the time of the last update). infemu serves the base model only: no adapter is loaded
        # or waiting, and none can be (max_lora 0), stated rather than left for the picker to guess.
        self.lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=r,
        )
        self.lora_info.labels("0", "", "").set(time.time())
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.gpu_prefix_queries = counter("vllm:gpu_prefix_cache_queries", "GPU prefix cache queries (DEPRECATED).")
        self.gpu_prefix_hits = counter("vllm:gpu_prefix_cache_hits", "GPU prefix cache hits (DEPRECATED).")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        by_source = Counter(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source: computed here, found in the local prefix cache, or "
            "received over a KV transfer (a P/D prefill instance or the remote KV store).",
            [*labels, "source"],
            registry=r,
        )
        self.prompt_by_source = {src: by_source.labels(*lv, src) for src in PROMPT_TOKEN_SOURCES}
        self.prompt_tokens_cached = counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local prefix cache and KV transfers)."
        )
        self.external_prefix_queries = counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache (the remote KV store) queries, in terms of number of queried tokens.",
        )
        self.external_prefix_hits = counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache (the remote KV store) hits, in terms of number of cached tokens.",
        )
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.success = {reason: success.labels(*lv, reason) for reason in FINISH_REASONS}
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.req_prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.req_generation_tokens = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        # request parameters, as vLLM v1 reports them (vllm/v1/metrics/loggers.py, commit 005a810b)
        self.req_max_generation_tokens = hist(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            token_buckets,
        )
        self.req_params_n = hist("vllm:request_params_n", "Histogram of the n request parameter.", [1, 2, 5, 10, 20])
        self.req_params_max_tokens = hist(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets
        )
        self.iteration_tokens = hist(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKEN_BUCKETS
        )
        ttft_buckets = with_thresholds(TTFT_BUCKETS, [slo_ttft_s or 0])
        tpot_buckets = with_thresholds(TPOT_BUCKETS, [slo_tpot_s or 0])
        self.ttft = hist(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", ttft_buckets
        )
        self.itl = ArrayHistogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            lv,
            tpot_buckets,
            r,
        )
        self.tpot = ArrayHistogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds. DEPRECATED: Use vllm:inter_token_latency_seconds.",
            labels,
            lv,
            tpot_buckets,
            r,
        )
        self.prefill_per_token = hist(
            "vllm:time_per_prefill_token_request_seconds",
            "Time spent per token during prefill phase in seconds",
            [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
        )
        # per request: its decode time over its output tokens (vLLM 0.11's per-request TPOT, beside the
        # per-token inter-token latency above)
        self.request_tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            tpot_buckets,
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self.queue = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.inference = hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prefill = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.decode = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.store_fetched_total = 0  # prompt tokens fetched from the KV store (the store client adds)
        self._sources = dict.fromkeys(PROMPT_TOKEN_SOURCES, 0)
        # ---- infemu: fidelity of the emulation itself
        self.timing_error = hist(
            "infemu_iteration_timing_error_seconds",
            "Measured minus modelled end of each engine step (wake-up lateness).",
            TIMING_ERROR_BUCKETS,
        )
        self.modelled = hist(
            "infemu_iteration_modelled_seconds",
            "Modelled duration of each engine step.",
            [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0],
        )
        self.timing_error_p99 = gauge(
            "infemu_iteration_timing_error_p99_seconds", "p99 of the step timing error over the last 1000 steps."
        )
        self.timing_error_ratio = gauge(
            "infemu_iteration_timing_error_ratio", "Step timing error p99 divided by the median modelled step."
        )
        self.overloaded = gauge(
            "infemu_emulation_overloaded",
            "1 when the timing error p99 exceeds 5% of the median step: results are not faithful.",
        )
        self.suggested_dilation = gauge(
            "infemu_emulation_suggested_time_dilation",
            "The spec.emulation.timeDilation that would bring the timing error p99 under 5% of the median step"
            " (the lateness is wall time, a step lasts D times longer); the current D when within the budget.",
        )
        # ---- infemu: KV transfers and links
        self.kv_bytes = counter("infemu_kv_transfer_bytes", "Logical KV-cache bytes pulled by this instance.")
        self.kv_seconds = hist("infemu_kv_transfer_seconds", "Duration of each KV-cache pull.", TRANSFER_BUCKETS)
        self.link_bytes = Counter(
            "infemu_link_bytes",
            "Logical bytes sent per link tier and direction.",
            [*labels, "tier", "direction"],
            registry=r,
        )
        self.link_lv = lv
        self.kv_fallbacks_family = Counter(
            "infemu_kv_transfer_failures",
            "KV pulls that failed or timed out, by what followed: recompute (router.pdFallback) or failed.",
            [*labels, "outcome"],
            registry=r,
        )
        # ---- infemu: the remote KV store (role kvstore): prefixes fetched instead of computed, blocks written
        self.store_fetched_tokens = counter(
            "infemu_kvstore_fetched_tokens", "Prompt tokens whose KV this engine fetched from the KV store."
        )
        self.store_fetch_seconds = hist(
            "infemu_kvstore_fetch_seconds", "Duration of each KV-store fetch (emulated seconds).", TRANSFER_BUCKETS
        )
        self.store_written_blocks = counter(
            "infemu_kvstore_written_blocks", "KV blocks this engine wrote to the store."
        )
        self.store_failures = counter(
            "infemu_kvstore_failures", "KV-store lookups, fetches or writes that failed (the prompt is recomputed)."
        )
        # ---- infemu: attention-FFN disaggregation (an AFD engine's modelled step, per side)
        self.afd_busy = Counter(
            "infemu_afd_busy_seconds",
            "Modelled busy time of each side of an AFD engine (attention ranks, FFN GPUs); "
            "1 - rate(busy) / rate(infemu_afd_step_seconds) is the side's micro-batch bubble.",
            [*labels, "side"],
            registry=r,
        )
        self.afd_step_seconds = counter("infemu_afd_step_seconds", "Modelled GPU time of an AFD engine's steps.")
        self.afd_exchange_failures = counter(
            "infemu_afd_exchange_failures",
            "AFD steps whose activations could not reach an FFN instance (the step then ends at its modelled time).",
        )
        self.afd_exchange_seconds = counter(
            "infemu_afd_exchange_seconds", "Modelled time of the activation exchange, each way, summed over steps."
        )
        # ---- infemu: injected faults on this instance (1 while active), the chaos report's annotation
        self.fault_active = Gauge(
            "infemu_fault_active",
            "1 while an injected fault of this kind is active here.",
            [*labels, "kind"],
            registry=r,
        )
        for kind in ("hang", "slow"):
            self.fault_active.labels(*lv, kind).set(0)

    def afd_step(self, terms: dict[str, float], tier: str) -> None:
        self.afd_busy.labels(*self.link_lv, "attention").inc(terms["attention_busy_s"])
        self.afd_busy.labels(*self.link_lv, "ffn").inc(terms["ffn_busy_s"])
        self.afd_step_seconds.inc(terms["step_s"])
        self.afd_exchange_seconds.inc(terms["exchange_each_way_s"])
        self.link(tier, "afd_send", terms["exchange_bytes_each_way"])
        self.link(tier, "afd_return", terms["exchange_bytes_each_way"])

    def count_kv_failure(self, outcome: str) -> None:
        self.kv_fallbacks_family.labels(*self.link_lv, outcome).inc()

    def set_fault(self, kind: str, active: bool) -> None:
        self.fault_active.labels(*self.link_lv, kind).set(1 if active else 0)

    def count_prompt_sources(self, stats) -> None:
        """vLLM's prompt tokens by source from the scheduler's running totals: computed here, hit in
        the local prefix cache, or received over a KV transfer. Blocks fetched from the store enter
        the local cache and are then hit, so the store's share moves from the hits to the transfers."""
        fetched = self.store_fetched_total
        totals = {
            "local_compute": stats.prompt_tokens,
            "local_cache_hit": max(stats.cached_prompt_tokens - fetched, self._sources["local_cache_hit"]),
            "external_kv_transfer": stats.remote_prompt_tokens + fetched,
        }
        for source, total in totals.items():
            delta = total - self._sources[source]
            if delta > 0:
                self.prompt_by_source[source].inc(delta)
                if source != "local_compute":
                    self.prompt_tokens_cached.inc(delta)
                self._sources[source] = total

    def link(self, tier: str, direction: str, nbytes: float) -> None:
        self.link_bytes.labels(*self.link_lv, tier, direction).inc(nbytes)
