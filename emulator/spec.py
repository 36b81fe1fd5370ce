"""The one spec: an ``InferenceCluster`` resource, shared by sim, local emulation and Kubernetes.

Keys are camelCase (Kubernetes convention); the engine's config keeps vLLM's
snake_case names and is mapped once in ``emulator.engine.config``. Loading
produces either typed objects or a ``SpecError`` with one line per problem, each
naming the field path (``spec.pools[1].tp``), the value and what is allowed.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from emulator.errors import SpecError

API_VERSION = "infemu.io/v1alpha1"
KIND = "InferenceCluster"

Role = Literal["aggregated", "prefill", "decode", "attention", "ffn", "rag", "kvstore"]
RouterPolicy = Literal["round_robin", "least_loaded", "prefix_affinity", "session", "pd"]
TraceFormat = Literal["azure", "mooncake", "burstgpt", "ragpulse"]


class _Model(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` anywhere in a spec is an error naming the field, never a
    # NaN report or an infinite simulation.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, allow_inf_nan=False
    )


# Bounds on every size a spec can ask for: far beyond any real fleet or workload, small enough that
# planning, placement and the simulator stay within memory and finish (a bad value is a one-line error).
MAX_NODES = 4096
MAX_GPUS = 131_072  # nodes x gpusPerNode
MAX_GPUS_PER_NODE = 1024  # an NVL576 rack treated as one node still fits
MAX_REPLICAS = 1024
MAX_PARALLEL = 1024  # tp, pp, ep, dp
MAX_TOKENS = 10_000_000  # a prompt or output length, max_model_len, a step's token budget
MAX_SECONDS = 10_000_000.0  # about 116 days of arrivals
MAX_RATE = 1_000_000.0  # requests per second
MAX_REQUESTS = 10_000_000


# ---- model, hardware, topology ---------------------------------------------


Precision = Literal["auto", "bf16", "fp8", "fp8_block", "nvfp4", "mxfp4", "int4_wo"]


class ModelSpec(_Model):
    name: str = Field(
        description="A Hugging Face id (Qwen/Qwen3-235B-A22B-FP8), its last part, a short name (llama-3.1-8b; "
        "`infemu catalog` lists them) or a path to a config.json."
    )
    dtype: Precision = Field(
        "auto",
        description="Precision of the dense and attention weights; auto = the checkpoint's quantization config "
        "(bf16 when it has none).",
    )
    moe_dtype: Precision = Field(
        "auto", description="Precision of the routed experts; auto = the checkpoint's (or dtype when set)."
    )
    kv_cache_dtype: Literal["auto", "bf16", "fp8"] = Field(
        "auto", description="KV-cache precision; auto = FP8 when the checkpoint declares an FP8 KV cache, else bf16."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class ScaleUpSpec(_Model):
    size: int = Field(
        8,
        ge=1,
        le=MAX_NODES * MAX_GPUS_PER_NODE,
        description="GPUs in one NVLink/NVSwitch domain (8 for HGX, 72 for NVL72).",
    )
    tier: str | None = Field(None, description="Link tier name; default follows the GPU (nvlink4 for H100).")
    latency_us: float | None = Field(None, ge=0, le=10_000_000)
    byte_scale: float | None = Field(
        None,
        ge=1,
        le=1e9,
        description="Emulation: send 1/S of the logical bytes at 1/S of the rate (default: automatic).",
    )


class ScaleOutSpec(_Model):
    tier: str | None = Field(None, description="Link tier name; default follows the GPU (ib-ndr-400 for H100).")
    latency_us: float | None = Field(None, ge=0, le=10_000_000)
    byte_scale: float | None = Field(
        None,
        ge=1,
        le=1e9,
        description="Emulation: send 1/S of the logical bytes at 1/S of the rate (default: automatic).",
    )


class TopologySpec(_Model):
    nodes: int = Field(1, ge=1, le=MAX_NODES)
    gpus_per_node: int = Field(8, ge=1, le=MAX_GPUS_PER_NODE)
    scale_up: ScaleUpSpec = ScaleUpSpec()
    scale_out: ScaleOutSpec = ScaleOutSpec()
    allow_cross_domain_tp: bool = Field(
        False, description="Let a TP group straddle scale-up domains (its all-reduce then crosses scale-out)."
    )

    @model_validator(mode="after")
    def _bounded(self) -> TopologySpec:
        if self.nodes * self.gpus_per_node > MAX_GPUS:
            raise ValueError(f"nodes x gpusPerNode = {self.nodes * self.gpus_per_node} GPUs; the limit is {MAX_GPUS}")
        return self


# ---- pools -------------------------------------------------------------------


class AfdSpec(_Model):
    """Attention-FFN disaggregation of an attention pool: which ffn pool holds its experts, and how many
    micro-batches ping-pong between the two sides so that the exchange overlaps compute."""

    ffn_pool: str = Field(max_length=40, description="Name of the pool (role: ffn) that holds this pool's experts.")
    micro_batches: int = Field(
        2,
        ge=1,
        le=8,
        description="Micro-batches each step is split into; while one is in the FFN side (or on the wire) "
        "the attention side computes the next. 1 = no overlap.",
    )


class FixedLength(_Model):
    type: Literal["fixed"] = "fixed"
    value: int = Field(ge=1, le=MAX_TOKENS)


class UniformLength(_Model):
    type: Literal["uniform"] = "uniform"
    min: int = Field(ge=1, le=MAX_TOKENS)
    max: int = Field(ge=1, le=MAX_TOKENS)

    @model_validator(mode="after")
    def _ordered(self) -> UniformLength:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class LognormalLength(_Model):
    type: Literal["lognormal"] = "lognormal"
    mean: float = Field(gt=0, le=MAX_TOKENS, description="Mean length in tokens.")
    sigma: float = Field(0.5, ge=0, le=10, description="Standard deviation of log(length).")
    min: int = Field(1, ge=1, le=MAX_TOKENS)
    max: int = Field(32768, ge=1, le=MAX_TOKENS)


class TraceLength(_Model):
    type: Literal["trace"] = "trace"


def _fixed_shorthand(value: Any) -> Any:
    """A length written as a number (`inputLength: 512`, `docTokens: 256`) is a fixed length."""
    return {"type": "fixed", "value": value} if isinstance(value, int) and not isinstance(value, bool) else value


LengthDist = Annotated[
    FixedLength | UniformLength | LognormalLength | TraceLength,
    Field(discriminator="type"),
    BeforeValidator(_fixed_shorthand),
]


class CorpusSpec(_Model):
    """The retriever's synthetic corpus: documents with seeded token lengths and a popularity skew."""

    documents: int = Field(1_000_000, ge=1, le=100_000_000_000, description="Documents (vectors) in the index.")
    dimension: int = Field(1024, ge=8, le=16384, description="Embedding dimension (bge-large-en-v1.5: 1024).")
    doc_tokens: LengthDist = Field(
        None, description="Token length of each document (seeded per id); default lognormal, mean 256."
    )
    popularity: float = Field(
        0.8,
        ge=0,
        le=4,
        description="Zipf exponent of how often each document is retrieved (0 = uniform); repeated documents "
        "are what a prefix or KV-store cache can reuse. An assumption to set per corpus.",
    )
    seed: int = Field(0, ge=0, le=2**53 - 1, description="Seeds document lengths and search results.")

    @model_validator(mode="before")
    @classmethod
    def _default_doc_tokens(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("docTokens") is None and data.get("doc_tokens") is None:
            return {**data, "docTokens": {"type": "lognormal", "mean": 256, "sigma": 0.6, "min": 16, "max": 4096}}
        return data


class IndexSpec(_Model):
    """The ANN index: its kind and the knobs that set recall (and cost)."""

    type: Literal["hnsw", "ivfpq", "flat"] = "hnsw"
    ef_search: int = Field(128, ge=1, le=65536, description="HNSW: candidate list size while searching.")
    m: int = Field(32, ge=2, le=512, description="HNSW: links per node (layer 0 keeps 2M).")
    nlist: int = Field(16384, ge=1, le=1 << 24, description="IVF: coarse clusters.")
    nprobe: int = Field(32, ge=1, le=1 << 24, description="IVF: clusters scanned per query.")
    pq_bytes: int = Field(64, ge=1, le=4096, description="IVF-PQ: bytes per compressed vector (sub-quantizers).")

    @model_validator(mode="after")
    def _probe_within_lists(self) -> IndexSpec:
        if self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) must be <= nlist ({self.nlist})")
        return self


