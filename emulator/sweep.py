"""``infemu sweep``: SLO attainment against request rate, and goodput — the highest rate whose
attainment meets the target (DistServe's definition) — simulated or emulated."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from emulator.overrides import WorkloadOverrides, apply_overrides
from emulator.spec import InferenceCluster
from emulator.workload.plan import plan_for


@dataclass(frozen=True)
class SweepPoint:
    rate: float
    summary: dict
    # an emulated point's trust verdict (``emulator.trust``): a rate the host could not keep time at is
    # flagged, not reported as if it had; None for a simulated point
    trust: dict | None = None


def sweep(
    cluster: InferenceCluster,
    spec_path: str,
    rates: list[float],
    *,
    simulate_only: bool,
    requests: int | None = None,
    shaping: str = "auto",
) -> list[SweepPoint]:
    points = []
    base_dir = os.path.dirname(os.path.abspath(spec_path))
    for rate in rates:
        c = apply_overrides(cluster, WorkloadOverrides(rate=rate, requests=requests))
        plan = plan_for(c, base_dir)
        if simulate_only:
            from emulator.sim.simulator import simulate

            points.append(SweepPoint(rate, simulate(c, plan).summary))
        else:
            from emulator.run import host_chosen_dilation, run

            # as `infemu run` does: each rate's own load decides the dilation its host needs
            result = run(host_chosen_dilation(c, spec_path, plan, shaping), spec_path, plan, None, shaping=shaping)
            points.append(SweepPoint(rate, result.summary, result.trust))
    return points


def point_json(point: SweepPoint, full: bool = False) -> dict:
    """A point as `--json` prints it (rate, attainment) or sweep.json keeps it (``full``: the whole
    summary); an emulated point adds its trust verdict and the time dilation that would fix it."""
    out = {"rate": point.rate, **(point.summary if full else {"slo_attainment": point.summary["slo_attainment"]})}
    if point.trust is not None:
        out["trust"] = {k: point.trust.get(k) for k in ("verdict", "time_dilation", "suggested_time_dilation")}
    return out


def trust_mark(point: SweepPoint) -> str:
    """The sweep table's trust column: blank when simulated, else whether the host kept time."""
    if point.trust is None:
        return ""
    if point.trust.get("verdict") == "faithful":
        dilation = point.trust.get("time_dilation") or 1.0
        return "faithful" if dilation == 1.0 else f"faithful at D={dilation:g}"
    suggested = point.trust.get("suggested_time_dilation")
    return f"NOT faithful (timeDilation {suggested:g} would be)" if suggested else "NOT faithful"


def goodput(points: list[SweepPoint], target: float) -> float:
    """The highest swept rate whose attainment meets the target (0 when none does)."""
    ok = [p.rate for p in points if p.summary["slo_attainment"] >= target]
    return max(ok, default=0.0)


def write_outputs(out_dir: str, cluster: InferenceCluster, points: list[SweepPoint], gp: float) -> str:
    """sweep.json and sweep.png (attainment and TTFT/TPOT p90 against rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.json"), "w", encoding="utf-8") as fh:
        json.dump({"goodput_rps": gp, "points": [point_json(p, full=True) for p in points]}, fh, indent=2)
    rates = [p.rate for p in points]
    target = cluster.spec.slo.attainment_target
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rates, [100 * p.summary["slo_attainment"] for p in points], "o-")
    ax1.axhline(100 * target, color="grey", ls="--", label=f"target {100 * target:.0f}%")
    if gp:
        ax1.axvline(gp, color="green", ls=":", label=f"goodput {gp:g} req/s")
    ax1.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", title=cluster.name, ylim=(0, 105))
    ax1.legend()
    ax2.plot(rates, [p.summary["ttft_ms"]["p90"] or 0 for p in points], "o-", label="TTFT p90")
    ax2.plot(rates, [p.summary["tpot_ms"]["p90"] or 0 for p in points], "s-", label="TPOT p90")
    ax2.axhline(cluster.spec.slo.ttft_ms, color="C0", ls="--", lw=0.8)
    ax2.axhline(cluster.spec.slo.tpot_ms, color="C1", ls="--", lw=0.8)
    ax2.set(xlabel="request rate (req/s)", ylabel="ms", yscale="log", title="latency p90 vs SLOs")
    ax2.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "sweep.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
