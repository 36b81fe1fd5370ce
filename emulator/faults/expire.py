"""Ends a hand-injected fault when its durationSeconds have passed (``infemu fault inject
--duration-seconds``): a small detached process, so the fault ends on time whether or not anyone runs
``infemu`` again. ``python -m emulator.faults.expire RUN_DIR NAME SINCE WALL_SECONDS``."""

from __future__ import annotations

import sys
import time

from emulator.errors import InputError, SpecError
from emulator.faults.live import expire


def main(argv: list[str]) -> int:
    run_dir, name, since, wall_s = argv[0], argv[1], float(argv[2]), float(argv[3])
    time.sleep(max(0.0, since + wall_s - time.time()))
    try:
        lines = expire(run_dir, name, since)
    except (InputError, SpecError) as exc:  # the cluster was stopped meanwhile: nothing left to clear
        lines = [f"{name}: not cleared: {exc}"]
    for line in lines:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} expire {line}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