class EncoderSpec(_Model):
    """A transformer encoder the retriever runs (query embedding or cross-encoder rerank)."""

    params: float = Field(
        gt=0, le=1e12, description="Parameters (bge-large-en-v1.5: 335e6; bge-reranker-large: 560e6)."
    )
    max_tokens: int = Field(512, ge=1, le=MAX_TOKENS, description="Input tokens kept per sequence (truncation).")


class RagSpec(_Model):
    """A ``rag`` pool's retriever: embed the query, search the index, optionally rerank, in batches."""

    corpus: CorpusSpec = CorpusSpec()
    index: IndexSpec = IndexSpec()
    device: Literal["cpu", "gpu"] = Field(
        "cpu",
        description="Where embedding, search and rerank run: cpu (the node's cores; no GPU taken) or gpu (one GPU "
        "of spec.gpu per replica).",
    )
    cpu_cores: int = Field(32, ge=1, le=1024, description="Cores a CPU retriever uses (queries run one per core).")
    embedding: EncoderSpec = EncoderSpec(params=335e6)
    rerank: EncoderSpec | None = Field(None, description="A cross-encoder over the candidates; none by default.")
    rerank_candidates: int = Field(32, ge=1, le=1024, description="Candidates the index returns for reranking.")
    max_batch: int = Field(32, ge=1, le=4096, description="Queries one retrieval batch takes at most.")
    max_waiting: int = Field(1024, ge=1, le=1_000_000, description="Queued queries beyond which a query gets 503.")


