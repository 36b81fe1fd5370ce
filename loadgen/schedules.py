"""Load schedules as pure functions of run time: what Locust's shapes follow, importable without
Locust (importing Locust monkey-patches the process with gevent)."""

from __future__ import annotations


def stages_users(t: float, peak: int, duration: float) -> int | None:
    """Ramp: 25%, 50%, 100% of the peak over the first three quarters, then back to 25%."""
    if t >= duration:
        return None
    quarter = duration / 4
    fraction = (0.25, 0.5, 1.0, 0.25)[min(int(t // quarter), 3)]
    return max(1, round(peak * fraction))


def burst_users(
    t: float, base: int, duration: float, period: float = 10.0, burst_s: float = 3.0, factor: int = 4
) -> int | None:
    """A steady base with a burst of ``factor`` x base users for ``burst_s`` every ``period`` seconds."""
    if t >= duration:
        return None
    return base * factor if (t % period) >= period - burst_s else base
