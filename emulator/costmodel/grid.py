"""Profiled timing tables as grids interpolated in log-log space.

Kernel latency is close to a power law of each size argument between tile
boundaries, so interpolating log(latency) linearly in log(size) is far more
accurate than linear interpolation, and extrapolating the same way keeps
asymptotic scaling (quadratic attention, linear GEMM in m) beyond the table.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

import numpy as np
from scipy.interpolate import RegularGridInterpolator


def _fill_line_loglog(x_log: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fill NaNs of one 1-D line by log-log interpolation, linear extrapolation at the ends."""
    known = ~np.isnan(y)
    if known.all() or known.sum() == 0:
        return y
    out = y.copy()
    xk, yk = x_log[known], np.log(y[known])
    missing = ~known
    if known.sum() == 1:
        out[missing] = np.exp(yk[0])
        return out
    filled = np.interp(x_log[missing], xk, yk)
    lo, hi = x_log[missing] < xk[0], x_log[missing] > xk[-1]
    slope_lo = (yk[1] - yk[0]) / (xk[1] - xk[0])
    slope_hi = (yk[-1] - yk[-2]) / (xk[-1] - xk[-2])
    filled[lo] = yk[0] + slope_lo * (x_log[missing][lo] - xk[0])
    filled[hi] = yk[-1] + slope_hi * (x_log[missing][hi] - xk[-1])
    # a steep end segment must not extrapolate to absurd values over a long empty stretch
    out[missing] = np.exp(np.clip(filled, yk.min() - 10.0, yk.max() + 10.0))
    return out


def fill_holes(values: np.ndarray, axes: Sequence[np.ndarray], along: Sequence[int]) -> np.ndarray:
    """Fill missing grid points along the given axes, in order, by 1-D log-log interpolation.

    Lines that are entirely missing stay missing: those are shapes that were never
    profiled (e.g. more KV heads than query heads) and must not be invented.
    """
    out = values.astype(np.float64, copy=True)
    for axis in along:
        x_log = np.log(np.asarray(axes[axis], dtype=np.float64))
        out = np.apply_along_axis(lambda line, x=x_log: _fill_line_loglog(x, line), axis, out)
    return out


def grid_from_rows(
    rows: np.ndarray, axis_values: Sequence[np.ndarray] | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Turn rows of (coord_0, ..., coord_{n-1}, latency) into axes and a grid with NaN holes.

    Duplicate coordinates keep the fastest measurement (the kernel the framework would pick).
    """
    ncoord = rows.shape[1] - 1
    axes = (
        [np.unique(rows[:, i]) for i in range(ncoord)]
        if axis_values is None
        else [np.asarray(a, dtype=np.float64) for a in axis_values]
    )
    grid = np.full([len(a) for a in axes], np.nan)
    idx = tuple(np.searchsorted(axes[i], rows[:, i]) for i in range(ncoord))
    order = np.argsort(-rows[:, -1])  # write slowest first so the fastest wins
    grid[tuple(i[order] for i in idx)] = rows[order, -1]
    return axes, grid


class LogGrid:
    """A complete N-D grid of positive values, interpolated multilinearly in log-log space."""

    def __init__(self, axes: Sequence[np.ndarray], values: np.ndarray) -> None:
        if np.isnan(values).any():
            raise ValueError("LogGrid needs a complete grid; fill holes first")
        self.axes = [np.asarray(a, dtype=np.float64) for a in axes]
        self.values = np.asarray(values, dtype=np.float64)
        # Singleton axes cannot be interpolated along: drop them and ignore the coordinate.
        self._keep = [i for i, a in enumerate(self.axes) if len(a) > 1]
        squeezed = self.values.reshape([len(self.axes[i]) for i in self._keep])
        self._interp = RegularGridInterpolator(
            [np.log(self.axes[i]) for i in self._keep],
            np.log(squeezed),
            method="linear",
            bounds_error=False,
            fill_value=None,
        )

    def __call__(self, *coords: np.ndarray | float) -> np.ndarray:
        arrays = np.broadcast_arrays(*[np.asarray(c, dtype=np.float64) for c in coords])
        shape = arrays[0].shape
        pts = np.stack([np.log(np.maximum(arrays[i].ravel(), 1e-12)) for i in self._keep], axis=-1)
        return np.exp(self._interp(pts)).reshape(shape)


class LogLine:
    """A fast 1-D log-log interpolator (np.interp) with linear extrapolation at both ends.

    Per-instance cost functions are precomputed onto these so the simulator's hot
    loop never pays for an N-D interpolation.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        order = np.argsort(x)
        self.lx = np.log(x[order])
        self.ly = np.log(np.maximum(y[order], 1e-15))
        if len(self.lx) >= 2:
            self.slope_lo = (self.ly[1] - self.ly[0]) / (self.lx[1] - self.lx[0])
            self.slope_hi = (self.ly[-1] - self.ly[-2]) / (self.lx[-1] - self.lx[-2])
        else:
            self.slope_lo = self.slope_hi = 0.0
        self._lx = self.lx.tolist()
        self._ly = self.ly.tolist()

    def scalar(self, x: float) -> float:
        """The same interpolation for one number, without numpy's per-call overhead."""
        lx = math.log(max(x, 1e-12))
        xs, ys = self._lx, self._ly
        if lx <= xs[0]:
            return math.exp(ys[0] + self.slope_lo * (lx - xs[0]))
        if lx >= xs[-1]:
            return math.exp(ys[-1] + self.slope_hi * (lx - xs[-1]))
        i = bisect_right(xs, lx)
        x0, x1 = xs[i - 1], xs[i]
        w = (lx - x0) / (x1 - x0)
        return math.exp(ys[i - 1] + w * (ys[i] - ys[i - 1]))

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        a = np.asarray(x, dtype=np.float64)
        if a.size == 1:  # one step (the simulator's commonest call): the scalar path, as an array
            return np.full(a.shape, self.scalar(float(a.reshape(-1)[0])))
        lx = np.log(np.maximum(a, 1e-12))
        ly = np.interp(lx, self.lx, self.ly)
        # extrapolate only where some point lies outside (a stretch's KV lengths rarely do)
        if lx.min() < self._lx[0]:
            ly = np.where(lx < self.lx[0], self.ly[0] + self.slope_lo * (lx - self.lx[0]), ly)
        if lx.max() > self._lx[-1]:
            ly = np.where(lx > self.lx[-1], self.ly[-1] + self.slope_hi * (lx - self.lx[-1]), ly)
        return np.exp(ly)