class KVStoreSpec(_Model):
    """A ``kvstore`` pool: a remote KV-cache tier (Mooncake Store, LMCache) shared by the engines."""

    capacity_gb: float = Field(64.0, gt=0, le=1e7, description="Bytes of KV each store instance holds (GB).")
    write_policy: Literal["write-through", "on-evict"] = Field(
        "write-through",
        description="When engines write blocks: after every prefill (write-through) or when their own cache "
        "evicts them (on-evict).",
    )
    tier: str | None = Field(
        None,
        max_length=40,
        description="Link tier between the store and the engines: a host-memory tier (pcie4, pcie5: a CPU-memory "
        "store on the engines' node, as LMCache's local backend); default: the topology's scale-out tier (a store "
        "node reached over RDMA, as Mooncake Store).",
    )


class PoolSpec(_Model):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    role: Role = "aggregated"
    replicas: int = Field(1, ge=0, le=MAX_REPLICAS)
    tp: int = Field(1, ge=1, le=MAX_PARALLEL)
    pp: int = Field(1, ge=1, le=MAX_PARALLEL)
    ep: int = Field(
        1,
        ge=1,
        le=MAX_PARALLEL,
        description="Expert-parallel degree for MoE layers: experts are split over ep x (tp x dp / ep) GPUs; "
        "must divide tp x dp.",
    )
    dp: int = Field(
        1,
        ge=1,
        le=MAX_PARALLEL,
        description="Attention data parallelism of an MoE instance: dp ranks of tp GPUs each run attention on "
        "their own requests and share the MoE layers (DeepSeek-style wide EP). Dense models: use replicas.",
    )
    expert_routing: Literal["power_law_1.01", "power_law_1.2", "balanced"] = Field(
        "power_law_1.01",
        description="How tokens spread over an MoE model's experts: power_law_A (the i-th most popular expert "
        "gets a share proportional to i^-A; 1.01 is aiconfigurator's default) or balanced (every expert "
        "equally: a small batch wakes the most experts). Sets how many experts a decode step reads and how "
        "much the busiest expert-parallel rank waits for.",
    )
    max_num_seqs: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Running requests per engine (per attention-DP rank); default: the engine's.",
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKENS,
        description="Token budget of one step per attention-DP rank (one request computes at most this in a "
        "step); default: the engine's (SGLang's chunked-prefill size is split over the DP ranks).",
    )
    max_model_len: int | None = Field(None, ge=16, le=MAX_TOKENS)
    chunked_prefill: bool | None = Field(None, description="Split long prompts over steps; default: the engine's.")
    prefix_caching: bool | None = Field(None, description="Reuse KV blocks of equal prefixes; default: the engine's.")
    block_size: int = Field(16, ge=1, le=4096)
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of HBM the engine manages; default: the engine's (vLLM 0.9)."
    )
    step_overhead_us: float = Field(
        0.0,
        ge=0,
        le=10_000_000,
        description="Extra fixed cost per engine step on top of the engine's host-side model (spec.engine); "
        "for what-if studies.",
    )
    afd: AfdSpec | None = Field(
        None,
        description="Attention-FFN disaggregation (role attention; or role decode for P/D with an AFD decode side): "
        "the ffn pool this pool's MoE layers run on. Each replica is one logical engine of dp attention ranks (tp "
        "GPUs each) sharing ffn.replicas / replicas FFN instances.",
    )
    rag: RagSpec | None = Field(None, description="role rag: the retriever (corpus, index, device, encoders).")
    kvstore: KVStoreSpec | None = Field(None, description="role kvstore: capacity, write policy and tier.")
    placement: list[list[int]] | None = Field(
        None,
        max_length=MAX_REPLICAS,
        description="Explicit GPU ids per replica (global id = node * gpusPerNode + local id); "
        "default: packed in spec order, never straddling a scale-up domain.",
    )

    @model_validator(mode="after")
    def _role_sections(self) -> PoolSpec:
        for key, role, default in (("rag", "rag", RagSpec), ("kvstore", "kvstore", KVStoreSpec)):
            if getattr(self, key) is not None and self.role != role:
                raise ValueError(f"{key}: only a pool with role {role} takes it (this pool's role is {self.role})")
            if self.role == role and getattr(self, key) is None:
                object.__setattr__(self, key, default())
        return self

    @property
    def gpus_per_instance(self) -> int:
        if self.role == "kvstore" or (self.role == "rag" and (self.rag is None or self.rag.device == "cpu")):
            return 0  # host memory and cores of a node, no GPU
        if self.role == "rag":
            return 1
        return self.tp * self.pp * self.dp


