"""Run Locust headless against a router and read back every request it made.

Locust runs in its own process (gevent must not share an asyncio process); ``processes > 1``
uses Locust's ``--processes``: one master and that many forked workers in one pod or shell.
Each Locust process appends its requests to its own JSONL file (``loadgen.users``); they are
merged here into the simulator's ``RequestRecord`` so every driver reports the same way.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from emulator.results import RequestRecord


@dataclass(frozen=True)
class LocustLoad:
    """A Locust load: one of loadgen's user classes, closed loop, for a duration."""

    workload: str
    users: int
    duration_s: float
    shape: str | None = None  # stages | burst: a LoadTestShape drives the user count instead
    processes: int = 1  # Locust worker processes (>1: master + N forked workers)


def locust_command(load: LocustLoad, router: str, folder: str) -> list[str]:
    import loadgen

    locustfile = os.path.join(os.path.dirname(loadgen.__file__), "locustfile.py")
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        locustfile,
        "--headless",
        "-u",
        str(load.users),
        "-r",
        str(load.users),
        "-t",
        f"{max(1, int(load.duration_s))}s",
        "--host",
        router,
        "--csv",
        os.path.join(folder, "locust"),
        "--only-summary",
        "--stop-timeout",
        "60",
    ]
    if load.processes > 1:
        cmd += ["--processes", str(load.processes)]
    return cmd


def run_locust(
    load: LocustLoad, router: str, model: str, folder: str, seed: int, with_origin: bool = False
) -> list[RequestRecord] | tuple[list[RequestRecord], float]:
    """Every request Locust made, times in seconds from the first request, sorted by arrival; with
    ``with_origin``, also that first request's time on the monotonic clock (time.perf_counter)."""
    os.makedirs(folder, exist_ok=True)
    sink = os.path.join(folder, "locust-requests.jsonl")
    for old in glob.glob(sink + ".*"):
        os.remove(old)
    env = {
        **os.environ,
        "INFEMU_MODEL": model,
        "INFEMU_WORKLOAD": load.workload,
        "INFEMU_SEED": str(seed),
        "INFEMU_REQUESTS_JSONL": sink,
        "INFEMU_USERS": str(load.users),
        "INFEMU_DURATION": str(load.duration_s),
    }
    if load.shape:
        env["INFEMU_SHAPE"] = load.shape
    with open(os.path.join(folder, "locust.log"), "ab") as log:
        code = subprocess.run(
            locust_command(load, router, folder), env=env, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    records = []
    for path in sorted(glob.glob(sink + ".*")):  # one per Locust process, merged here (requests.jsonl)
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
        os.remove(path)
        for line in lines:
            r = json.loads(line)
            records.append(
                RequestRecord(
                    r["request_id"],
                    r["arrival_s"],
                    r["prompt_tokens"],
                    r["output_tokens"],
                    r["first_token_s"],
                    r["finish_s"],
                    r["ok"],
                    r["error"],
                    itl_max_ms=r["itl_max_ms"],
                    error_code=r.get("error_code"),
                )
            )
    if not records:
        raise RuntimeError(f"locust exited with code {code} and recorded no request; see {folder}/locust.log")
    t0 = min(r.arrival_s for r in records)
    for r in records:  # seconds from the first request, like every other driver
        r.arrival_s -= t0
        r.first_token_s = None if r.first_token_s is None else r.first_token_s - t0
        r.finish_s = None if r.finish_s is None else r.finish_s - t0
    records.sort(key=lambda r: r.arrival_s)
    return (records, t0) if with_origin else records
