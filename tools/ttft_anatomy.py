"""Where a calibration row's simulated TTFT comes from: the benchmark's rounds, and a lone prefill.

Three readings that docs/fidelity.md ("2026-11-28 (latest)") rests on:

``rounds``: simulate the target rows and keep each measured round's mean TTFT and TPOT. The benchmark's mean
weighs its first round (every client starts at once after the drained warm-up) by 1/20. If the
simulated later rounds were right, the measured mean fixes the first round's weight
w = (measured - later) / (first - later); the tool prints its quartiles by engine, ISL x OSL and
concurrency and by group, the median |error| the target rows would read had the benchmark run
K rounds instead of 20, and what would be left with each group's own correction (a factor or an
offset taken from the group's other rows): how much of the error is a deployment's own level.

``lone``: for given row ids, the measured TTFT beside the modelled GPU time of one prompt's prefill
step, the step as the engine model prices it (launch floor and host work included) and the
simulated TTFT.

``offsets``: at low concurrency (default c4), measured TTFT fitted as a fixed cost plus a multiple of
the modelled GPU prefill, across all groups and then with one fixed cost per group: how much of the
error is a deployment's own fixed cost, which leave-one-group-out scoring cannot learn.

    python tools/ttft_anatomy.py rounds --jobs 2            # ~70 s on 2 cores
    python tools/ttft_anatomy.py lone ..._1024x1024_c4_cfg633 ..._1024x1024_c4_cfg705
    python tools/ttft_anatomy.py offsets --concurrency 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emulator.build import build_instances
from emulator.calibration.express import BENCHMARK_ROUNDS, Expressed, Skip, express, over_budget
from emulator.calibration.predict import Prediction, _round_weighted
from emulator.calibration.rows import CalibrationRow, dedupe, load_rows
from emulator.calibration.score import (
    RowOutcome,
    format_per_group_correction,
    held_out_within_group,
    is_target,
    per_group_correction,
)
from emulator.costmodel.interface import BatchShape
from emulator.sim.simulator import simulate
from emulator.workload.plan import build_plan

# a first round less than this much above the later ones says nothing about its weight
MIN_FIRST_ROUND_EXCESS = 0.3
MIN_CELL_ROWS = 5


@dataclass(frozen=True)
class Rounds:
    row: CalibrationRow
    ttft: np.ndarray  # mean simulated TTFT (ms) of each measured round, in order
    tpot: np.ndarray  # the same of TPOT (requests with one output token left out)


def mean_over(rounds: np.ndarray, k: int) -> float:
    """The benchmark's mean (TTFT or TPOT) had it run ``k`` measured rounds: its first k - 1 rounds and its last
    as simulated; when fewer rounds were simulated, the middle ones stand for the missing middle."""
    n = len(rounds)
    if k <= 1:
        return float(rounds[0])
    if n >= k:
        return float((rounds[: k - 1].sum() + rounds[-1]) / k)
    return _round_weighted(rounds, 1, n, k)


def first_round_weight(rounds: np.ndarray, measured: float) -> float | None:
    """The weight w of the first round that makes w x first + (1 - w) x later equal the measured mean,
    None when the first round is too close to the later ones to tell."""
    first, later = float(rounds[0]), float(rounds[1:].mean())
    if first - later < MIN_FIRST_ROUND_EXCESS * later:
        return None
    return (measured - later) / (first - later)


def simulate_rounds(ex: Expressed) -> Rounds | None:
    plan = build_plan(ex.cluster.spec.workload)
    records = simulate(ex.cluster, plan).records
    c, k = ex.load.concurrency, ex.load.rounds
    if len(records) < c * k or any(not r.ok for r in records):
        return None
    ttft = np.array([r.ttft_ms for r in records[: c * k]]).reshape(k, c).mean(axis=1)
    tpot = np.array([np.nan if r.tpot_ms is None else r.tpot_ms for r in records[: c * k]]).reshape(k, c)
    return Rounds(ex.row, ttft, np.nanmean(tpot, axis=1))


def _target_rows(data: str | None) -> list[Expressed]:
    rows = [r for r in _rows(data) if is_target(r)]
    out = []
    for r in rows:
        ex = express(r)
        if not isinstance(ex, Skip) and over_budget(ex) is None:
            out.append(ex)
    return sorted(out, key=lambda e: -e.load.concurrency)  # slow rows first


def _quartiles(values: list[float]) -> str:
    v = np.array(values)
    return f"w {np.median(v):+.3f} [{np.percentile(v, 25):+.3f}, {np.percentile(v, 75):+.3f}] ({len(v)} rows)"


def report_rounds(results: list[Rounds], ks: list[int]) -> None:
    print("median |TTFT error| of the target rows had the benchmark run K measured rounds (in sample):")
    for k in ks:
        err = [abs(mean_over(r.ttft, k) / r.row.ttft_ms - 1) for r in results]
        print(f"  K={k:<3d} {100 * np.median(err):5.1f}%")
    outcomes = [
        RowOutcome(
            r.row,
            fitted=Prediction(
                r.row.id, mean_over(r.ttft, BENCHMARK_ROUNDS), mean_over(r.tpot, BENCHMARK_ROUNDS), 0, 0, None, 0.0
            ),
        )
        for r in results
    ]
    print("\n" + format_per_group_correction(per_group_correction(outcomes)))
    by_cell: dict[tuple, list[float]] = defaultdict(list)
    by_group: dict[str, list[float]] = defaultdict(list)
    for r in results:
        w = first_round_weight(r.ttft, r.row.ttft_ms)
        if w is None:
            continue
        by_cell[(r.row.backend, f"{r.row.isl}x{r.row.osl}", r.row.concurrency)].append(w)
        if (r.row.concurrency or 0) >= 32:
            by_group[r.row.group].append(w)
    print(
        f"\nimplied first-round weight (the benchmark's: {1 / BENCHMARK_ROUNDS:.3f}), cells of {MIN_CELL_ROWS}+ rows:"
    )
    for (engine, lengths, c), ws in sorted(by_cell.items()):
        if len(ws) >= MIN_CELL_ROWS:
            print(f"  {engine:7s} {lengths:10s} c{c:<5d} {_quartiles(ws)}")
    print(f"\nby group (concurrency 32 and up, groups of {MIN_CELL_ROWS}+ rows):")
    for group, ws in sorted(by_group.items()):
        if len(ws) >= MIN_CELL_ROWS:
            print(f"  {group:60s} {_quartiles(ws)}")


def lone_prefill(ex: Expressed) -> tuple[float, float, float]:
    """(GPU seconds, step seconds, launch floor seconds) of one prompt's prefill step beside the
    row's other clients' decodes, as the engine model prices it."""
    row = ex.row
    cost = build_instances(ex.cluster.spec)[1][0].cost
    others = max(0, (row.concurrency or 1) - 1)
    shape = BatchShape(prefill_chunks=((row.isl, 0),), num_decode=others, decode_kv_sum=others * row.isl)
    gpu = sum(v for k, v in cost.breakdown(shape).items() if not k.startswith("host"))
    return gpu, cost.step_time(shape).total_s, cost.eager_floor_s


def _rows(data: str | None) -> list[CalibrationRow]:
    return dedupe(load_rows(data) if data else load_rows())


def report_lone(ids: list[str], data: str | None) -> None:
    rows = {r.id: r for r in _rows(data)}
    for rid in ids:
        matches = [rows[rid]] if rid in rows else [r for r in rows.values() if r.id.endswith(rid)]
        if len(matches) != 1:
            names = ", ".join(r.id for r in matches[:3]) + (", ..." if len(matches) > 3 else "")
            print(
                f"{rid}: "
                + (f"{len(matches)} rows end with it ({names}); give more of the id" if matches else "no such row")
            )
            continue
        row = matches[0]
        ex = express(row)
        if isinstance(ex, Skip):
            print(f"{row.id}: not expressed ({ex.reason})")
            continue
        gpu, step, floor = lone_prefill(ex)
        sim = simulate_rounds(ex)
        simulated = f"{mean_over(sim.ttft, BENCHMARK_ROUNDS):7.1f}" if sim else "   n/a"
        print(
            f"{row.id}: measured TTFT {row.ttft_ms:7.1f} ms | lone prefill GPU {gpu * 1e3:6.1f} ms,"
            f" step {step * 1e3:6.1f} ms (launch floor {floor * 1e3:.1f}) | simulated TTFT {simulated} ms"
        )


def report_offsets(concurrency: int, data: str | None) -> None:
    """At low concurrency a request rarely waits for another, so its TTFT is a fixed path cost plus its
    own prefill: fit measured TTFT = a + b x modelled GPU prefill over the target rows of each engine and
    prompt length, then again with one offset a per group (b kept), and print both residuals."""
    cells: dict[tuple[str, int], list[tuple[str, float, float]]] = defaultdict(list)
    for row in _rows(data):
        if not is_target(row) or row.concurrency != concurrency:
            continue
        ex = express(row)
        if isinstance(ex, Skip):
            continue
        cells[(row.backend, row.isl)].append((row.group, lone_prefill(ex)[0] * 1e3, row.ttft_ms))
    if not any(len(pts) >= MIN_CELL_ROWS for pts in cells.values()):
        print(f"no engine and prompt length has {MIN_CELL_ROWS} or more target rows at concurrency {concurrency}")
    for (engine, isl), pts in sorted(cells.items()):
        if len(pts) < MIN_CELL_ROWS:
            continue
        gpu = np.array([p[1] for p in pts])
        ttft = np.array([p[2] for p in pts])
        (a, b), *_ = np.linalg.lstsq(np.vstack([np.ones_like(gpu), gpu]).T, ttft, rcond=None)
        by_group: dict[str, list[tuple[float, float]]] = defaultdict(list)  # (b x GPU prefill, measured) per group
        for group, g, t in pts:
            by_group[group].append((b * g, t))
        offsets = {group: float(np.median([t - p for p, t in v])) for group, v in by_group.items()}
        # each row scored with its group's offset taken from the group's other rows (one-row groups left out)
        held_out = held_out_within_group(by_group, additive=True)
        scored = sum(len(v) for v in by_group.values() if len(v) > 1)
        print(
            f"{engine} ISL {isl}, c{concurrency}, {len(pts)} rows: TTFT = {a:.1f} ms + {b:.2f} x GPU prefill;"
            f" median |residual| {100 * np.median(abs(ttft - (a + b * gpu)) / ttft):.1f}%; with one offset per group"
            f" ({len(offsets)} groups), each row's offset from its group's other rows:"
            + (f" {held_out:.1f}% ({scored} rows)" if held_out is not None else " no group has two rows")
        )
        for group, off in sorted(offsets.items(), key=lambda kv: kv[1]):
            print(f"    {group:62s} offset {off:6.1f} ms ({len(by_group[group])} rows)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="silicon_calibration.csv (default: the shared data set)")
    sub = ap.add_subparsers(dest="command", required=True)
    rounds = sub.add_parser("rounds", help="per-round TTFT of the target rows and the implied first-round weight")
    rounds.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    rounds.add_argument("--k", default="20,15,10,8,5", help="comma-separated round counts to score")
    lone = sub.add_parser("lone", help="measured TTFT beside one prompt's modelled prefill step")
    lone.add_argument("ids", nargs="+", help="row ids (or their unique endings)")
    offsets = sub.add_parser("offsets", help="low-concurrency TTFT as a fixed cost plus the modelled prefill")
    offsets.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    if args.data and not os.path.exists(args.data):
        print(f"error: --data {args.data}: no such file", file=sys.stderr)
        return 2
    if args.command == "lone":
        report_lone(args.ids, args.data)
        return 0
    if args.command == "offsets":
        report_offsets(args.concurrency, args.data)
        return 0
    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        print(f"error: --k {args.k!r}: give comma-separated round counts of 1 or more, e.g. 20,10,5", file=sys.stderr)
        return 2
    exs = _target_rows(args.data)
    print(f"{len(exs)} target rows expressed", file=sys.stderr)
    with mp.get_context("fork").Pool(max(1, args.jobs)) as pool:
        results = [r for r in pool.imap_unordered(simulate_rounds, exs, chunksize=2) if r is not None]
    report_rounds(results, ks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