class EngineSpec(_Model):
    """The serving framework the workers imitate: its scheduler policy and host-side costs."""

    name: Literal["vllm", "sglang", "trtllm", "ideal"] = Field(
        "vllm",
        description="vllm (mixed prefill+decode steps), sglang (prefill-first steps), trtllm, or ideal "
        "(kernels only: no host-side work, no API server; for theory checks).",
    )
    version: str | None = Field(
        None,
        max_length=40,
        description="Framework version, e.g. '0.12.0'; picks the host-side profile measured for it "
        "(default: the newest profile).",
    )
    scheduling: Literal["auto", "mixed", "prefill_first"] = Field(
        "auto",
        description="auto = the engine's default; mixed = prefill chunks share steps with decodes (vLLM, "
        "TensorRT-LLM, SGLang --enable-mixed-chunk); prefill_first = a prefill step pauses decoding (SGLang).",
    )
    async_scheduling: bool | None = Field(
        None,
        description="Model async scheduling's admission lag: the engine decides step n+1 while step n runs (vLLM "
        "--async-scheduling, its default from 0.14; SGLang's and TensorRT-LLM's overlap schedulers), so a request "
        "arriving during a step joins the step after the next. Default: off in every engine profile, whose "
        "fitted constants were scored better without it (docs/fidelity.md).",
    )
    pd_handoff_ms: float | None = Field(
        None,
        ge=0,
        le=60_000,
        description="P/D: fixed time from the prefill's answer to the decode's KV pull (the router's second "
        "leg, the decode's intake, the KV connector's set-up); default: the engine's, fitted on measured P/D "
        "deployments (docs/fidelity.md).",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=1024,
        description="Output tokens a stream's API server gathers before it sends them (vLLM, SGLang and "
        "TensorRT-LLM --stream-interval / stream_interval; default 1): a stream's first token goes at once, then "
        "every N tokens, the rest when it ends. Each token stays its own SSE event; fewer, larger writes cost "
        "the host less per token (a worker emulating many streams) and clients see the tokens in bursts.",
    )


class HealthCheckSpec(_Model):
    """Active health checking: the router polls every backend's load endpoint (Envoy's health checker)."""

    interval_ms: float = Field(100.0, ge=10, le=60_000, description="Time between two checks of a backend.")
    timeout_ms: float = Field(500.0, ge=10, le=60_000, description="A check that takes longer has failed.")
    unhealthy_threshold: int = Field(2, ge=1, le=100, description="Failed checks in a row that eject a backend.")
    healthy_threshold: int = Field(1, ge=1, le=100, description="Good checks in a row that re-admit it.")


class CircuitBreakerSpec(_Model):
    """Passive health checking (Envoy's outlier detection): requests that fail eject their backend."""

    consecutive_failures: int = Field(
        3, ge=1, le=1000, description="Backend failures in a row (connect errors, 5xx, timeouts) that open it."
    )
    ejection_ms: float = Field(
        1000.0, ge=0, le=3_600_000, description="How long an opened backend is skipped; doubles with each ejection."
    )
    max_ejection_ms: float = Field(30_000.0, ge=0, le=3_600_000, description="Cap on the doubled ejection time.")


class RetrySpec(_Model):
    """Retries, only where safe: before the first byte reached the client."""

    max_attempts: int = Field(3, ge=1, le=10, description="Backends one request may try.")
    budget_percent: float = Field(
        20.0,
        ge=0,
        le=100,
        description="Retries allowed as a share of the requests of the last 10 s (Linkerd's and Envoy's retry "
        "budget): a failing fleet is not hit by a retry storm.",
    )
    min_per_second: float = Field(
        3.0, ge=0, le=1e6, description="Retries always allowed per second, whatever the budget."
    )


class TimeoutSpec(_Model):
    """Every wait on the request path is bounded (emulated time; the emulation scales them by its dilation)."""

    connect_ms: float = Field(2000.0, gt=0, le=3_600_000, description="Connecting to a backend.")
    first_byte_ms: float = Field(
        30_000.0,
        gt=0,
        le=86_400_000,
        description="From sending a request to a backend to the first byte of its answer (a stream's first body "
        "byte, not only its headers); past it, the request is retried.",
    )
    idle_ms: float = Field(
        10_000.0,
        gt=0,
        le=86_400_000,
        description="Longest silence inside a backend's stream before it counts as stalled.",
    )
    request_ms: float = Field(
        600_000.0,
        gt=0,
        le=86_400_000,
        description="Deadline of a whole request at the router (and at `infemu run`'s client).",
    )
    kv_transfer_ms: float = Field(
        10_000.0, gt=0, le=86_400_000, description="A decode instance's KV pull; past it, the P/D fallback applies."
    )
    client_write_ms: float = Field(
        10_000.0,
        gt=0,
        le=86_400_000,
        description="A client that does not take its stream's bytes for this long is cut off (slow readers do not "
        "hold the router's memory).",
    )


class AdmissionSpec(_Model):
    """Backpressure: past these limits the router answers at once instead of queueing without bound."""

    max_waiting_per_backend: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description="When every candidate backend has this many requests waiting, new requests are rejected.",
    )
    max_in_flight: int = Field(4096, ge=1, le=1_000_000, description="Requests the router holds at once, in total.")
    reject_status: Literal[429, 503] = Field(429, description="HTTP status of a rejection (OpenAI error JSON).")
    retry_after_s: int = Field(1, ge=0, le=3600, description="The Retry-After header of a rejection.")


class RouterSpec(_Model):
    policy: RouterPolicy = "least_loaded"
    health_check: HealthCheckSpec = HealthCheckSpec()
    circuit_breaker: CircuitBreakerSpec = CircuitBreakerSpec()
    retry: RetrySpec = RetrySpec()
    timeouts: TimeoutSpec = TimeoutSpec()
    admission: AdmissionSpec = AdmissionSpec()
    pd_fallback: Literal["recompute", "fail"] = Field(
        "recompute",
        description="When a decode instance cannot pull a request's KV (the prefill died, the link is cut): "
        "recompute the prompt on the decode instance, or end the request with an explicit error.",
    )


