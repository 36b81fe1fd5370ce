"""Fit the engines' host-side and API-server constants to the calibration set, and score them
leave-one-group-out.

The constants (``PARAMETERS``: six per engine) enter the simulator through the engine
profile; predictions are the simulator's, never a formula. The fit is robust Gauss-Newton
in log space: around the current constants, the simulator's response of every row to each
constant is measured by finite differences (one simulation per constant and row), a
linearised robust least-squares problem (soft-L1 on log(predicted / measured), TTFT and TPOT
alike, constants kept non-negative) gives the next constants, and the rows are simulated
again. Cross-validation refits the same linearised problem without one group (model x GPU x
engine version) and simulates that group with its own refitted constants, so no row is
scored with constants fitted on its own group.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import least_squares

from emulator.calibration.express import Expressed
from emulator.calibration.predict import Prediction, predict
from emulator.capacity import profile_of
from emulator.costmodel.engines import EngineProfile

# (section, field in the profile's dataclass, unit factor to seconds, name in engines.yaml, step for derivatives)
PARAMETERS: tuple[tuple[str, str, float, str, float], ...] = (
    ("api", "latency_s", 1e-3, "latency_ms", 5.0),
    ("api", "per_prompt_token_s", 1e-6, "per_prompt_token_us", 5.0),
    ("api", "per_output_s", 1e-6, "per_output_us", 50.0),
    ("host", "step_fixed_s", 1e-6, "step_fixed_us", 300.0),
    ("host", "per_seq_s", 1e-6, "per_seq_us", 5.0),
    # the launch floor binds only once it exceeds a step's GPU time (a max): a derivative step of 25 us a
    # kernel (about 25 ms on a 60-layer MoE model) reaches the short prompt steps from zero
    ("host", "eager_launch_s", 1e-6, "eager_launch_us_per_kernel", 25.0),
    ("api", "pd_handoff_s", 1e-3, "pd_handoff_ms", 20.0),
)
# the parts of a held-out group's linearised step that cross-validation tries, largest first (``line_search``)
LINE_SEARCH_FRACTIONS = (1.0, 0.5, 0.25)
UPPER = np.array([500.0, 500.0, 2000.0, 50_000.0, 500.0, 500.0, 2000.0])  # physical bounds in the yaml units
PD_ONLY = frozenset({"pd_handoff_ms"})  # constants an aggregated row does not depend on (no derivative run)


def vector(profile: EngineProfile) -> np.ndarray:
    """The profile's fitted constants in engines.yaml units."""
    return np.array([getattr(getattr(profile, sec), f) / unit for sec, f, unit, _, _ in PARAMETERS])


def with_vector(profile: EngineProfile, theta: Sequence[float]) -> EngineProfile:
    host, api = profile.host, profile.api
    for (sec, f, unit, _, _), v in zip(PARAMETERS, theta, strict=True):
        if sec == "host":
            host = replace(host, **{f: float(v) * unit})
        else:
            api = replace(api, **{f: float(v) * unit})
    return replace(profile, host=host, api=api)


def profile_for(ex: Expressed) -> EngineProfile:
    return profile_of(ex.cluster.spec)


# ---- running many rows -------------------------------------------------------------------

_Job = tuple[Expressed, "np.ndarray | None"]
# a label to the (done, total) callback ``run_rows`` reports to: how a long refit shows it is moving
Progress = Callable[[str], Callable[[int, int], None]]


def _run(job: _Job) -> Prediction:
    ex, theta = job
    profile = profile_for(ex) if theta is None else with_vector(profile_for(ex), theta)
    try:
        return predict(ex, profile=profile)
    except Exception as exc:  # a row the simulator cannot run is reported, never fatal to the sweep
        return Prediction(ex.row.id, None, None, 0, 0, f"{type(exc).__name__}: {exc}", 0.0)


def run_rows(
    jobs: list[_Job], workers: int = 1, progress: Callable[[int, int], None] | None = None
) -> list[Prediction]:
    """Simulate every (row, constants) job; ``workers`` processes, results in job order."""
    if workers <= 1 or len(jobs) < 4:
        out = []
        for i, j in enumerate(jobs):
            out.append(_run(j))
            if progress:
                progress(i + 1, len(jobs))
        return out
    # slow rows (thousands of clients) first, so the pool does not end on one straggler
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].load.concurrency)
    results: list[Prediction | None] = [None] * len(jobs)
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        for n, (i, pred) in enumerate(pool.imap_unordered(_indexed, [(i, jobs[i]) for i in order], chunksize=2)):
            results[i] = pred
            if progress:
                progress(n + 1, len(jobs))
    return [r for r in results if r is not None]


