"""What a plan shows: the ranked table, the JSON, the best specs as YAML, and the confirmation of
the top plans as real local emulations next to the simulator's figures."""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from emulator.planner.candidates import deployment_doc
from emulator.planner.search import Outcome, Problem, measure
from emulator.planner.space import Pruned

CONFIRM_TOLERANCE = 0.05  # measured attainment within 5 points of the simulator's: the emulation's stated error


@dataclass
class Plan:
    outcome: Outcome
    units: int  # copies of the unit in the GPU budget

    @property
    def rate(self) -> float:
        """The whole plan's goodput rate: every unit at its maximum."""
        return self.units * self.outcome.max_rate


def plans_for(outcomes: list[Outcome], gpus: int) -> list[Plan]:
    out = []
    for o in outcomes:
        units = gpus // o.candidate.unit_gpus
        if units and o.max_rate > 0:
            out.append(Plan(o, units))
    return out


def table(plans: list[Plan], limit: int = 15) -> str:
    head = (
        f"{'#':>2}  {'design':<46} {'GPUs/unit':>9} {'units':>5} {'rate/unit':>9} {'plan rate':>9} "
        f"{'req/s/GPU':>9} {'binds':>9} {'sims':>4}"
    )
    lines = [head, "-" * len(head)]
    for i, p in enumerate(plans[:limit], 1):
        o = p.outcome
        lines.append(
            f"{i:>2}  {o.candidate.label():<46} {o.candidate.unit_gpus:>9} {p.units:>5} {o.max_rate:>9.2f} "
            f"{p.rate:>9.2f} {o.goodput_per_gpu:>9.3f} {o.binding:>9} {o.sims:>4}"
        )
    return "\n".join(lines)


def as_json(plans: list[Plan], failed: list[Outcome], pruned: list[Pruned], skipped: dict, stats: dict) -> dict:
    return {
        "plans": [
            {
                "rank": i,
                "design": p.outcome.candidate.design,
                "label": p.outcome.candidate.label(),
                "placement": p.outcome.candidate.placement,
                "phases": [
                    {"role": ph.role, "tp": ph.tp, "pp": ph.pp, "instances": ph.count}
                    for ph in p.outcome.candidate.phases
                ],
                "gpus_per_unit": p.outcome.candidate.unit_gpus,
                "units": p.units,
                "max_rate_per_unit": p.outcome.max_rate,
                "plan_rate": p.rate,
                "goodput_per_gpu": p.outcome.goodput_per_gpu,
                "attainment_at_rate": p.outcome.attainment,
                "binding": p.outcome.binding,
                "simulations": p.outcome.sims,
            }
            for i, p in enumerate(plans, 1)
        ],
        "not_meeting": [{"label": o.candidate.label(), "why": o.note} for o in failed],
        "pruned": [{"label": x.candidate.label(), "why": x.reason} for x in pruned],
        "designs_not_searched": skipped,
        "search": stats,
    }


def plan_doc(problem: Problem, plan: Plan, nodes: int | None) -> dict:
    """The plan as a ready-to-run spec: its units at the plan's rate."""
    doc = deployment_doc(problem.base, plan.outcome.candidate, plan.units, plan.rate, problem.requests, nodes)
    doc["metadata"] = {"name": f"plan-{plan.outcome.candidate.design}"}
    return doc


def write_specs(out_dir: str, problem: Problem, plans: list[Plan], nodes: int | None, count: int = 3) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, plan in enumerate(plans[:count], 1):
        path = os.path.join(out_dir, f"plan-{i}.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            label = plan.outcome.candidate.label()
            fh.write(f"# infemu plan, rank {i}: {label}; {plan.units} unit(s) at {plan.rate:.2f} req/s\n")
            yaml.safe_dump(plan_doc(problem, plan, nodes), fh, sort_keys=False)
        paths.append(path)
    return paths


@dataclass
class Confirmation:
    label: str
    rate: float
    simulated: float
    emulated: float | None
    dilation: float
    trust: str
    confirmed: bool


def confirm(
    problem: Problem, plans: list[Plan], count: int, out_dir: str, nodes: int | None, dilation: float
) -> list[Confirmation]:
    """Run the top plans as local emulations at their planned rate (time dilation ``dilation``) and
    set their measured attainment next to the simulator's for the very same plan."""
    from emulator.run import run
    from emulator.spec import load_clusters
    from emulator.workload.plan import plan_for

    out = []
    for i, plan in enumerate(plans[:count], 1):
        simulated = measure(problem, plan.outcome.candidate, plan.rate, plan.units).attainment
        d = dilation
        for attempt in range(2):  # a host too busy at D is asked again once, at the dilation its run suggests
            doc = plan_doc(problem, plan, nodes)
            doc["spec"].setdefault("emulation", {})["timeDilation"] = d
            folder = os.path.join(out_dir, f"confirm-{i}" + (f"-d{d:g}" if attempt else ""))
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "spec.yaml")
            with open(path, "w", encoding="utf-8") as fh:
                yaml.safe_dump(doc, fh, sort_keys=False)
            cluster = load_clusters(path)[0]
            result = run(cluster, path, plan_for(cluster), folder, shaping="inproc")
            trust = result.trust or {}
            suggested = trust.get("suggested_time_dilation")
            if attempt or trust.get("verdict") == "faithful" or not suggested or suggested <= d:
                break
            d = float(suggested)
        emulated = float(result.summary["slo_attainment"])
        verdict = trust.get("verdict", "unknown")
        ok = abs(emulated - simulated) <= CONFIRM_TOLERANCE and verdict == "faithful"
        out.append(Confirmation(plan.outcome.candidate.label(), plan.rate, simulated, emulated, d, verdict, ok))
    return out