class EndpointPickerRef(_Model):
    """The inference gateway's endpoint picker (EPP) Service that routes to this pool."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63, description="its Service")
    port: int = Field(9002, ge=1, le=65535, description="the Service's gRPC port (the upstream EPP's default)")
    failure_mode: Literal["FailOpen", "FailClose"] = "FailClose"


class InferencePoolSpec(_Model):
    """A Gateway API Inference Extension InferencePool (inference.networking.k8s.io/v1) selecting
    this cluster's serving pods, so an inference gateway can route to them by their vLLM metrics."""

    enabled: bool = False
    endpoint_picker: EndpointPickerRef | None = Field(
        None, description="the EPP Service; left out, the pool names `<cluster>-epp` on port 9002"
    )


class GatewaySpec(_Model):
    inference_pool: InferencePoolSpec = InferencePoolSpec()


class SLOSpec(_Model):
    ttft_ms: float = Field(1000.0, gt=0, le=86_400_000)
    tpot_ms: float = Field(100.0, gt=0, le=86_400_000)
    e2e_ms: float | None = Field(
        None,
        alias="e2eMs",  # not to_camel's "e2EMs"
        gt=0,
        le=86_400_000,
        description="End-to-end latency bound of a request (a pipeline's, from its first stage to its last "
        "token); none by default.",
    )
    attainment_target: float = Field(0.9, gt=0, le=1)


# ---- workload ----------------------------------------------------------------


class PoissonArrival(_Model):
    type: Literal["poisson"] = "poisson"


class GammaArrival(_Model):
    type: Literal["gamma"] = "gamma"
    cv: float = Field(
        ge=0.01,
        le=100,
        description="Coefficient of variation of inter-arrival times (1 = Poisson); 0.01 (nearly constant) to "
        "100 (extreme bursts).",
    )


class ConstantArrival(_Model):
    type: Literal["constant"] = "constant"


class MMPPArrival(_Model):
    """On/off bursts: a two-state Markov-modulated Poisson process (exponential state durations)."""

    type: Literal["mmpp"] = "mmpp"
    burst_rate: float = Field(gt=0, le=MAX_RATE, description="Requests per second during a burst.")
    idle_rate: float = Field(0.0, ge=0, le=MAX_RATE, description="Requests per second between bursts.")
    burst_seconds: float = Field(gt=0, le=MAX_SECONDS, description="Mean duration of a burst.")
    idle_seconds: float = Field(gt=0, le=MAX_SECONDS, description="Mean duration between bursts.")

    @property
    def mean_rate(self) -> float:
        return (self.burst_rate * self.burst_seconds + self.idle_rate * self.idle_seconds) / (
            self.burst_seconds + self.idle_seconds
        )


class ConcurrencyArrival(_Model):
    type: Literal["concurrency"] = "concurrency"
    n: int = Field(ge=1, le=100_000, description="Closed-loop clients, each sending its next request on completion.")


class TraceArrival(_Model):
    type: Literal["trace"] = "trace"
    path: str = Field(max_length=4096)
    format: TraceFormat
    time_scale: float = Field(1.0, gt=0, le=1e6, description="Multiply trace timestamps by this (0.5 = twice as fast).")


Arrival = Annotated[
    PoissonArrival | GammaArrival | ConstantArrival | MMPPArrival | ConcurrencyArrival | TraceArrival,
    Field(discriminator="type"),
]


class ClientSpec(_Model):
    """How the load generator behaves (real benchmark clients, not an idealised source)."""

    overhead_ms: float = Field(
        1.0,
        ge=0,
        le=3_600_000,
        description="Closed loop: mean client-side delay between a response's end and the client's next send "
        "(an assumption of about one asyncio/HTTP round of a benchmark harness; not fitted).",
    )
    overhead_cv: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Coefficient of variation of that delay (Gamma law); > 0 lets clients drift apart.",
    )
    warmup_requests: int = Field(
        0,
        ge=0,
        le=MAX_REQUESTS,
        description="Closed loop: requests sent first at the same concurrency and drained before the measured "
        "phase starts (AIPerf --warmup-request-count); not reported, but they fill the prefix cache.",
    )
    prompt_pool: int | None = Field(
        None,
        ge=1,
        le=MAX_REQUESTS,
        description="Draw prompts from a dataset of this many distinct prompts, shuffled and reused when exhausted "
        "(benchmark clients' default datasets); repeats can hit the prefix cache. None: every prompt distinct.",
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        le=MAX_REQUESTS,
        description="Connections the client holds at most (aiohttp's TCPConnector limit, 100 by default). A request "
        "that finds them all busy waits for one, and that wait counts in its TTFT: clients stamp a request's "
        "start before they take a connection. None: no limit (the live open-loop client keeps its 1,000; a Locust "
        "load test has one connection per user).",
    )