def _indexed(item: tuple[int, _Job]) -> tuple[int, Prediction]:
    i, job = item
    return i, _run(job)


# ---- residuals and the linearised problem ------------------------------------------------------


def log_residuals(rows: Sequence[Expressed], preds: Sequence[Prediction]) -> np.ndarray:
    """(n, 2) array of log(predicted / measured) for TTFT and TPOT; NaN where a row failed."""
    out = np.full((len(rows), 2), np.nan)
    for i, (ex, p) in enumerate(zip(rows, preds, strict=True)):
        if p.ttft_ms and p.tpot_ms and p.ttft_ms > 0 and p.tpot_ms > 0:
            out[i] = (math.log(p.ttft_ms / ex.row.ttft_ms), math.log(p.tpot_ms / ex.row.tpot_ms))
    return out


@dataclass
class Linearisation:
    """Residuals at ``theta`` and their derivatives: r(theta') ~ r + J (theta' - theta)."""

    theta: np.ndarray
    residuals: np.ndarray  # (n, 2)
    jacobian: np.ndarray  # (n, 2, p)


def linearise(
    rows: Sequence[Expressed],
    theta: np.ndarray,
    workers: int = 1,
    base: Sequence[Prediction] | None = None,
    free: np.ndarray | None = None,
    progress: Progress | None = None,
) -> Linearisation:
    """The rows' log residuals at ``theta`` and their derivatives by each constant (finite differences;
    only the ``free`` ones, and a P/D-only constant only on P/D rows: the rest are zero)."""
    if base is None:
        base = run_rows([(ex, theta) for ex in rows], workers)
    r0 = log_residuals(rows, base)
    jac = np.zeros((len(rows), 2, len(PARAMETERS)))
    for j, (*_, name, step) in enumerate(PARAMETERS):
        if free is not None and not free[j]:
            continue
        shifted = theta.copy()
        shifted[j] += step
        which = [i for i, ex in enumerate(rows) if name not in PD_ONLY or ex.row.mode == "disagg"]
        if not which:
            continue
        report = progress(f"derivative by {name}") if progress else None
        preds = run_rows([(rows[i], shifted) for i in which], workers, report)
        rj = log_residuals([rows[i] for i in which], preds)
        jac[which, :, j] = (rj - r0[which]) / step
    return Linearisation(theta, r0, np.nan_to_num(jac))


def solve(lin: Linearisation, mask: np.ndarray, max_step: float = 2.0, free: np.ndarray | None = None) -> np.ndarray:
    """Constants minimising the robust linearised loss over the rows in ``mask`` (a step of at most
    ``max_step`` times the current value plus the derivative step, a trust region). ``free``: the
    constants that may move (default: those some row of the mask responds to; the rest keep their
    values)."""
    ok = mask & ~np.isnan(lin.residuals).any(axis=1)
    r0, jac, t0 = lin.residuals[ok], lin.jacobian[ok], lin.theta
    if free is None:
        free = np.abs(jac).sum(axis=(0, 1)) > 0
    idx = np.flatnonzero(free)
    if not ok.any() or not len(idx):
        return t0.copy()
    steps = np.array([s for *_, s in PARAMETERS])[idx]
    lo = np.maximum(0.0, t0[idx] - max_step * (t0[idx] + steps))
    hi = np.minimum(UPPER[idx], t0[idx] + max_step * (t0[idx] + steps))
    j = jac[:, :, idx]

    def f(x: np.ndarray) -> np.ndarray:
        return (r0 + j @ (x - t0[idx])).ravel()

    margin = 1e-3 * (hi - lo)  # least_squares' trust region stalls on a start lying exactly on a bound
    start = np.clip(t0[idx], lo + margin, hi - margin)
    # plain least squares first (far from the optimum the robust loss flattens every residual), then the
    # robust loss from there: soft-L1 at 5% keeps a group that measured something else from dragging the fit
    rough = least_squares(f, start, bounds=(lo, hi), loss="linear", x_scale=steps)
    res = least_squares(f, rough.x, bounds=(lo, hi), loss="soft_l1", f_scale=0.05, x_scale=steps)
    out = t0.copy()
    out[idx] = res.x
    return out


