"""DistServe's findings, reproduced with infemu's planner and cost model.

(a) Intra-op (TP) against inter-op (PP) parallelism on two H100s for Llama-3.1-8B prefills
    (examples/tp-vs-pp.yaml's workload): the planner's pick under a tight TTFT SLO (TP cuts each
    request's time) and under a loose one (PP's pipeline carries more requests).
(b) Disaggregation against aggregation for Llama-3.1-70B on 16 H100s, chat-like lengths, tight
    TTFT and TPOT SLOs: the best goodput per GPU of each design.
(c) The KV-transfer tier: one P/D unit (prefill TP4 + decode TP4) with its decode on the
    prefill's node (NVLink) or on another node across InfiniBand NDR, 25 or 10 Gb Ethernet, for short
    and long prompts and short outputs: where the transfer starts to bind.

    python benchmarks/plan_distserve.py [--requests 300] [--jobs 2] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emulator.planner.candidates import Candidate, Phase  # noqa: E402
from emulator.planner.run import size_context  # noqa: E402
from emulator.planner.search import Problem, search  # noqa: E402
from emulator.planner.space import search_space  # noqa: E402
from emulator.spec import load_clusters, parse_cluster  # noqa: E402
from emulator.workload.plan import build_plan  # noqa: E402


def _base(path: str, name: str | None = None) -> dict:
    clusters = load_clusters(os.path.join(ROOT, "examples", path))
    cluster = next(c for c in clusters if name is None or c.name == name)
    return cluster.model_dump(by_alias=True, exclude_unset=True, mode="json")


def _problem(base: dict, requests: int, ttft: float, tpot: float, target: float = 0.9) -> Problem:
    """The planner's problem as `infemu plan` builds it (maxModelLen sized to the workload)."""
    base = copy.deepcopy(base)
    base["spec"]["slo"] = {"ttftMs": ttft, "tpotMs": tpot, "attainmentTarget": target}
    size_context(base, build_plan(parse_cluster(base).spec.workload))
    return Problem(base, requests, target, ttft, tpot)


def tp_vs_pp(requests: int, jobs: int) -> list[dict]:
    base = _base("tp-vs-pp.yaml", "intra-op-tp2")
    base["spec"]["pools"][0].pop("maxNumSeqs", None)
    rows = []
    # an idle TP2 instance answers a 1,023-token prompt in ~20 ms, a PP2 one in ~27 ms (infemu cost)
    for label, ttft in (("tight TTFT (25 ms)", 25.0), ("loose TTFT (400 ms)", 400.0)):
        problem = _problem(base, requests, ttft, 1000.0)
        cands, pruned, _ = search_space(problem.base, 2, ["agg"], 1023, 1, ttft, 1000.0)
        two = [(c, r) for c, r in cands if c.unit_gpus == 2]
        outcomes = search(problem, two, jobs)
        rows.append(
            {
                "slo": label,
                "choices": [{"design": o.candidate.label(), "max_rate": o.max_rate} for o in outcomes],
                "pruned": [
                    {"design": p.candidate.label(), "why": p.reason} for p in pruned if p.candidate.unit_gpus == 2
                ],
                "pick": outcomes[0].candidate.label() if outcomes and outcomes[0].max_rate > 0 else None,
            }
        )
    return rows


def chat_70b(requests: int, jobs: int) -> dict:
    base = _base("pd-llama70b-h100.yaml")
    wl = base["spec"]["workload"]
    wl["inputLength"] = {"type": "fixed", "value": 1024}  # aiconfigurator's inputs: fixed ISL / OSL
    wl["outputLength"] = {"type": "fixed", "value": 256}
    problem = _problem(base, requests, 300.0, 30.0)
    cands, pruned, _ = search_space(problem.base, 16, ["agg", "pd"], 1024, 256, 300.0, 30.0)
    outcomes = search(problem, cands, jobs)
    best = {}
    for o in outcomes:
        if o.max_rate > 0 and o.candidate.design not in best:
            best[o.candidate.design] = {"design": o.candidate.label(), "goodput_per_gpu": o.goodput_per_gpu}
    return {"slo": "TTFT <= 300 ms, TPOT <= 30 ms, 90%", "candidates": len(cands), "pruned": len(pruned), "best": best}


def aiconfigurator(exe: str) -> dict | None:
    """aiconfigurator's answer to (b)'s inputs (it is on PyPI, runs offline from its bundled
    performance database; install it in a separate environment and pass its executable)."""
    cmd = [
        exe, "cli", "default", "--model-path", "meta-llama/Meta-Llama-3.1-70B", "--system", "h100_sxm",
        "--backend", "vllm", "--total-gpus", "16", "--isl", "1024", "--osl", "256", "--ttft", "300", "--tpot", "30",
        "--no-color", "--save-dir", tempfile.mkdtemp(),
    ]  # fmt: skip
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    best = re.search(r"Best Experiment Chosen: (\w+) at ([\d.,]+) tokens/s/gpu", text)
    if best is None:
        return None
    out: dict = {"chosen": best.group(1)}
    for design in ("agg", "disagg"):
        table = text.split(f"\n{design} Top Configurations")[-1]  # the line, not "disagg" holding "agg"
        rows = [r.split("|") for r in table.splitlines() if r.startswith("|  1 ")]
        if rows:
            cells = [c.strip() for c in rows[0]]
            header = [c.strip() for c in table.splitlines()[2].split("|")]
            row = dict(zip(header, cells, strict=False))
            gpus = int(row["total_gpus (used)"].split()[0])
            layout = (
                row.get("parallel")
                or f"P {row['(p)workers']}x {row['(p)parallel']} + D {row['(d)workers']}x {row['(d)parallel']}"
            )
            out[design] = {"layout": layout, "req_s": float(row["req/s"]), "req_s_per_gpu": float(row["req/s"]) / gpus}
            if design == "disagg":
                out[design]["phases"] = [
                    (role, *map(int, re.findall(r"\d+", row[f"({k})parallel"])), int(row[f"({k})workers"]))
                    for role, k in (("prefill", "p"), ("decode", "d"))
                ]
    return out