class PipelineSpec(_Model):
    """Every request of the workload as a multi-stage pipeline (the router runs the stages).

    rag: retrieve topK documents, then generate from system + documents + question. multihop: hops x
    (retrieve with the question and the last answer, generate). reasoning: a hidden decode of
    reasoningTokens before the visible answer (optionally after a retrieval: retrieve: true). agentic:
    turns of generate, then a tool call of thinkTimeMs returning toolTokens, with the context growing.
    The question is inputLength tokens, each visible answer outputLength tokens.
    """

    type: Literal["rag", "multihop", "reasoning", "agentic"]
    top_k: int = Field(4, ge=1, le=64, description="Documents retrieved per retrieval stage.")
    hops: int = Field(2, ge=1, le=16, description="multihop: retrieve-then-generate rounds.")
    retrieve: bool = Field(False, description="reasoning: retrieve documents before reasoning.")
    reasoning_tokens: int = Field(512, ge=1, le=MAX_TOKENS, description="reasoning: hidden tokens before the answer.")
    turns: int = Field(3, ge=1, le=64, description="agentic: generate turns (tool calls between them).")
    think_time_ms: float = Field(500.0, ge=0, le=3_600_000, description="agentic: each tool call's duration.")
    tool_tokens: int = Field(128, ge=0, le=MAX_TOKENS, description="agentic: tokens a tool result adds.")
    system_tokens: int = Field(
        256, ge=0, le=MAX_TOKENS, description="A system prompt every request shares (the reusable prefix)."
    )
    weight: float = Field(
        1.0, gt=0, le=1e6, description="In a mix (workload.pipelines): this type's share of requests."
    )


class WorkloadSpec(_Model):
    arrival: Arrival = PoissonArrival()
    client: ClientSpec = ClientSpec()
    rate: float | None = Field(1.0, gt=0, le=MAX_RATE, description="Requests per second (open-loop arrivals).")
    input_length: LengthDist = Field(
        None, description="Prompt lengths; default: from the trace with a trace arrival, else fixed 512."
    )
    output_length: LengthDist = Field(
        None, description="Output lengths; default: from the trace with a trace arrival, else fixed 128."
    )
    requests: int | None = Field(None, ge=1, le=MAX_REQUESTS)
    duration: float | None = Field(None, gt=0, le=MAX_SECONDS, description="Seconds of arrivals.")
    # bounded by 2^53 - 1: the largest integer a JSON (and the CRD schema's float64) holds exactly
    seed: int = Field(0, ge=0, le=2**53 - 1, description="Seeds every random draw; same spec and seed, same plan.")
    pipeline: PipelineSpec | None = Field(
        None, description="Send every request as a multi-stage pipeline (rag, multihop, reasoning, agentic)."
    )
    pipelines: list[PipelineSpec] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="A mix of pipelines: each request is one of them, drawn by weight (seeded).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_lengths(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        arrival = data.get("arrival")
        is_trace = isinstance(arrival, TraceArrival) or (isinstance(arrival, dict) and arrival.get("type") == "trace")
        defaults = {"inputLength": 512, "outputLength": 128}
        out = dict(data)
        for key, snake in (("inputLength", "input_length"), ("outputLength", "output_length")):
            if out.get(key) is None and out.get(snake) is None:
                out.pop(snake, None)
                out[key] = {"type": "trace"} if is_trace else {"type": "fixed", "value": defaults[key]}
        return out

    @model_validator(mode="after")
    def _one_pipeline_field(self) -> WorkloadSpec:
        if self.pipeline is not None and self.pipelines is not None:
            raise ValueError("set pipeline (every request) or pipelines (a mix), not both")
        return self

    @property
    def pipeline_mix(self) -> list[PipelineSpec]:
        """The pipelines requests are drawn from ([] = plain requests)."""
        return self.pipelines or ([self.pipeline] if self.pipeline is not None else [])

    @model_validator(mode="after")
    def _stop_condition(self) -> WorkloadSpec:
        if self.requests is None and self.duration is None and not isinstance(self.arrival, TraceArrival):
            raise ValueError("set requests or duration (or use a trace arrival)")
        return self


# ---- faults ----------------------------------------------------------------------

FaultKind = Literal["kill", "hang", "slow", "link", "partition", "burst"]


class FaultTarget(_Model):
    """Which instances a fault hits: a pool (or the first ``fraction`` of its replicas) or one instance."""

    pool: str | None = Field(None, max_length=40, description="A pool name: every replica (see fraction).")
    instance: str | None = Field(None, max_length=64, description="One instance, e.g. decode-1.")
    fraction: float = Field(1.0, gt=0, le=1, description="Share of the pool's replicas hit (the first ones).")
    peer: str | None = Field(
        None,
        max_length=64,
        description="link: the receiving side, a pool or an instance (default: every peer).",
    )
    tier: str | None = Field(
        None, max_length=40, description="link: only peers reached over this tier (e.g. ib-ndr-400)."
    )

    @model_validator(mode="after")
    def _one(self) -> FaultTarget:
        if (self.pool is None) == (self.instance is None):
            raise ValueError("set exactly one of pool or instance")
        return self


class LinkFault(_Model):
    bandwidth_factor: float = Field(1.0, gt=0, le=1, description="Multiply the link's rate by this (0.1 = 10x slower).")
    latency_us: float | None = Field(None, ge=0, le=10_000_000, description="Latency added to every transfer.")
    loss_retransmit_ms: float = Field(
        0.0,
        ge=0,
        le=600_000,
        description="Loss modelled as what TCP makes of it: this much extra delay per transfer (one retransmit "
        "timeout); added to the latency.",
    )
    cut: bool = Field(False, description="No byte passes: transfers fail (and fall back, see router.pdFallback).")
    flap_period_seconds: float | None = Field(
        None, gt=0, le=86_400, description="Cut and restore the link every half period while the fault lasts."
    )


