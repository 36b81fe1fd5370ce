"""Fit each serving engine's host-side and API-server constants to the calibration set (maintainers).

Writes emulator/costmodel/data/engine_constants.json: per engine the constants of
emulator.calibration.fit.PARAMETERS, the groups (model x GPU x engine version) they were fitted
on, the in-sample median errors, and the data set's SHA-256. benchmarks/fidelity.py scores the
constants leave-one-group-out.

    python tools/fit_engines.py --data ../shared/data/measurements/silicon_calibration.csv
    # the P/D hand-off alone, on the P/D rows, the other constants kept as shipped:
    python tools/fit_engines.py --modes disagg --free pd_handoff_ms --start shipped
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emulator.calibration import fit as F
from emulator.calibration.express import (
    AUTO_ROUNDS_TOKENS,
    SIMULATION_BUDGET_TOKENS,
    TEMPLATES,
    Skip,
    auto_rounds,
    express,
    over_budget,
)
from emulator.calibration.rows import DEFAULT_PATH, dedupe, load_rows

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "emulator", "costmodel", "data")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_PATH)
    ap.add_argument("--engines", default="vllm,sglang,trtllm")
    ap.add_argument("--template", choices=sorted(TEMPLATES), default="sflow")
    ap.add_argument("--rounds", type=int, help="measured rounds per row (default: express.auto_rounds)")
    ap.add_argument(
        "--round-tokens",
        type=int,
        default=AUTO_ROUNDS_TOKENS,
        help="without --rounds: as many measured rounds per row as fit in this many simulated output tokens",
    )
    ap.add_argument(
        "--max-simulated-tokens",
        type=int,
        default=SIMULATION_BUDGET_TOKENS,
        help="leave out rows whose simulation generates more output tokens than this",
    )
    ap.add_argument("--modes", default="agg,disagg", help="comma-separated: the rows' modes to fit on")
    ap.add_argument(
        "--free",
        help="comma-separated constants to fit (engines.yaml names); the rest keep their start values "
        "and their provenance (default: every constant)",
    )
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--limit", type=int, default=400, help="rows per engine (seeded subset) to fit on")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--start",
        choices=("zero", "shipped"),
        default="zero",
        help="start from zero constants or from the shipped ones (engine_constants.json)",
    )
    ap.add_argument(
        "--gauss-newton",
        action="store_true",
        help="measure the derivatives again at every accepted point (default: once, at the start)",
    )
    ap.add_argument("--out", default=os.path.join(OUT, "engine_constants.json"))
    args = ap.parse_args()

    with open(args.data, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    rows = dedupe(load_rows(args.data))
    previous = {}
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as fh:
            previous = json.load(fh).get("engines", {})
    engines = dict(previous)
    names = [name for *_, name, _ in F.PARAMETERS]
    chosen = names if not args.free else args.free.split(",")
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        ap.error(f"--free: unknown constants {', '.join(unknown)}; known: {', '.join(names)}")
    free = np.array([name in chosen for name in names])
    modes = set(args.modes.split(","))
    for engine in args.engines.split(","):
        expressed = [
            ex
            for ex in (
                express(r, rounds=args.rounds or auto_rounds(r, args.round_tokens), template=args.template)
                for r in rows
                if r.backend == engine and r.mode in modes
            )
            if not isinstance(ex, Skip) and not over_budget(ex, args.max_simulated_tokens)
        ]
        if len(expressed) > args.limit:
            rng = np.random.default_rng(0)
            expressed = [expressed[i] for i in sorted(rng.choice(len(expressed), args.limit, replace=False))]
        print(f"{engine}: fitting on {len(expressed)} rows of {len({e.row.group for e in expressed})} groups")
        theta0 = F.vector(F.profile_for(expressed[0]))  # the shipped constants; a partial fit keeps the others
        if args.start == "zero":
            theta0[free] = 0.0
        theta, residuals = F.fit(
            expressed,
            theta0,
            iterations=args.iterations,
            workers=args.jobs,
            relinearise=args.gauss_newton,
            free=None if free.all() else free,
        )
        ttft, tpot = F.median_errors(residuals)
        sections: dict[str, dict[str, float]] = {"host": {}, "api": {}}
        for (section, _, _, name, _), v in zip(F.PARAMETERS, theta, strict=True):
            sections[section][name] = round(float(v), 3)
        record = {
            "fitted_on": sorted({e.row.group for e in expressed}),
            "rows": len(expressed),
            "in_sample_median_abs_error_pct": {"ttft": round(ttft, 2), "tpot": round(tpot, 2)},
            "method": (
                f"{'Gauss-Newton' if args.gauss_newton else 'chord'} from {args.start} constants, "
                f"{args.iterations} iterations, {', '.join(sorted(modes))} rows, rounds per row: "
                f"{args.rounds or f'as many as fit in {args.round_tokens:,} simulated output tokens'}, rows of at "
                f"most {args.max_simulated_tokens:,} simulated output tokens"
            ),
        }
        if free.all():
            engines[engine] = {**sections, **record}
        else:  # a partial fit: those constants change, each with its own provenance; the rest stay as they were
            kept = dict(engines.get(engine, {}))
            for (section, _, _, name, _), v, moved in zip(F.PARAMETERS, theta, free, strict=True):
                kept.setdefault(section, {})
                if moved or name not in kept[section]:
                    kept[section][name] = round(float(v), 3)
            kept.setdefault("partial_fits", {})[",".join(sorted(chosen))] = record
            engines[engine] = kept
        write(args, digest, engines)  # after every engine: a later one's failure keeps the earlier fits
    return 0


def write(args: argparse.Namespace, digest: str, engines: dict) -> None:
    out = {
        "generated_by": "tools/fit_engines.py",
        "date": datetime.date.today().isoformat(),
        "data": os.path.basename(args.data),
        "data_sha256": digest,
        "template": args.template,
        "rounds": args.rounds or "auto",
        "engines": engines,
    }
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
