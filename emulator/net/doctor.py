"""``infemu doctor``: which shaping backends work on this host, how fast each shapes accurately,
and the defaults ``infemu up`` will therefore choose."""

from __future__ import annotations

import os

from emulator.net.plan import DEFAULT_WIRE_RATE
from emulator.net.probe import Transfer, measure

TOLERANCE = 0.05


def max_accurate_rate(backend: str, rates: list[float], seconds: float = 0.5) -> tuple[float, list[dict]]:
    """The highest wire rate (bytes/s) whose transfer lands within 5% of bytes / rate."""
    rows, best = [], 0.0
    for rate in rates:
        t = Transfer("scale-out", rate, int(rate * seconds))
        took = measure(backend, [t])[0]
        err = took / t.expected_s - 1
        rows.append({"rate_MBps": rate / 1e6, "expected_s": t.expected_s, "measured_s": took, "error_pct": 100 * err})
        if abs(err) <= TOLERANCE:
            best = rate
        else:
            break
    return best, rows


def diagnose(quick: bool = False) -> dict:
    from emulator.net import tc

    root = os.geteuid() == 0
    tc_ok, tc_why = tc.available()
    report: dict = {
        "root": root,
        "backends": {"inproc": {"works": True, "why": "needs no privileges"}, "tc": {"works": tc_ok, "why": tc_why}},
        "netem": tc.netem_available() if tc_ok else False,
        "ifb": tc.ifb_available() if root else False,
    }
    rates = [10e6, 40e6, 100e6] if quick else [10e6, 40e6, 100e6, 200e6, 400e6]
    for name in ("inproc", "tc"):
        if not report["backends"][name]["works"]:
            continue
        best, rows = max_accurate_rate(name, rates)
        report["backends"][name]["max_rate_MBps"] = best / 1e6
        report["backends"][name]["measurements"] = rows
    report["defaults"] = {
        "shaping": "tc" if tc_ok else "inproc",
        "wire_rate_MBps": DEFAULT_WIRE_RATE / 1e6,
        "latency": "added by the sender" + ("" if not report["netem"] else " (netem found, unused)"),
    }
    return report
