"""The designs a plan considers, where their GPUs go, and the cheap bounds that prune them.

A candidate is one *unit* — an aggregated instance, or P prefill plus D decode instances — with
each phase's TP and PP and a placement. DistServe scales a deployment by replicating its best
unit, so the search prices one unit (its highest rate under the SLO) and the plan replicates it
over the GPU budget. Placements keep every instance inside one scale-up domain (a TP group never
straddles NVLink domains; the spec's placement check refuses it otherwise) and, for P/D, either
*pack* the unit (prefill and decode share a node whenever they fit: the KV cache crosses NVLink)
or *split* it (decode starts on a fresh node: the KV cache crosses the scale-out tier), DistServe's
high- and low-affinity placements.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from emulator.costmodel.interface import BatchShape

PLACEMENTS = ("packed", "split")
ROLE_NAMES = {"aggregated": "agg", "prefill": "prefill", "decode": "decode"}


@dataclass(frozen=True)
class Phase:
    role: str  # aggregated | prefill | decode
    tp: int
    pp: int
    count: int  # instances of this phase in one unit

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    @property
    def gpus(self) -> int:
        return self.gpus_per_instance * self.count

    def label(self) -> str:
        return f"{self.count}x tp{self.tp}pp{self.pp}"


@dataclass(frozen=True)
class Candidate:
    design: str  # agg | pd
    phases: tuple[Phase, ...]
    placement: str = "packed"

    @property
    def unit_gpus(self) -> int:
        return sum(p.gpus for p in self.phases)

    def label(self) -> str:
        if self.design == "agg":
            return f"agg {self.phases[0].label()}"
        pre, dec = self.phases
        return f"pd P {pre.label()} + D {dec.label()} ({self.placement})"


def parallel_layouts(gpus_per_domain: int, max_tp: int = 8, max_pp: int = 4) -> list[tuple[int, int]]:
    """(TP, PP) pairs whose instance fits one scale-up domain, powers of two."""
    out = []
    tp = 1
    while tp <= min(max_tp, gpus_per_domain):
        pp = 1
        while pp <= max_pp and tp * pp <= gpus_per_domain:
            out.append((tp, pp))
            pp *= 2
        tp *= 2
    return out


def place_units(cand: Candidate, units: int, gpus_per_node: int, domain: int) -> tuple[list[list[list[int]]], int]:
    """GPU ids per instance, per phase, for ``units`` copies of the unit laid out one after the
    other; and the number of GPUs the layout spans. An instance never straddles a scale-up domain;
    a split unit starts its decode phase on a fresh node."""
    per_phase: list[list[list[int]]] = [[] for _ in cand.phases]
    cursor = 0
    for _ in range(units):
        for i, phase in enumerate(cand.phases):
            if cand.placement == "split" and i > 0:
                cursor = math.ceil(cursor / gpus_per_node) * gpus_per_node
            need = phase.gpus_per_instance
            for _ in range(phase.count):
                if cursor // domain != (cursor + need - 1) // domain:
                    cursor = (cursor // domain + 1) * domain  # the next domain: no TP group across NVLink domains
                per_phase[i].append(list(range(cursor, cursor + need)))
                cursor += need
        if cand.placement == "split":
            cursor = math.ceil(cursor / gpus_per_node) * gpus_per_node  # the next unit's prefill on a fresh node
    return per_phase, cursor


def _pool_template(base_pools: list[dict], role: str) -> dict:
    """Engine limits for a phase: the base spec's pool of that role, else its first pool."""
    src = next((p for p in base_pools if p.get("role") == role), base_pools[0])
    keep = {k: v for k, v in src.items() if k not in ("name", "role", "replicas", "tp", "pp", "placement", "ep", "dp")}
    if role == "decode":
        keep.pop("maxNumBatchedTokens", None)  # a decode instance's budget defaults to its batch
    return keep


