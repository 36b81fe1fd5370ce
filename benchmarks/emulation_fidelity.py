"""Emulation against simulation at time dilation 1: the same spec, plan and seed through real
processes (router + workers + HTTP client) and through the simulator.

The client is `infemu run`'s (``emulator.client.ClusterLink``): it stamps each request's due time and
measures the way back of every first token under the run's load, and the workers take that out of
the modelled API server's time (before the first measurements, the launcher's idle probe round trip:
``emulator.cluster.local.calibrate_path``), so the emulated TTFT should equal the model's even without
dilation, on a quiet machine. Prints both runs' TTFT and TPOT, their relative difference, the
measured way back and the workers' own TTFT. ``--external`` sends the same requests as another
tool's client would (Locust, a gateway: no token, no stamps, no way back reported), so the workers
rely on the launcher's idle probe alone: the bias such a client sees.

    python benchmarks/emulation_fidelity.py                       # the quickstart at D=1
    python benchmarks/emulation_fidelity.py --external            # as Locust or a gateway sends them
    python benchmarks/emulation_fidelity.py --dilation 4 --rate 8 --requests 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emulator import event_loop
from emulator.catalog.models import get_model
from emulator.client import ClusterLink, run_plan
from emulator.cluster.local import LocalCluster
from emulator.overrides import WorkloadOverrides, apply_overrides
from emulator.results import summarize
from emulator.sim.simulator import simulate
from emulator.spec import load_clusters
from emulator.workload.plan import build_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker_ttft_ms(urls: list[str]) -> float:
    """Mean TTFT as the workers measure it (arrival at the worker to the first token's write)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for url in urls:
        text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
        for fam in text_string_to_metric_families(text):
            if fam.name == "vllm:time_to_first_token_seconds":
                for s in fam.samples:
                    total += s.value if s.name.endswith("_sum") else 0
                    count += s.value if s.name.endswith("_count") else 0
    return 1e3 * total / count if count else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=os.path.join(ROOT, "examples", "quickstart.yaml"))
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--dilation", type=float, default=1.0)
    ap.add_argument("--external", action="store_true", help="a client without the cluster token (Locust, a gateway)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with open(args.spec, encoding="utf-8") as fh:
        docs = list(yaml.safe_load_all(fh))
    docs[0]["spec"]["emulation"] = {"timeDilation": args.dilation}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = os.path.join(tmp, "spec.yaml")
        with open(spec_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump_all(docs, fh)
        cluster = apply_overrides(
            load_clusters(spec_path)[0], WorkloadOverrides(rate=args.rate, requests=args.requests)
        )
        plan = build_plan(cluster.spec.workload)
        sim = simulate(cluster, plan).summary
        lc = LocalCluster(spec_path, cluster.name, run_dir=os.path.join(tmp, "run"))
        state = lc.start()
        link = None if args.external else ClusterLink(state.token)
        try:
            records, _ = event_loop.run(  # as `infemu run` drives it
                run_plan(
                    state.router,
                    cluster.spec.model.name,
                    plan,
                    get_model(cluster.spec.model.name).vocab,
                    dilation=args.dilation,
                    link=link,
                )
            )
            worker_ttft = _worker_ttft_ms([p.url for p in state.processes if p.role != "router"])
        finally:
            lc.stop()
    emu = summarize(records, cluster.spec.slo.ttft_ms, cluster.spec.slo.tpot_ms)
    rows = {}
    for key in ("ttft_ms", "tpot_ms"):
        for stat in ("mean", "p90"):
            s, e = sim[key][stat], emu[key][stat]
            rows[f"{key}.{stat}"] = {"sim": s, "emulated": e, "diff_pct": 100 * (e / s - 1)}
    out = {
        "spec": os.path.relpath(args.spec, ROOT),
        "dilation": args.dilation,
        "rate": args.rate,
        "requests": args.requests,
        "failed": emu["failed"],
        "path_overhead_ms": state.path_overhead_s * 1e3,
        "client": "external" if args.external else "infemu run",
        "way_back_under_load_ms": None if link is None or link.estimate_s is None else link.estimate_s * 1e3,
        "worker_ttft_mean_ms": worker_ttft,
        "metrics": rows,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"{out['spec']} at D={args.dilation:g}, {args.rate:g} req/s, {args.requests} requests, {out['client']}'s client"
        f" ({emu['failed']} failed); the emulation's own HTTP round trip measured at {out['path_overhead_ms']:.2f} ms"
    )
    if link is not None and link.estimate_s is not None:
        print(
            f"  the way back from a worker's release of a first token to the client, measured under the run's load"
            f" (median of the last {len(link.samples)}): {link.estimate_s * 1e3:.2f} ms"
        )
    for name, r in rows.items():
        print(f"  {name:14} sim {r['sim']:8.2f}  emulated {r['emulated']:8.2f}  ({r['diff_pct']:+.1f}%)")
    print(
        f"  the workers' own TTFT mean (their vllm:time_to_first_token_seconds, arrival at the worker to the first"
        f" token's write): {worker_ttft:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