class FaultAction(_Model):
    """What a fault does, to whom and for how long — everything but when it starts."""

    kind: FaultKind
    duration_seconds: float | None = Field(
        None,
        gt=0,
        le=MAX_SECONDS,
        description="How long it lasts (hang, slow, link, partition; until the run ends, or the Fault resource "
        "is deleted, when left out). A kill has none: the process dies and its supervisor restarts it.",
    )
    target: FaultTarget | None = Field(None, description="kill, hang, slow, link: the instances hit.")
    factor: float | None = Field(
        None,
        ge=1,
        le=1000,
        description="slow: the emulated GPU runs this many times slower; burst: arrivals at this many times the rate.",
    )
    link: LinkFault | None = Field(None, description="link: what happens to the target's outgoing transfers.")
    between: list[list[str]] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="partition: two groups of pools or instances (or 'router') that cannot reach each other.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> FaultAction:
        if self.kind == "partition":
            if not self.between or not all(self.between):
                raise ValueError("a partition needs between: [[pools or instances], [pools or instances]]")
        elif self.kind == "burst":
            if self.factor is None or self.duration_seconds is None:
                raise ValueError("a burst needs factor (x the rate) and durationSeconds")
        elif self.target is None:
            raise ValueError(f"a {self.kind} fault needs a target (pool or instance)")
        if self.kind == "slow" and self.factor is None:
            raise ValueError("a slow fault needs factor (e.g. 3 = three times slower)")
        if self.kind == "link" and self.link is None:
            raise ValueError(
                "a link fault needs link: {bandwidthFactor, latencyUs, lossRetransmitMs, cut, flapPeriodSeconds}"
            )
        if self.kind == "kill" and self.duration_seconds is not None:
            raise ValueError("a kill has no durationSeconds: its supervisor restarts the process")
        return self


class FaultSpec(FaultAction):
    """One fault at a chosen moment: the simulator, the local cluster and the operator apply the same one."""

    name: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    at_seconds: float | None = Field(None, ge=0, le=MAX_SECONDS, description="Start, seconds after the first request.")
    after_requests: int | None = Field(None, ge=0, le=MAX_REQUESTS, description="Start once this many were sent.")

    @model_validator(mode="after")
    def _timed(self) -> FaultSpec:
        if (self.at_seconds is None) == (self.after_requests is None):
            raise ValueError("set exactly one of atSeconds or afterRequests")
        return self


# ---- the resource --------------------------------------------------------------


class EmulationSpec(_Model):
    """How the real-time emulation runs on this host (ignored by the simulator)."""

    time_dilation: float = Field(
        1.0,
        ge=1.0,
        le=100.0,
        description="Multiply every modelled duration (and divide every link rate) by D; reported times are "
        "divided by D. Lets a small host emulate a fleet whose steps are shorter than its own overheads. Unset, "
        "`infemu run` lets pilots of the plan choose it on the host (the operator runs at 1; each worker's "
        "/metrics says when that does not keep time).",
    )
    instances_per_process: int = Field(
        1,
        ge=1,
        le=64,
        description="Engine instances one worker process hosts, each with its own port, engine, metrics and "
        "identity. Above 1 a fleet runs on a few interpreters instead of one each (memory, start-up, scheduler "
        "wake-ups); links are then paced in-process (no tc namespace per instance) and kill faults are refused "
        "(a kill would take the process's other instances down). On Kubernetes this is dense mode: an engine pool "
        "runs ceil(replicas / N) pods, each hosting N instances on ports 8000, 8001, ... (services keep a pod "
        "each); scaling such a pool rolls its pods.",
    )


class ClusterSpec(_Model):
    model: ModelSpec
    engine: EngineSpec = EngineSpec()
    gpu: str = "h100-sxm"
    topology: TopologySpec = TopologySpec()
    pools: list[PoolSpec] = Field(min_length=1, max_length=64)
    router: RouterSpec = RouterSpec()
    gateway: GatewaySpec = GatewaySpec()
    slo: SLOSpec = SLOSpec()
    workload: WorkloadSpec = WorkloadSpec(requests=100)
    emulation: EmulationSpec = EmulationSpec()
    faults: list[FaultSpec] = Field(
        default_factory=list, max_length=256, description="Faults injected during a run (chaos experiments)."
    )


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str | None = None


