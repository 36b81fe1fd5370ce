"""Serving-engine profiles: what vLLM, SGLang and TensorRT-LLM do besides running kernels.

A real engine step is kernels plus host-side work (scheduling, input preparation,
sampling, output processing), overlapped with the GPU only where the engine
schedules asynchronously; decode batches replay CUDA graphs padded to a capture
size; and every request crosses the API server (HTTP, chat template, tokenisation,
stream framing). A profile holds those facts per engine and version:

* structural facts (scheduling policy, default limits, CUDA-graph capture sizes,
  async overlap, memory fraction) cite the framework's source in ``data/engines.yaml``;
* host-side and API-server constants are fitted on named groups of the public
  calibration set (``tools/fit_engines.py``) and written back to the same file with
  the groups they were fitted on; ``benchmarks/fidelity.py`` scores them
  leave-one-group-out.

Profiles are looked up by engine name and version: the newest profile whose ``from``
version is not newer than the requested one (unversioned and nightly builds take the
newest).
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import yaml

ENGINES = ("vllm", "sglang", "trtllm", "ideal")


@dataclass(frozen=True)
class HostCosts:
    """Host-side time of one engine step (seconds), outside the GPU kernels.

    ``step_fixed_s`` + ``per_seq_s`` x sequences + ``per_prefill_token_s`` x new prompt
    tokens. With ``async_overlap`` the engine prepares step n+1 while the GPU runs step n,
    so only the part exceeding the GPU time shows; otherwise it adds to every step.
    A step that does not replay a CUDA graph pays ``eager_launch_s`` per kernel it launches
    (``InstanceCostModel.eager_kernels``; hidden when the GPU is slower than the launches).
    """

    step_fixed_s: float = 0.0
    per_seq_s: float = 0.0
    per_prefill_token_s: float = 0.0
    eager_launch_s: float = 0.0
    async_overlap: bool = False


@dataclass(frozen=True)
class ApiCosts:
    """The API server's share of a request (seconds).

    The API server is one process with one event loop (vLLM's AsyncLLM front end,
    SGLang's TokenizerManager, trtllm-serve): the CPU work of a new request (HTTP parsing,
    chat template, tokenisation: ``serial_s`` + ``per_prompt_token_s`` x prompt tokens) and
    of streaming every engine step's tokens (``per_step_s`` + ``per_output_s`` x sequences
    that produced a token: detokenise, frame, write) queue for the same loop. That one serial
    resource is why TTFT grows with the number of streams at equal GPU load, and why
    requests that clients send together reach the engine spread apart. ``latency_s`` is the
    rest of the way from the client to the engine (loopback hops, inter-process queues),
    which requests do not wait on each other for.
    """

    latency_s: float = 0.0
    serial_s: float = 0.0
    per_prompt_token_s: float = 0.0
    per_step_s: float = 0.0
    per_output_s: float = 0.0
    # P/D: from the prefill's answer to the decode's KV pull — the router's second leg, the decode's
    # intake and its KV connector's set-up and polling; a fixed cost of the path, fitted on P/D rows
    pd_handoff_s: float = 0.0

    def request_s(self, prompt_tokens: int) -> float:
        """The loop's time to take in one request."""
        return self.serial_s + self.per_prompt_token_s * prompt_tokens

    def step_s(self, outputs: int) -> float:
        """The loop's time to stream one engine step's tokens to their clients."""
        return (self.per_step_s + self.per_output_s * outputs) if outputs else 0.0


