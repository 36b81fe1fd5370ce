"""``infemu plan``: read the problem from the spec and the flags, search, print, write, confirm."""

from __future__ import annotations

import argparse
import json
import os
import time

from emulator.errors import SpecError
from emulator.planner.output import as_json, confirm, plans_for, table, write_specs
from emulator.planner.search import Problem, search
from emulator.planner.space import search_space

RATE_ARRIVALS = ("poisson", "gamma", "constant")
DESIGNS = ("agg", "pd", "afd")


def problem_from(args: argparse.Namespace):
    """(Problem, GPU budget, nodes, designs, mean input, mean output) from the spec and the flags."""
    from emulator.spec import load_clusters, parse_cluster
    from emulator.workload.plan import build_plan

    clusters = load_clusters(args.spec)
    cluster = next((c for c in clusters if c.name == args.cluster), None) if args.cluster else clusters[0]
    if cluster is None:
        raise SpecError([f"--cluster: no cluster named {args.cluster!r} in {args.spec}"])
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    bad = [d for d in designs if d not in DESIGNS]
    if bad or not designs:
        raise SpecError([f"--designs: {args.designs!r}: choose from {', '.join(DESIGNS)}"])
    arrival = cluster.spec.workload.arrival.type
    if arrival not in RATE_ARRIVALS:
        raise SpecError(
            [
                f"spec.workload.arrival.type: {arrival!r}: infemu plan searches over the arrival rate; use "
                f"{', '.join(RATE_ARRIVALS)} with the workload's lengths"
            ]
        )
    if args.attainment is not None and not 0 < args.attainment <= 1:
        raise SpecError([f"--attainment: {args.attainment:g} is not in (0, 1]"])
    base = cluster.model_dump(by_alias=True, exclude_unset=True, mode="json")  # the user's own keys only
    slo = base["spec"].setdefault("slo", {})
    for flag, key in (("slo_ttft_ms", "ttftMs"), ("slo_tpot_ms", "tpotMs"), ("attainment", "attainmentTarget")):
        if getattr(args, flag) is not None:
            slo[key] = getattr(args, flag)
    checked = parse_cluster(base)  # the SLO flags are validated as the spec's own fields
    topo = checked.spec.topology
    nodes = args.nodes or topo.nodes
    gpus = args.gpus or nodes * topo.gpus_per_node
    plan = build_plan(checked.spec.workload)
    mean_in = max(1, round(sum(r.input_len for r in plan.requests) / len(plan.requests)))
    mean_out = max(1, round(sum(r.output_len for r in plan.requests) / len(plan.requests)))
    size_context(base, plan)
    s = checked.spec.slo
    problem = Problem(base, args.requests, s.attainment_target, s.ttft_ms, s.tpot_ms)
    return problem, gpus, args.nodes, designs, mean_in, mean_out


def size_context(base: dict, plan) -> None:
    """maxModelLen is a deployment choice: size it to the workload's longest request (rounded up to
    256 tokens) so a layout is not pruned for a context the workload never uses (a 70B model on TP2
    holds ~20k tokens of KV, not a 32k context)."""
    longest = max(r.input_len + r.output_len for r in plan.requests)
    for pool in base["spec"]["pools"]:
        pool["maxModelLen"] = -(-longest // 256) * 256


def plan_command(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    problem, gpus, nodes, designs, mean_in, mean_out = problem_from(args)
    candidates, pruned, skipped = search_space(
        problem.base, gpus, designs, mean_in, mean_out, problem.ttft_ms, problem.tpot_ms
    )
    t_space = time.perf_counter() - t0
    problem = Problem(
        problem.base, problem.requests, problem.target, problem.ttft_ms, problem.tpot_ms, time.time() + args.budget_s
    )
    jobs = args.jobs or os.cpu_count() or 1
    outcomes = search(problem, candidates, jobs)
    wall = time.perf_counter() - t0
    plans = plans_for(outcomes, gpus)
    failed = [o for o in outcomes if o.max_rate <= 0]
    sims = sum(o.sims for o in outcomes)
    stats = {
        "gpus": gpus,
        "mean_input_tokens": mean_in,
        "mean_output_tokens": mean_out,
        "candidates_simulated": sum(1 for o in outcomes if o.sims),
        "candidates_pruned": len(pruned),
        "simulations": sims,
        "pruning_s": round(t_space, 2),
        "search_s": round(wall - t_space, 2),
        "wall_s": round(wall, 2),
        "cpu_s_in_simulations": round(sum(o.wall_s for o in outcomes), 2),
        "jobs": jobs,
        "requests_per_simulation": problem.requests,
    }
    paths = write_specs(args.out, problem, plans, nodes) if args.out and plans else []
    confirmations = (
        confirm(problem, plans, args.confirm, args.out or ".", nodes, args.confirm_dilation) if args.confirm else []
    )
    if args.json:
        doc = as_json(plans, failed, pruned, skipped, stats)
        doc["specs"] = paths
        doc["confirmations"] = [c.__dict__ for c in confirmations]
        print(json.dumps(doc))
        return 0 if plans else 1
    slo = f"TTFT <= {problem.ttft_ms:g} ms, TPOT <= {problem.tpot_ms:g} ms, attainment >= {100 * problem.target:g}%"
    print(f"plan for {gpus} GPUs under {slo} (mean prompt {mean_in}, mean output {mean_out} tokens):")
    print(table(plans) if plans else "  no candidate meets the SLO at any rate")
    print(
        f"searched {stats['candidates_simulated']} candidates with {sims} simulations of {problem.requests} requests "
        f"({stats['cpu_s_in_simulations']:.0f} CPU-s over {jobs} processes) in {wall:.1f} s; pruning took "
        f"{t_space:.1f} s and set aside {len(pruned)}"
    )
    for x in pruned[:8]:
        print(f"  pruned {x.candidate.label()}: {x.reason}")
    if len(pruned) > 8:
        print(f"  ... and {len(pruned) - 8} more (--json lists them all)")
    for o in failed:
        print(f"  {o.candidate.label()}: {o.note}")
    for design, why in skipped.items():
        print(f"  {design}: {why}")
    for path in paths:
        print(f"wrote {path}")
    for c in confirmations:
        verdict = "CONFIRMED" if c.confirmed else "not confirmed"
        print(
            f"confirm {c.label} at {c.rate:.2f} req/s: simulated attainment {100 * c.simulated:.1f}%, emulated "
            f"{100 * (c.emulated or 0):.1f}% at time dilation {c.dilation:g} (trust: {c.trust}) -> {verdict}"
        )
    return 0 if plans else 1
