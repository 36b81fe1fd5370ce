"""The search space after the cheap bounds: which candidates are worth simulating, and why the
others are not (every pruned candidate is reported with its reason).

Bounds, each from the cost model alone: the instance must fit (weights and a KV cache within
the GPU's memory, TP dividing the heads: the same checks ``infemu validate`` runs); an idle
instance must already meet the SLO (a mean prompt's prefill within the TTFT SLO, one sequence's
decode step within the TPOT SLO); and for P/D, each phase's per-GPU capacity ranks its layouts
(the best ``KEEP_PER_PHASE`` are paired) and sets the P:D ratios worth trying (the counts whose
prefill and decode capacities balance best).
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.errors import SpecError
from emulator.planner.candidates import (
    PLACEMENTS,
    Candidate,
    Phase,
    PhaseBound,
    deployment_doc,
    parallel_layouts,
    phase_bound,
)
from emulator.topology import PlacementError

KEEP_PER_PHASE = 3  # P/D: the best layouts per phase by per-GPU capacity
RATIOS_PER_PAIR = 2  # P/D: the best-balanced instance counts per pair of layouts
MAX_PER_PHASE = 4  # instances of one phase in a unit


@dataclass(frozen=True)
class Pruned:
    candidate: Candidate
    reason: str


def _build(doc: dict):
    """(cluster, instance setups) of a unit's spec, or why it cannot run: the validator's and the
    memory planner's own first reason."""
    from emulator.build import build_instances
    from emulator.spec import parse_cluster

    try:
        cluster = parse_cluster(doc)
        return cluster, build_instances(cluster.spec)[1]
    except (SpecError, PlacementError, ValueError) as exc:
        problems = exc.problems if isinstance(exc, SpecError) else [str(exc)]
        return f"does not fit: {problems[0]}"


def _bound(base: dict, tp: int, pp: int, mean_in: int, mean_out: int, tpot_ms: float) -> PhaseBound | str:
    """One aggregated instance of this layout, priced as a prefill and as a decode instance."""
    from emulator.capacity import profile_of

    built = _build(deployment_doc(base, Candidate("agg", (Phase("aggregated", tp, pp, 1),)), 1, 1.0, 1))
    if isinstance(built, str):
        return built
    cluster, setups = built
    api_ms = profile_of(cluster.spec).api.latency_s * 1e3
    return phase_bound(setups[0], "aggregated", mean_in, mean_out, tpot_ms, api_ms)


def search_space(
    base: dict, gpus: int, designs: list[str], mean_in: int, mean_out: int, ttft_ms: float, tpot_ms: float
) -> tuple[list[tuple[Candidate, float]], list[Pruned], dict[str, str]]:
    """(candidates with the rate to start bracketing at, pruned candidates, designs not searched)."""
    topo = base["spec"]["topology"]
    gpn = topo["gpusPerNode"]
    domain = min(topo.get("scaleUp", {}).get("size", gpn), gpn)
    layouts = [(tp, pp) for tp, pp in parallel_layouts(domain) if tp * pp <= gpus]
    bounds = {lay: _bound(base, *lay, mean_in, mean_out, tpot_ms) for lay in layouts}
    keep: list[tuple[Candidate, float]] = []
    pruned: list[Pruned] = []
    skipped: dict[str, str] = {}
    idle_prefill: dict[tuple[int, int], PhaseBound] = {}
    idle_decode: dict[tuple[int, int], PhaseBound] = {}
    for (tp, pp), b in bounds.items():
        agg = Candidate("agg", (Phase("aggregated", tp, pp, 1),))
        if isinstance(b, str):
            pruned.append(Pruned(agg, b))
            continue
        prefill_ok = b.idle_ttft_ms is not None and b.idle_ttft_ms <= ttft_ms
        decode_ok = b.idle_tpot_ms is not None and b.idle_tpot_ms <= tpot_ms and b.decode_rate > 0
        if prefill_ok:
            idle_prefill[(tp, pp)] = b
        if decode_ok:
            idle_decode[(tp, pp)] = b
        if "agg" in designs:
            if not prefill_ok:
                pruned.append(
                    Pruned(agg, f"an idle instance needs {b.idle_ttft_ms:.0f} ms for a mean prompt > TTFT SLO")
                )
            elif not decode_ok:
                pruned.append(Pruned(agg, f"one sequence alone decodes at {b.idle_tpot_ms:.1f} ms/token > TPOT SLO"))
            else:
                keep.append((agg, b.rate_per_instance))
    if "pd" in designs:
        keep += _pd_candidates(base, gpus, gpn, idle_prefill, idle_decode, pruned)
    if "afd" in designs:
        skipped["afd"] = "the planner does not search attention-FFN disaggregation yet (examples/afd-*.yaml run it)"
    return keep, pruned, skipped


def _pd_candidates(base, gpus, gpn, prefill, decode, pruned) -> list[tuple[Candidate, float]]:
    # a dedicated prefill instance runs prompts back to back; a decode instance its largest batch
    best_p = sorted(prefill, key=lambda lay: -prefill[lay].prefill_rate / (lay[0] * lay[1]))[:KEEP_PER_PHASE]
    best_d = sorted(decode, key=lambda lay: -decode[lay].decode_rate / (lay[0] * lay[1]))[:KEEP_PER_PHASE]
    out = []
    for lp in best_p:
        for ld in best_d:
            gp, gd = lp[0] * lp[1], ld[0] * ld[1]
            cap_p, cap_d = prefill[lp].prefill_rate, decode[ld].decode_rate
            counts = [
                (p, d)
                for p in range(1, MAX_PER_PHASE + 1)
                for d in range(1, MAX_PER_PHASE + 1)
                if p * gp + d * gd <= gpus and (p == 1 or d == 1 or p != d)
            ]
            counts.sort(key=lambda pd: -min(pd[0] * cap_p, pd[1] * cap_d) / (pd[0] * gp + pd[1] * gd))
            for p, d in counts[:RATIOS_PER_PAIR]:
                packed_at = None
                for placement in PLACEMENTS:
                    cand = Candidate("pd", (Phase("prefill", *lp, p), Phase("decode", *ld, d)), placement)
                    doc = deployment_doc(base, cand, 1, 1.0, 1)
                    where = [pool["placement"] for pool in doc["spec"]["pools"]]
                    if placement == "packed":
                        packed_at = where
                    elif where == packed_at:
                        continue  # the unit fills whole nodes: split is the same layout
                    if doc["spec"]["topology"]["nodes"] * gpn > max(gpus, cand.unit_gpus) and placement == "split":
                        pruned.append(
                            Pruned(
                                cand,
                                f"a split unit spans {doc['spec']['topology']['nodes']} nodes: more than the budget",
                            )
                        )
                        continue
                    built = _build(doc)
                    if isinstance(built, str):
                        pruned.append(Pruned(cand, built))
                        continue
                    out.append((cand, min(p * cap_p, d * cap_d)))
    return out