def deployment_doc(
    base: dict, cand: Candidate, units: int, rate: float, requests: int, nodes: int | None = None
) -> dict:
    """The spec of ``units`` copies of a candidate at ``rate`` requests/s: the unit the search prices
    (units = 1) or the whole plan written for the user."""
    doc = copy.deepcopy(base)
    spec = doc["spec"]
    topo = spec["topology"]
    gpn = topo["gpusPerNode"]
    domain = min(topo.get("scaleUp", {}).get("size", gpn), gpn * max(topo["nodes"], 1))
    placements, span = place_units(cand, units, gpn, domain)
    topo["nodes"] = max(nodes or 0, math.ceil(span / gpn))
    topo.pop("allowCrossDomainTp", None)
    base_pools = spec["pools"]
    spec["pools"] = [
        {
            **_pool_template(base_pools, phase.role),
            "name": ROLE_NAMES[phase.role],
            "role": phase.role,
            "replicas": phase.count * units,
            "tp": phase.tp,
            "pp": phase.pp,
            "placement": placed,
        }
        for phase, placed in zip(cand.phases, placements, strict=True)
    ]
    router = spec.setdefault("router", {})
    router["policy"] = (
        "pd"
        if cand.design == "pd"
        else ("least_loaded" if router.get("policy") == "pd" else router.get("policy", "least_loaded"))
    )
    workload = spec.setdefault("workload", {})
    workload["rate"] = round(rate, 3)
    workload["requests"] = requests
    workload.pop("duration", None)
    spec["faults"] = []
    doc["metadata"] = {"name": "plan"}
    return doc


@dataclass(frozen=True)
class PhaseBound:
    """What the cost model says one instance of a phase can do, before any simulation."""

    idle_ttft_ms: float | None  # a mean prompt on an idle instance (prefill or aggregated)
    idle_tpot_ms: float | None  # one sequence decoding alone (decode or aggregated)
    prefill_rate: float  # req/s of prompts back to back
    decode_rate: float  # req/s whose decode fits the largest batch within the TPOT SLO

    @property
    def rate_per_instance(self) -> float:
        """An aggregated instance does both: the tighter of the two bounds."""
        return min(self.prefill_rate, self.decode_rate)


def phase_bound(setup, role: str, mean_in: int, mean_out: int, tpot_ms: float, api_ms: float) -> PhaseBound:
    """Prefill: one mean prompt per step at most. Decode: the largest batch whose step stays within
    the TPOT SLO (and the KV cache), each sequence emitting ``mean_out`` tokens."""
    cost = setup.cost
    idle_ttft = idle_tpot = None
    prefill_rate = decode_rate = math.inf
    if role in ("prefill", "aggregated"):
        t_p = cost.step_time(BatchShape(prefill_chunks=((mean_in, 0),))).total_s
        idle_ttft = t_p * 1e3 + api_ms
        prefill_rate = 1.0 / t_p
    if role in ("decode", "aggregated"):
        ctx = mean_in + mean_out // 2

        def step_s(b: int) -> float:
            return cost.step_time(BatchShape(num_decode=b, decode_kv_sum=b * ctx)).total_s

        idle_tpot = step_s(1) * 1e3
        kv_seqs = setup.engine.num_gpu_blocks * setup.engine.block_size // max(mean_in + mean_out, 1)
        lo, hi = 1, max(1, min(setup.engine.max_num_seqs, kv_seqs))
        if step_s(lo) * 1e3 <= tpot_ms:
            while lo < hi:  # the largest batch within the TPOT SLO (step time grows with the batch)
                mid = (lo + hi + 1) // 2
                if step_s(mid) * 1e3 <= tpot_ms:
                    lo = mid
                else:
                    hi = mid - 1
            decode_rate = lo / (mean_out * step_s(lo))
        else:
            decode_rate = 0.0
    return PhaseBound(idle_ttft, idle_tpot, prefill_rate, decode_rate)