class InferenceCluster(_Model):
    api_version: Literal["infemu.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["InferenceCluster"] = KIND
    metadata: Metadata
    spec: ClusterSpec
    status: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


# ---- loading with readable errors -------------------------------------------------


def _walk(data: Any, loc: tuple) -> tuple[str, Any]:
    """Render a pydantic location as ``spec.pools[1].tp`` and return the input value there.

    Discriminated unions put the tag (``gamma``) in the location; it is not a key the
    user wrote, so it is dropped from the path.
    """
    path = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue
        if isinstance(node, dict) and part not in node and part in ("function-after", "function-before"):
            continue
        path += f".{part}" if path else str(part)
        node = node.get(part) if isinstance(node, dict) else None
    return path, node


def _message(err: dict, value: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return f"{value!r}: unknown field (check spelling; keys are camelCase)"
    if kind == "union_tag_invalid":
        expected = err.get("ctx", {}).get("expected_tags", "")
        return f"{value!r}: unknown type; allowed: {expected}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind in ("model_type", "model_attributes_type"):
        return f"expected a mapping, got {value!r}"
    return f"{value!r}: {msg}" if value is not None and not isinstance(value, (dict, list)) else msg


def format_validation_error(exc: ValidationError, data: Any, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        path, value = _walk(data, loc)
        if err["type"] == "extra_forbidden":
            value = loc[-1]
        # a whole-document rule (no field path): the prefix alone names what was checked
        where = f"{prefix}{path}" if path else (prefix.rstrip(" .:") or "<document>")
        lines.append(f"{where}: {_message(err, value)}")
    return lines


_M = TypeVar("_M", bound=BaseModel)


def validate_document(model: type[_M], data: Any, source: str = "") -> _M:
    """Schema validation of one resource (cluster, LoadTest, Fault): SpecError with field-path lines."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, data, f"{source}: " if source else "")) from None


def sets_time_dilation(cluster: InferenceCluster) -> bool:
    """Whether the spec chose its time dilation (``infemu run`` lets the host choose when it did not)."""
    return "time_dilation" in cluster.spec.emulation.model_fields_set


def with_time_dilation(cluster: InferenceCluster, dilation: float, source: str = "--time-dilation") -> InferenceCluster:
    """The cluster run at another time dilation (a command-line override), validated as the spec's field is."""
    emulation = cluster.spec.emulation.model_dump(by_alias=True)
    emulation["timeDilation"] = dilation
    try:
        checked = EmulationSpec.model_validate(emulation)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, emulation, f"{source}: spec.emulation.")) from None
    return cluster.model_copy(update={"spec": cluster.spec.model_copy(update={"emulation": checked})})


def parse_cluster(data: Any, source: str = "") -> InferenceCluster:
    """Validate one document; raise SpecError with field-path lines."""
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise SpecError([f"{prefix}<document>: expected an InferenceCluster mapping, got {type(data).__name__}"])
    cluster = validate_document(InferenceCluster, data, source)
    from emulator.validation import cross_field_problems  # catalogs and topology live there

    problems = cross_field_problems(cluster)
    if problems:
        raise SpecError([f"{prefix}{p}" for p in problems])
    return cluster


MAX_SPEC_BYTES = 4 * 1024 * 1024  # a spec is a page of YAML; a trace belongs in its own file
MAX_SPEC_DEPTH = 64  # the schema nests about 6 levels


def nesting_depth(node: Any, limit: int) -> int:
    """Nesting depth of parsed YAML or JSON (a scalar is one level), iteratively (a 5,000-deep document
    must not hit the recursion limit); counting stops once past ``limit``."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _read_spec_text(path: str) -> str:
    if not os.path.exists(path):
        raise SpecError([f"{path}: no such file"])
    if not os.path.isfile(path):
        raise SpecError([f"{path}: not a regular file; give the path of a YAML spec"])
    size = os.path.getsize(path)
    if size > MAX_SPEC_BYTES:
        raise SpecError(
            [f"{path}: {size} bytes; a spec may be at most {MAX_SPEC_BYTES} bytes (put traces in their own file)"]
        )
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: not UTF-8 text (byte {exc.start}); a spec is a YAML file"]) from None
    except OSError as exc:
        raise SpecError([f"{path}: cannot read ({exc.strerror})"]) from None


def load_clusters(path: str) -> list[InferenceCluster]:
    """Load every InferenceCluster document of a YAML file (multi-document files compare designs)."""
    text = _read_spec_text(path)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{path}:{where}: invalid YAML: {problem}"]) from None
    except RecursionError:
        raise SpecError([f"{path}: YAML nested too deeply; a spec nests at most {MAX_SPEC_DEPTH} levels"]) from None
    for i, doc in enumerate(docs):
        if nesting_depth(doc, MAX_SPEC_DEPTH) > MAX_SPEC_DEPTH:
            raise SpecError([f"{path} (document {i + 1}): nested more than {MAX_SPEC_DEPTH} levels; not a spec"])
    if not docs:
        raise SpecError([f"{path}: the file holds no document"])
    clusters, problems, others = [], [], []
    for i, doc in enumerate(docs):
        source = path if len(docs) == 1 else f"{path} (document {i + 1})"
        if isinstance(doc, dict) and doc.get("kind") not in (None, KIND):
            others.append(str(doc.get("kind")))
            continue  # other resources (e.g. a LoadTest) may share the file
        try:
            clusters.append(parse_cluster(doc, source))
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)
    if not clusters:
        held = f" (it holds {', '.join(sorted(set(others)))})" if others else ""
        hint = (
            "; a LoadTest runs on Kubernetes (kubectl apply -f, the operator runs it as a Job) or, against a"
            " running router, as `infemu loadtest --target URL --model NAME`"
            if "LoadTest" in others
            else ""
        )
        raise SpecError([f"{path}: no InferenceCluster document found{held}{hint}"])
    names = [c.name for c in clusters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError([f"{path}: metadata.name {d!r} appears more than once" for d in dupes])
    return clusters
