"""How close infemu's TTFT and TPOT come to real vLLM, SGLang and TensorRT-LLM deployments.

For every row of the silicon calibration set that infemu can express (same checkpoint, GPU,
engine and version, parallel layout, aggregated or P/D worker counts), the simulator runs the
row's benchmark (closed loop at its concurrency, fixed ISL/OSL, warm-up then measured rounds)
and the mean TTFT and TPOT are compared with the measured ones. Rows that cannot be expressed
are counted with the reason.

Cross-validation: the engines' host-side and API constants were fitted on this data set
(tools/fit_engines.py), so each group (model x GPU x engine version) is scored with constants
refitted on every other group (leave-one-group-out; emulator/calibration/fit.py). The in-sample
figures (shipped constants) are printed beside them.

    python benchmarks/fidelity.py                       # everything, cross-validated (tens of minutes)
    python benchmarks/fidelity.py --engines vllm --modes agg --limit 200 --no-cv   # a quick look
    python benchmarks/fidelity.py --json fidelity.json  # the per-family table and every row as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emulator.calibration import fit as F
from emulator.calibration.express import SIMULATION_BUDGET_TOKENS, TEMPLATES, Skip, express, over_budget
from emulator.calibration.rows import DEFAULT_PATH, copies_expressed, dedupe, load_rows
from emulator.calibration.score import (
    TREND_MIN_ROWS,
    RowOutcome,
    format_per_group_correction,
    format_trend,
    headline,
    per_group_correction,
    score,
    trend,
)
from emulator.costmodel.engines import fitted_constants

TARGETS = {"ttft": 10.0, "tpot": 5.0}  # the cross-validated medians for the target families


def select(rows, args):
    engines = set(args.engines.split(",")) if args.engines else None
    modes = set(args.modes.split(",")) if args.modes else None
    systems = set(args.gpus.split(",")) if args.gpus else None
    out = [
        r
        for r in rows
        if (engines is None or r.backend in engines)
        and (modes is None or r.mode in modes)
        and (systems is None or r.system in systems)
    ]
    if args.limit and len(out) > args.limit:
        rng = np.random.default_rng(args.seed)
        keep = sorted(rng.choice(len(out), args.limit, replace=False))
        out = [out[i] for i in keep]
    return out


def progress(label: str):
    t0 = time.perf_counter()
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or done == total:
            last[0] = now
            print(f"  {label}: {done}/{total} rows, {now - t0:.0f} s", file=sys.stderr, flush=True)

    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_PATH, help="silicon_calibration.csv")
    ap.add_argument("--engines", help="comma-separated: vllm,sglang,trtllm")
    ap.add_argument("--modes", help="comma-separated: agg,disagg")
    ap.add_argument("--gpus", help="comma-separated systems: h100_sxm,h200_sxm,b200_sxm,b300_sxm,gb200,gb300")
    ap.add_argument("--limit", type=int, help="a seeded random subset of this many rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--rounds",
        type=int,
        help="measured rounds simulated per row (the benchmark ran 20); default: as many of the 20 as fit in"
        " 2M simulated output tokens, at least 3 (express.auto_rounds)",
    )
    ap.add_argument("--template", choices=sorted(TEMPLATES), default=fitted_constants().get("template", "sflow"))
    ap.add_argument(
        "--max-simulated-tokens",
        type=float,
        default=SIMULATION_BUDGET_TOKENS,
        help="skip (and count) rows whose simulation generates more output tokens than this; 0: no limit",
    )
    ap.add_argument("--no-cv", action="store_true", help="score the shipped constants only (in-sample)")
    ap.add_argument(
        "--cv-rows-per-group",
        type=int,
        default=8,
        help="rows per group on average (an even sample, each group by its rows) on which the refit's derivatives"
        " and the check of its step are simulated",
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the families, the headline and every row here")
    args = ap.parse_args()
    if not os.path.exists(args.data):
        print(f"error: {args.data}: no such file; pass --data PATH to silicon_calibration.csv", file=sys.stderr)
        return 2

    every_row = load_rows(args.data)
    rows = select(dedupe(every_row), args)
    t0 = time.perf_counter()
    outcomes: dict[str, RowOutcome] = {}
    expressed = []
    for r in rows:
        ex = express(r, rounds=args.rounds, template=args.template)
        if not isinstance(ex, Skip) and (budget := over_budget(ex, args.max_simulated_tokens)):
            outcomes[r.id] = RowOutcome(r, skip=budget.reason, expressible=True)
        elif isinstance(ex, Skip):
            outcomes[r.id] = RowOutcome(r, skip=ex.reason)
        else:
            outcomes[r.id] = RowOutcome(r)
            expressed.append(ex)
    print(f"{len(rows)} rows (deduplicated), {len(expressed)} expressed; template {args.template}", file=sys.stderr)

    base = F.run_rows([(ex, None) for ex in expressed], args.jobs, progress("shipped constants"))
    for ex, p in zip(expressed, base, strict=True):
        outcomes[ex.row.id].fitted = p
        outcomes[ex.row.id].cv = p
    constants = fitted_constants().get("engines", {})
    refits: dict[str, dict] = {}
    if not args.no_cv:
        for engine in sorted({ex.row.backend for ex in expressed}):
            if engine not in constants:
                continue
            idx = [i for i, ex in enumerate(expressed) if ex.row.backend == engine]
            rows_e = [expressed[i] for i in idx]
            theta = F.vector(F.profile_for(rows_e[0]))
            print(f"{engine}: leave-one-group-out over {len({ex.row.group for ex in rows_e})} groups", file=sys.stderr)
            preds, refits[engine] = F.cross_validate(
                rows_e,
                [base[i] for i in idx],
                theta,
                args.jobs,
                log=lambda m: print(m, file=sys.stderr),
                rows_per_group=args.cv_rows_per_group,
                progress=progress,
            )
            for ex, p in zip(rows_e, preds, strict=True):
                outcomes[ex.row.id].cv = p

    results = list(outcomes.values())
    families = score(results)
    head = headline(results)
    if not args.limit:  # the data set's rows of the families run, copies included (the count)
        every_row = select(every_row, args)
        head["csv_rows"] = len(every_row)
        head["csv_rows_expressed"] = copies_expressed(
            every_row, [o.row for o in results if o.skip is None or o.expressible]
        )
    wall = time.perf_counter() - t0
    label = "in-sample" if args.no_cv else "cross-validated"
    print(f"\nfidelity against {os.path.basename(args.data)} ({label}; |predicted/measured - 1| of mean TTFT and TPOT)")
    print(
        f"{'family':30} {'rows':>5} {'skip':>5} {'fail':>5}   {'TTFT med':>8} {'p90':>6} {'(fit)':>6}"
        f"   {'TPOT med':>8} {'p90':>6} {'(fit)':>6}"
    )
    for f in families:

        def pct(d: dict, k: str) -> str:
            return "-" if d.get(k) is None else f"{d[k]:.1f}"

        print(
            f"{f.family:30} {f.expressed:5d} {sum(f.skipped.values()):5d} {f.failed:5d}   "
            f"{pct(f.ttft, 'median'):>8} {pct(f.ttft, 'p90'):>6} {pct(f.ttft_fitted, 'median'):>6}   "
            f"{pct(f.tpot, 'median'):>8} {pct(f.tpot, 'p90'):>6} {pct(f.tpot_fitted, 'median'):>6}"
        )
    skips = Counter(o.skip for o in results if o.skip)
    if skips:
        print("\nskipped rows by reason:")
        for reason, n in skips.most_common():
            print(f"  {n:5d}  {reason}")

    def show(v):
        return "-" if v is None else f"{v:.1f}%"

    print(
        f"\ntarget (aggregated vLLM + SGLang on H100/H200/B200, {head['target_rows']} rows): median |error|"
        f" TTFT {show(head['target_ttft_median_pct'])} (target <= {TARGETS['ttft']:.0f}%),"
        f" TPOT {show(head['target_tpot_median_pct'])} (target <= {TARGETS['tpot']:.0f}%)"
    )
    print(
        f"disaggregated ({head['disagg_rows']} rows): TTFT {show(head['disagg_ttft_median_pct'])},"
        f" TPOT {show(head['disagg_tpot_median_pct'])}"
    )
    copies = (
        f"; {head['csv_rows_expressed']} of the data set's {head['csv_rows']} rows, copies counted (target >= 3000)"
        if "csv_rows" in head
        else ""
    )
    print(
        f"measurements expressed: {head['expressed']} of {head['rows']} (each counted once){copies};"
        f" {head['simulated']} simulated; {wall:.0f} s"
    )
    correction = per_group_correction(results)
    if correction["rows"]:
        print(f"in sample, {format_per_group_correction(correction)}")
    cells = trend(results)
    if cells:
        print(
            f"\nsigned error by concurrency ({label}, target rows, cells of >= {TREND_MIN_ROWS} rows):"
            " median (predicted/measured - 1) %, TTFT/TPOT"
        )
        print("\n".join(format_trend(cells)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "label": label,
                    "template": args.template,
                    "rounds": args.rounds or "auto",
                    "headline": head,
                    "families": [f.to_json() for f in families],
                    "refitted_constants": refits,
                    "trend": cells,
                    "per_group_correction": correction,
                    "rows": [
                        {
                            "id": o.row.id,
                            "family": o.row.family,
                            "group": o.row.group,
                            "skip": o.skip,
                            "measured": {"ttft_ms": o.row.ttft_ms, "tpot_ms": o.row.tpot_ms},
                            "predicted": None
                            if o.cv is None
                            else {"ttft_ms": o.cv.ttft_ms, "tpot_ms": o.cv.tpot_ms, "error": o.cv.error},
                            "predicted_in_sample": None
                            if o.fitted is None
                            else {"ttft_ms": o.fitted.ttft_ms, "tpot_ms": o.fitted.tpot_ms},
                        }
                        for o in results
                    ],
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
