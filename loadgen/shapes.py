"""Locust load shapes whose schedule is a pure function of run time (``users_at``), so tests and
the simulator can read the same schedule that Locust's ``tick()`` follows."""

from __future__ import annotations

import os

from locust import LoadTestShape


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


class StagesShape(LoadTestShape):
    def tick(self):
        users = stages_users(
            self.get_run_time(),
            int(os.environ.get("INFEMU_USERS", "4")),
            float(os.environ.get("INFEMU_DURATION", "30")),
        )
        return None if users is None else (users, users)


class BurstShape(LoadTestShape):
    def tick(self):
        users = burst_users(
            self.get_run_time(),
            int(os.environ.get("INFEMU_USERS", "4")),
            float(os.environ.get("INFEMU_DURATION", "30")),
        )
        return None if users is None else (users, users)


SHAPES = {"stages": StagesShape, "burst": BurstShape}
