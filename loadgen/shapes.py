"""Locust load shapes; their schedules are the pure functions in ``loadgen.schedules``."""

from __future__ import annotations

import os

from locust import LoadTestShape

from loadgen.schedules import burst_users, stages_users


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
