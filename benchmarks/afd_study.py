"""When does each level of disaggregation pay off for an MoE model? (the AFD study, simulated)

Three designs of DeepSeek-V3.2 (FP8) on H200s — (a) aggregated wide-EP engines with chunked
prefill, (b) prefill/decode disaggregation, (c) P/D whose decode side is attention-FFN
disaggregated (``examples/moe-dsv32-*.yaml``) — each under three workloads, with a strict SLO:
every request's TTFT <= 1 s and TPOT <= 40 ms (25 tokens/s per user), met by >= 90% of requests.

For each design and workload the simulator finds the highest Poisson rate that still meets the
SLO (bisection on the rate), and prints output tokens/s and goodput per GPU there, which SLO
breaks first above it, and the decode step's dominant terms at that load (from the same cost
model ``infemu cost`` shows). A design that misses the SLO even at the lowest rate tried is
infeasible, with the metric that fails and why.

Workloads: lognormal lengths matched to public traces (mean and log-std of each file in
``../shared/data/traces``):
  chat            Azure LLM inference 2023, conversation: prompt mean 1155 (log-std 0.99), output 211 (0.86)
  coding          Azure LLM inference 2023, code: prompt mean 2048 (1.36), output 28 (0.85)
  agentic-coding  Mooncake conversation trace: prompt mean 12035 (1.20, cut at 64k), output 343 (1.36)

    python benchmarks/afd_study.py                      # all designs x workloads (minutes)
    python benchmarks/afd_study.py --workloads chat --requests 200
    python benchmarks/afd_study.py --specs my-a.yaml my-b.yaml --json afd.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emulator.build import build_instances  # noqa: E402
from emulator.costmodel.interface import BatchShape  # noqa: E402
from emulator.roles import get_role  # noqa: E402
from emulator.sim.simulator import simulate  # noqa: E402
from emulator.spec import load_clusters, parse_cluster  # noqa: E402
from emulator.workload.plan import plan_for  # noqa: E402

DESIGNS = {
    "aggregated": "examples/moe-dsv32-agg.yaml",
    "pd": "examples/moe-dsv32-pd.yaml",
    "pd-afd": "examples/moe-dsv32-pd-afd.yaml",
}
# (mean, log-std, cap) of prompt and output lengths, from the traces named in the docstring
WORKLOADS = {
    "chat": ((1155, 0.99, 14050), (211, 0.86, 1000)),
    "coding": ((2048, 1.36, 7437), (28, 0.85, 1899)),
    "agentic-coding": ((12035, 1.20, 65536), (343, 1.36, 2000)),
}
SLO = {"ttftMs": 1000, "tpotMs": 40, "attainmentTarget": 0.9}


def with_load(doc: dict, workload: str, rate: float, requests: int, seed: int) -> dict:
    (im, isg, imax), (om, osg, omax) = WORKLOADS[workload]
    doc = json.loads(json.dumps(doc))
    doc["spec"]["slo"] = dict(SLO)
    doc["spec"]["workload"] = {
        "arrival": {"type": "poisson"},
        "rate": rate,
        "requests": requests,
        "seed": seed,
        "inputLength": {"type": "lognormal", "mean": im, "sigma": isg, "max": imax},
        "outputLength": {"type": "lognormal", "mean": om, "sigma": osg, "max": omax},
    }
    return doc


def attainment(result) -> dict:
    """Fractions of all requests meeting each SLO (a failed request meets neither)."""
    n = len(result.records) or 1
    ttft = tpot = both = 0
    for r in result.records:
        if not r.ok or r.first_token_s is None or r.finish_s is None:
            continue
        a = (r.first_token_s - r.arrival_s) * 1e3 <= SLO["ttftMs"]
        gaps = r.output_tokens - 1
        b = gaps <= 0 or (r.finish_s - r.first_token_s) / gaps * 1e3 <= SLO["tpotMs"]
        ttft, tpot, both = ttft + a, tpot + b, both + (a and b)
    return {"ttft": ttft / n, "tpot": tpot / n, "both": both / n}


def run(doc: dict, workload: str, rate: float, requests: int, seed: int):
    cluster = parse_cluster(with_load(doc, workload, rate, requests, seed))
    result = simulate(cluster, plan_for(cluster))
    return cluster, result, attainment(result)


def gpus(cluster) -> int:
    return sum(p.replicas * p.gpus_per_instance for p in cluster.spec.pools)


def dominant_terms(cluster, result, workload: str) -> str:
    """The decoding pool's step at the load the simulation saw (Little: decoding sequences = output
    tokens/s x TPOT), its two largest terms."""
    _, setups = build_instances(cluster.spec)
    decoders = [s for s in setups if get_role(s.pool.role).kv_consumer] or setups
    setup = decoders[0]
    tpot_s = result.summary["tpot_ms"]["mean"] / 1e3
    batch = max(1, round(result.summary["output_tokens_per_s"] * tpot_s / len(decoders)))
    (im, _, _), (om, _, _) = WORKLOADS[workload]
    shape = BatchShape(num_decode=batch, decode_kv_sum=batch * int(im + om / 2))
    ops = setup.cost.breakdown(shape)
    step = sum(ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:2]
    terms = ", ".join(f"{k} {100 * v / step:.0f}%" for k, v in top)
    out = f"decode batch ~{batch}: {step * 1e3:.0f} ms steps ({terms}"
    if get_role(setup.pool.role).front:  # aggregated: new prompts' chunks share the decoders' steps
        chunk = min(int(im), setup.engine.max_num_batched_tokens // setup.pool.dp)
        mixed = setup.cost.step_time(
            BatchShape(((chunk, 0),), num_decode=batch, decode_kv_sum=shape.decode_kv_sum)
        ).total_s
        out += f"); a {chunk}-token prompt chunk stretches such a step to {mixed * 1e3:.0f} ms (prefill interference"
    return out + ")"


def prefill_terms(cluster, workload: str) -> str:
    """What a mean-length prompt's prefill costs on the first instance that takes requests (where TTFT
    is spent when the queue is short), and its two largest terms."""
    _, setups = build_instances(cluster.spec)
    front = next(s for s in setups if get_role(s.pool.role).front)
    (im, _, _), _ = WORKLOADS[workload]
    tokens = min(int(im), front.engine.max_num_batched_tokens // front.pool.dp)  # one rank takes the chunk
    ops = front.cost.breakdown(BatchShape(prefill_chunks=((tokens, 0),)))
    step = sum(ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:2]
    return f"a {int(im)}-token prefill on {front.instance.name}: {step * 1e3:.0f} ms per {tokens}-token step (" + (
        ", ".join(f"{k} {100 * v / step:.0f}%" for k, v in top) + ")"
    )


def explain(cluster, result, workload: str, failing: str) -> str:
    return prefill_terms(cluster, workload) if failing == "TTFT" else dominant_terms(cluster, result, workload)


def frontier(doc: dict, workload: str, requests: int, seed: int, lo: float, hi: float, steps: int) -> dict:
    """The highest rate meeting the SLO, by bisection in log space between lo and hi."""
    cluster, result, att = run(doc, workload, lo, requests, seed)
    if att["both"] < SLO["attainmentTarget"]:
        failing = "TTFT" if att["ttft"] < att["tpot"] else "TPOT"
        return {
            "feasible": False,
            "rate": lo,
            "attainment": att,
            "why": f"{failing} attainment {100 * min(att['ttft'], att['tpot']):.0f}% at {lo:g} req/s "
            f"(mean TTFT {result.summary['ttft_ms']['mean']:.0f} ms, TPOT {result.summary['tpot_ms']['mean']:.1f} ms); "
            + explain(cluster, result, workload, failing),
            "gpus": gpus(cluster),
        }
    best = (lo, cluster, result, att)
    hi_att = None
    for _ in range(steps):
        mid = float(np.sqrt(best[0] * hi))
        c, r, a = run(doc, workload, mid, requests, seed)
        if a["both"] >= SLO["attainmentTarget"]:
            best = (mid, c, r, a)
        else:
            hi, hi_att = mid, a
    rate, cluster, result, att = best
    breaks = "-" if hi_att is None else ("TTFT" if hi_att["ttft"] < hi_att["tpot"] else "TPOT")
    out_tps = result.summary["output_tokens_per_s"]
    return {
        "feasible": True,
        "rate": rate,
        "attainment": att,
        "output_tokens_per_s": out_tps,
        "goodput_tokens_per_s_per_gpu": out_tps * att["both"] / gpus(cluster),
        "ttft_ms": result.summary["ttft_ms"]["mean"],
        "tpot_ms": result.summary["tpot_ms"]["mean"],
        "breaks_first": breaks,
        "why": explain(cluster, result, workload, breaks),
        "gpus": gpus(cluster),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="*", help="spec files to compare instead of the three DeepSeek-V3.2 designs")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    ap.add_argument("--requests", type=int, default=300, help="requests per simulated point")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-rate", type=float, default=0.25, help="lowest rate tried (req/s)")
    ap.add_argument("--max-rate", type=float, default=64.0, help="bisection upper bound (req/s)")
    ap.add_argument("--steps", type=int, default=7, help="bisection steps per design and workload")
    ap.add_argument("--json", help="write every result here")
    args = ap.parse_args()

    designs = {os.path.basename(p): p for p in args.specs} if args.specs else DESIGNS
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"error: --workloads: unknown {', '.join(unknown)}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    docs = {}
    for name, path in designs.items():
        full = path if os.path.isabs(path) else os.path.join(ROOT, path)
        (cluster,) = load_clusters(full)[:1]
        docs[name] = cluster.model_dump(by_alias=True, exclude_none=True, exclude={"status"})

    print(
        f"SLO: TTFT <= {SLO['ttftMs']} ms and TPOT <= {SLO['tpotMs']} ms for >= {100 * SLO['attainmentTarget']:.0f}%"
        f" of requests; Poisson arrivals, {args.requests} requests per point, seed {args.seed}"
    )
    results = {}
    t0 = time.perf_counter()
    for workload in workloads:
        print(f"\n{workload}")
        cols = ("max req/s", "out tok/s", "tok/s/GPU")
        header = " ".join(f"{c:>9}" for c in cols)
        print(f"  {'design':12} {'GPUs':>4} {header} {'TTFT ms':>8} {'TPOT ms':>8}  why")
        rows = []
        for name, doc in docs.items():
            res = frontier(doc, workload, args.requests, args.seed, args.min_rate, args.max_rate, args.steps)
            results[f"{workload}/{name}"] = res
            rows.append((name, res))
        rows.sort(key=lambda nr: -(nr[1].get("goodput_tokens_per_s_per_gpu") or -1))
        for name, res in rows:
            if res["feasible"]:
                print(
                    f"  {name:12} {res['gpus']:4d} {res['rate']:9.2f} {res['output_tokens_per_s']:9.0f}"
                    f" {res['goodput_tokens_per_s_per_gpu']:9.1f} {res['ttft_ms']:8.0f} {res['tpot_ms']:8.1f}"
                    f"  {res['breaks_first']} breaks first above it; {res['why']}"
                )
            else:
                print(
                    f"  {name:12} {res['gpus']:4d} {'infeasible':>9} {'-':>9} {'-':>9} {'-':>8} {'-':>8}  {res['why']}"
                )
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"slo": SLO, "workloads": WORKLOADS, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