def price_in_infemu(aic: dict, requests: int, jobs: int) -> float | None:
    """aiconfigurator's P/D pick priced by infemu's search under (b)'s problem (goodput per GPU)."""
    phases = aic.get("disagg", {}).get("phases")
    if not phases:
        return None
    base = _base("pd-llama70b-h100.yaml")
    base["spec"]["workload"]["inputLength"] = {"type": "fixed", "value": 1024}
    base["spec"]["workload"]["outputLength"] = {"type": "fixed", "value": 256}
    cand = Candidate("pd", tuple(Phase(role, tp, pp, n) for role, tp, pp, n in phases))
    (o,) = search(_problem(base, requests, 300.0, 30.0), [(cand, 4.0)], jobs)
    return o.goodput_per_gpu


def kv_tier(requests: int, jobs: int) -> list[dict]:
    base = _base("pd-llama70b-h100.yaml")
    rows = []
    # the transfer delays the decode side (the prefill's first token is already out): it lands in
    # the first inter-token gap, so it binds on TPOT once outputs are short enough to not dilute it
    for prompt, output in ((1024, 128), (8192, 128), (8192, 16)):
        wl = base["spec"]["workload"]
        wl["inputLength"] = {"type": "fixed", "value": prompt}
        wl["outputLength"] = {"type": "fixed", "value": output}
        tiers = (("nvlink (same node)", "packed"), ("ib-ndr-400", "split"), ("ethernet-25", "split"))
        for tier, placement in (*tiers, ("ethernet-10", "split")):
            b = copy.deepcopy(base)
            if placement == "split":
                b["spec"]["topology"]["scaleOut"] = {"tier": tier}
            problem = _problem(b, requests, 1500.0, 25.0)
            cand = Candidate("pd", (Phase("prefill", 4, 1, 1), Phase("decode", 4, 1, 1)), placement)
            (o,) = search(problem, [(cand, 2.0)], jobs)
            rows.append(
                {"prompt": prompt, "output": output, "kv_tier": tier, "max_rate": o.max_rate, "binding": o.binding}
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--aiconfigurator",
        default=shutil.which("aiconfigurator"),
        help="aiconfigurator's executable, to compare (b) with its recommendation (default: on PATH, if any)",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = {
        "tp_vs_pp": tp_vs_pp(args.requests, args.jobs),
        "chat_70b": chat_70b(args.requests, args.jobs),
        "kv_tier": kv_tier(args.requests, args.jobs),
    }
    out["aiconfigurator"] = aiconfigurator(args.aiconfigurator) if args.aiconfigurator else None
    if out["aiconfigurator"]:
        out["aiconfigurator"]["disagg_pick_in_infemu"] = price_in_infemu(
            out["aiconfigurator"], args.requests, args.jobs
        )
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(out))
        return
    print("(a) Llama-3.1-8B prefills on 2 x H100: the planner's pick")
    for row in out["tp_vs_pp"]:
        choices = ", ".join(f"{c['design']} {c['max_rate']:.1f} req/s" for c in row["choices"])
        pruned = "; ".join(f"{p['design']} pruned: {p['why']}" for p in row["pruned"])
        print(f"  {row['slo']:<20} -> {row['pick']}   ({choices}{'; ' + pruned if pruned else ''})")
    c = out["chat_70b"]
    print(f"(b) Llama-3.1-70B on 16 x H100, chat lengths, {c['slo']}: {c['candidates']} candidates")
    for design, b in c["best"].items():
        print(f"  best {design:<4} {b['design']:<46} {b['goodput_per_gpu']:.3f} req/s per GPU")
    if {"agg", "pd"} <= set(c["best"]):
        ratio = c["best"]["pd"]["goodput_per_gpu"] / c["best"]["agg"]["goodput_per_gpu"]
        print(f"  disaggregation / aggregation: {ratio:.2f}x goodput per GPU")
    aic = out["aiconfigurator"]
    if aic:
        print(f"  aiconfigurator on the same inputs chooses {aic['chosen']}:")
        for design in ("agg", "disagg"):
            if design in aic:
                a = aic[design]
                print(f"    best {design:<6} {a['layout']:<38} {a['req_s_per_gpu']:.3f} req/s per GPU")
        if aic.get("disagg_pick_in_infemu") is not None:
            print(f"    its disagg pick simulated by infemu: {aic['disagg_pick_in_infemu']:.3f} req/s per GPU")
    else:
        print("  (aiconfigurator not run: pass --aiconfigurator PATH to compare)")
    print("(c) one P/D unit (prefill TP4 + decode TP4), TTFT <= 1.5 s, TPOT <= 25 ms: where its KV cache travels")
    for row in out["kv_tier"]:
        print(
            f"  {row['prompt']:5d} in / {row['output']:3d} out over {row['kv_tier']:<20} {row['max_rate']:6.2f} req/s"
            f"  (binds: {row['binding']})"
        )
    print(f"({out['wall_s']} s)")


if __name__ == "__main__":
    main()