def sending_tokens(count: int, stream_interval: int) -> np.ndarray:
    """Indices of the output tokens whose arrival makes the API server send (``engine.streamInterval``):
    the first token at once, then every ``stream_interval``-th, and the last, which ends the stream
    (vLLM's OutputProcessor: it sends when nothing was sent yet or ``stream_interval`` tokens are due,
    vllm-project/vllm#27869; SGLang and TensorRT-LLM hold tokens back the same way). Every token
    reaches its client when the next sending token does."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    sends = np.arange(0, count, max(1, stream_interval), dtype=np.int64)
    return sends if sends[-1] == count - 1 else np.append(sends, count - 1)


def delivered(times: np.ndarray, stream_interval: int) -> np.ndarray:
    """When each output token (produced at ``times``) reaches its client: with the next sending token."""
    if stream_interval <= 1 or len(times) == 0:
        return times
    sends = sending_tokens(len(times), stream_interval)
    return times[sends[np.searchsorted(sends, np.arange(len(times)))]]


@dataclass(frozen=True)
class EngineProfile:
    name: str
    version: str  # the profile's own "from" version
    scheduling: str  # mixed | prefill_first
    chunked_prefill: bool
    prefix_caching: bool
    reserve_full_sequence: bool
    max_num_batched_tokens: int
    max_num_batched_tokens_small_gpu: int
    large_gpu_bytes: float  # GPUs with at least this much HBM get the large defaults
    max_num_seqs: int
    max_num_seqs_small_gpu: int
    gpu_memory_utilization: float
    memory_fraction_of_free: bool
    cuda_graph_sizes: tuple[int, ...]
    cuda_graph_padding: bool
    # a step with prompt tokens replays a (piecewise) graph up to the largest capture size (vLLM's
    # torch.compile graphs), else it runs eagerly whatever its size (SGLang's extend, TensorRT-LLM's context)
    cuda_graph_prefill: bool = True
    # the default token budget is the whole attention-DP group's, split over its ranks (SGLang)
    dp_divides_token_budget: bool = False
    # the engine decides step n+1 while step n runs (vLLM's async scheduling, SGLang's overlap scheduler,
    # TensorRT-LLM's overlap scheduler): a request that arrives during a step misses the step already decided
    async_scheduling: bool = False
    host: HostCosts = field(default_factory=HostCosts)
    api: ApiCosts = field(default_factory=ApiCosts)
    fitted_on: tuple[str, ...] = ()

    def batch_defaults(self, hbm_bytes: float) -> tuple[int, int]:
        """(max_num_batched_tokens, max_num_seqs) the engine picks on a GPU of this memory."""
        if hbm_bytes >= self.large_gpu_bytes:
            return self.max_num_batched_tokens, self.max_num_seqs
        return self.max_num_batched_tokens_small_gpu, self.max_num_seqs_small_gpu

    def graph_size(self, batch: int) -> int | None:
        """The captured batch size a decode batch replays (None: it runs eagerly)."""
        sizes = self.cuda_graph_sizes
        if not sizes or batch > sizes[-1]:
            return None
        s = sizes[bisect_left(sizes, batch)]
        return s if (self.cuda_graph_padding or s == batch) else None


def version_key(version: str | None) -> tuple[float, ...]:
    """Order '0.5.10.post1' after '0.5.9'; unversioned, nightly and named builds sort last."""
    if not version:
        return (float("inf"),)
    m = re.match(r"^v?(\d+(?:\.\d+)*)", version.strip())
    if m is None:
        return (float("inf"),)
    return tuple(float(x) for x in m.group(1).split("."))


def _capture_sizes(spec: Any) -> tuple[int, ...]:
    """Capture sizes from the data file: an explicit list or {ranges: [[start, stop, step], ...]}."""
    if isinstance(spec, list):
        return tuple(sorted({int(x) for x in spec}))
    sizes: set[int] = set(int(x) for x in spec.get("sizes", []))
    for start, stop, step in spec.get("ranges", []):
        sizes.update(range(int(start), int(stop) + 1, int(step)))
    return tuple(sorted(sizes))


def _prefill_graphs(engine: str, mode: str) -> bool:
    if mode not in ("piecewise", "eager"):
        raise ValueError(f"engines.yaml: {engine}.cuda_graphs.prefill is {mode!r}; use piecewise or eager")
    return mode == "piecewise"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _profile(name: str, merged: dict) -> EngineProfile:
    host = merged.get("host", {})
    api = merged.get("api", {})
    limits = merged["defaults"]
    return EngineProfile(
        name=name,
        version=str(merged["from"]),
        scheduling=merged["scheduling"],
        chunked_prefill=bool(merged["chunked_prefill"]),
        prefix_caching=bool(merged.get("prefix_caching", True)),
        reserve_full_sequence=merged.get("capacity_policy", "max_utilization") == "guaranteed_no_evict",
        max_num_batched_tokens=int(limits["max_num_batched_tokens"]),
        max_num_batched_tokens_small_gpu=int(limits.get("max_num_batched_tokens_small_gpu", 2048)),
        large_gpu_bytes=float(limits.get("large_gpu_gib", 70)) * 1024**3,
        max_num_seqs=int(limits["max_num_seqs"]),
        max_num_seqs_small_gpu=int(limits.get("max_num_seqs_small_gpu", limits["max_num_seqs"])),
        gpu_memory_utilization=float(limits["gpu_memory_utilization"]),
        memory_fraction_of_free=bool(limits.get("fraction_of_free_memory", False)),
        cuda_graph_sizes=_capture_sizes(merged["cuda_graphs"]["capture"]),
        cuda_graph_padding=bool(merged["cuda_graphs"].get("padding", True)),
        cuda_graph_prefill=_prefill_graphs(name, merged["cuda_graphs"].get("prefill", "piecewise")),
        dp_divides_token_budget=bool(limits.get("dp_divides_token_budget", False)),
        async_scheduling=bool(merged.get("async_scheduling", False)),
        host=HostCosts(
            step_fixed_s=float(host.get("step_fixed_us", 0.0)) * 1e-6,
            per_seq_s=float(host.get("per_seq_us", 0.0)) * 1e-6,
            per_prefill_token_s=float(host.get("per_prefill_token_us", 0.0)) * 1e-6,
            eager_launch_s=float(host.get("eager_launch_us_per_kernel", 0.0)) * 1e-6,
            async_overlap=bool(host.get("async_overlap", False)),
        ),
        api=ApiCosts(
            latency_s=float(api.get("latency_ms", 0.0)) * 1e-3,
            serial_s=float(api.get("serial_us", 0.0)) * 1e-6,
            per_prompt_token_s=float(api.get("per_prompt_token_us", 0.0)) * 1e-6,
            per_step_s=float(api.get("per_step_us", 0.0)) * 1e-6,
            per_output_s=float(api.get("per_output_us", 0.0)) * 1e-6,
            pd_handoff_s=float(api.get("pd_handoff_ms", 0.0)) * 1e-3,
        ),
        fitted_on=tuple(merged.get("fitted_on", ())),
    )


@cache
def _raw() -> dict:
    text = resources.files("emulator.costmodel").joinpath("data", "engines.yaml").read_text("utf-8")
    return yaml.safe_load(text)


@cache
def fitted_constants() -> dict:
    """The host-side and API constants ``tools/fit_engines.py`` fitted, with their provenance
    (``data/engine_constants.json``); empty when none were fitted."""
    path = resources.files("emulator.costmodel").joinpath("data", "engine_constants.json")
    if not path.is_file():
        return {}
    return json.loads(path.read_text("utf-8"))


@cache
def profiles(name: str) -> tuple[EngineProfile, ...]:
    """Every profile of one engine, oldest first (each inherits the engine's base section)."""
    raw = _raw()["engines"]
    if name not in raw:
        raise KeyError(f"unknown engine {name!r}; known: {', '.join(raw)}")
    section = raw[name]
    base = {k: v for k, v in section.items() if k != "versions"}
    fitted = fitted_constants().get("engines", {}).get(name)
    if fitted:  # fitted constants complete the structural base of every version
        base = _merge(base, {"host": fitted["host"], "api": fitted["api"], "fitted_on": fitted["fitted_on"]})
    out = []
    merged = base
    for entry in sorted(section["versions"], key=lambda v: version_key(str(v["from"]))):
        merged = _merge(merged, entry)
        out.append(_profile(name, merged))
    return tuple(out)


def engine_profile(name: str, version: str | None = None) -> EngineProfile:
    """The profile for this engine and version."""
    options = profiles(name)
    key = version_key(version)
    chosen = options[0]
    for p in options:
        if version_key(p.version) <= key:
            chosen = p
    return chosen


def profile_choice(name: str, version: str | None = None) -> str:
    """Which profile prices an engine and version, in words (``infemu validate``): a version older than
    every profile is read as the oldest one, which a user should be told rather than find out."""
    chosen = engine_profile(name, version)
    asked = f"{name} {version}" if version else f"{name} (no version: the newest profile)"
    label = chosen.name if chosen.version in ("", "0") else f"{chosen.name} {chosen.version}"  # ideal: one profile
    line = f"{asked}: host side priced with the {label} profile"
    if version and version_key(version) < version_key(profiles(name)[0].version):
        line += f" ({version} is older than every profiled version; the oldest stands in for it)"
    return line


def with_constants(profile: EngineProfile, host: HostCosts | None = None, api: ApiCosts | None = None) -> EngineProfile:
    """A copy with other fitted constants (the fit and the cross-validation use this)."""
    return replace(profile, host=host or profile.host, api=api or profile.api)