def median_errors(residuals: np.ndarray) -> tuple[float, float]:
    """Median |error| in percent for TTFT and TPOT (rows that ran)."""
    ok = ~np.isnan(residuals).any(axis=1)
    if not ok.any():
        return float("nan"), float("nan")
    e = np.abs(np.exp(residuals[ok]) - 1) * 100
    return float(np.median(e[:, 0])), float(np.median(e[:, 1]))


def robust_loss(residuals: np.ndarray, f_scale: float = 0.05) -> float:
    """The soft-L1 loss ``solve`` minimises, summed over the rows that ran: what a step must lower."""
    r = residuals[~np.isnan(residuals).any(axis=1)] / f_scale
    return float(np.sum(2.0 * (np.sqrt(1.0 + r * r) - 1.0)))


def fit(
    rows: Sequence[Expressed],
    theta0: np.ndarray,
    iterations: int = 3,
    workers: int = 1,
    log: Callable[[str], None] = print,
    relinearise: bool = False,
    free: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Robust fit with the simulator in the loop. Returns the constants and the rows' log residuals there.

    ``relinearise=False``: the chord method (the derivatives are measured once, at ``theta0``; every
    iteration re-simulates the rows at the new constants and solves again). ``True``: Gauss-Newton —
    the derivatives are measured again at every accepted point, and a step is kept only if it lowers
    the robust loss (else it is halved, twice at most). A queue's response to a constant changes
    with the constant (a longer API latency spreads the closed-loop clients), so derivatives taken
    far away mislead the chord method, and its trust region (twice the current value) stops it
    short of constants the data want."""
    theta = theta0.astype(float).copy()
    lin = linearise(rows, theta, workers, free=free)
    ttft, tpot = median_errors(lin.residuals)
    loss = robust_loss(lin.residuals)
    log(f"  start {np.round(theta, 3).tolist()}: median |error| TTFT {ttft:.1f}% TPOT {tpot:.1f}% loss {loss:.1f}")
    current = lin
    for it in range(iterations):
        candidate = solve(current, np.ones(len(rows), dtype=bool), free=free)
        tries = 3 if relinearise else 1
        for attempt in range(tries):
            base = run_rows([(ex, candidate) for ex in rows], workers)
            residuals = log_residuals(rows, base)
            new_loss = robust_loss(residuals)
            if not relinearise or new_loss < loss:
                break
            if attempt + 1 < tries:
                log(f"  iteration {it + 1}: loss {new_loss:.1f} >= {loss:.1f}, halving the step")
                candidate = (candidate + current.theta) / 2
        else:
            log(f"  iteration {it + 1}: no step lowers the loss; stopping at {np.round(current.theta, 3).tolist()}")
            break
        ttft, tpot = median_errors(residuals)
        log(
            f"  iteration {it + 1} {np.round(candidate, 3).tolist()}: median |error| TTFT {ttft:.1f}% "
            f"TPOT {tpot:.1f}% loss {new_loss:.1f}"
        )
        theta, loss = candidate, new_loss
        if relinearise and it + 1 < iterations:
            current = linearise(rows, theta, workers, base=base, free=free)
        else:
            current = Linearisation(candidate, residuals, lin.jacobian)
    return theta, current.residuals


# ---- leave-one-group-out ----------------------------------------------------------------------


def cross_validate(
    rows: Sequence[Expressed],
    base: Sequence[Prediction],
    theta: np.ndarray,
    workers: int = 1,
    log: Callable[[str], None] = print,
    rows_per_group: int = 8,
    fractions: Sequence[float] = LINE_SEARCH_FRACTIONS,
    progress: Progress | None = None,
) -> tuple[list[Prediction], dict[str, list[float]]]:
    """Predictions of every row with constants refitted without its group, and those constants.

    The refit is the shipped fit's procedure without the group: it minimises the linearised loss
    around ``theta`` (the shipped constants) over the other groups' rows, then checks that step with
    the simulator, as ``fit`` does: the step, or the first of its ``fractions`` that lowers the
    simulated robust loss of the other groups' rows, is kept, else no step. (Unchecked, with every
    group weighing alike, the step moved vLLM's streaming cost per token from 29 to 118 us, and those
    constants raised the robust loss of the vLLM target rows from 10,768 to 13,086.) The row is then
    simulated with its group's refitted constants. The derivatives and the check run on an even
    sample of about ``rows_per_group`` rows per group, each group in proportion to its rows as in
    the shipped fit's uniform subset (six extra simulations per row of a 2,000-row engine would take
    hours).
    """
    sample = _per_group_sample(rows, rows_per_group)
    picked = [rows[i] for i in sample]
    lin = linearise(picked, theta, workers, base=[base[i] for i in sample], progress=progress)
    groups = np.array([ex.row.group for ex in picked])
    names = sorted({ex.row.group for ex in rows})
    steps = {g: solve(lin, groups != g) - theta for g in names}
    thetas = line_search(picked, groups, lin, steps, fractions, workers, progress)
    kept = Counter(fraction for _, fraction in thetas.values())
    log(
        f"  refitted {len(thetas)} groups (step kept whole, in part or not at all by the simulated loss of the"
        " other groups: "
        + ", ".join(f"{f:g} x{kept[f]}" for f in sorted(kept, reverse=True))
        + "); constants span "
        + ", ".join(
            f"{name} {min(t[j] for t, _ in thetas.values()):.3g}-{max(t[j] for t, _ in thetas.values()):.3g}"
            for j, (*_, name, _) in enumerate(PARAMETERS)
        )
    )
    preds = run_rows(
        [(ex, thetas[ex.row.group][0]) for ex in rows], workers, progress("refitted constants") if progress else None
    )
    return preds, {g: t.tolist() for g, (t, _) in thetas.items()}


def line_search(
    rows: Sequence[Expressed],
    groups: np.ndarray,
    lin: Linearisation,
    steps: dict[str, np.ndarray],
    fractions: Sequence[float],
    workers: int = 1,
    progress: Progress | None = None,
) -> dict[str, tuple[np.ndarray, float]]:
    """Each held-out group's constants: ``lin.theta`` plus the largest of ``fractions`` of its step that
    lowers the simulated robust loss of the other groups' ``rows`` below their loss at ``lin.theta``
    (fraction 0, no step, where none does). Rows that failed at ``lin.theta`` take no part; a candidate
    under which one of the others fails is not lower. The folds' candidates of one fraction are
    simulated together."""
    ran = ~np.isnan(lin.residuals).any(axis=1)
    chosen = {g: (lin.theta.copy(), 0.0) for g in steps}
    pending = [g for g in steps if np.any(steps[g] != 0)]
    for fraction in fractions:
        if not pending:
            break
        trains = {g: np.flatnonzero((groups != g) & ran) for g in pending}
        candidates = {g: lin.theta + fraction * steps[g] for g in pending}
        jobs = [(rows[i], candidates[g]) for g in pending for i in trains[g]]
        report = progress(f"{fraction:g} of {len(pending)} folds' steps") if progress else None
        preds = iter(run_rows(jobs, workers, report))
        for g in pending:
            train = trains[g]
            residuals = log_residuals([rows[i] for i in train], [next(preds) for _ in train])
            if not np.isnan(residuals).any() and robust_loss(residuals) < robust_loss(lin.residuals[train]):
                chosen[g] = (candidates[g], fraction)
        pending = [g for g in pending if chosen[g][1] == 0.0]
    return chosen


def _per_group_sample(rows: Sequence[Expressed], limit: int) -> list[int]:
    """Indices of about ``limit`` rows per group on average, spread evenly over the rows ordered by
    group and id: each group contributes in proportion to its size, as it does to the shipped fit's
    uniform subset of rows (tools/fit_engines.py --limit), and at least one row."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i].row.group, rows[i].row.id))
    first: dict[str, int] = {}
    for i in order:
        first.setdefault(rows[i].row.group, i)
    total = min(len(order), limit * len(first))
    picked = {order[k * len(order) // total] for k in range(total)} if total else set()
    covered = {rows[i].row.group for i in picked}
    picked.update(i for g, i in first.items() if g not in covered)
    return sorted(picked)
