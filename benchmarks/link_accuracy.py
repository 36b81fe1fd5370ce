"""Accuracy of each shaping backend against the link model, and the fastest link it emulates.

1) Three tiers at once (NVLink 4 450 GB/s, IB NDR 50 GB/s, 100 GbE 12.5 GB/s per GPU), logical
   messages of 1, 10 and 100 MB: each transfer's time against latency + bytes / bandwidth. Time
   dilation D is chosen per size so the NVLink transfer lasts ~0.1 s of wall time, and byte
   scaling S keeps the wire at <= 40 MB/s (both as the emulator itself does).
2) In real time (D = 1), 100 MB logical messages: the highest logical bandwidth whose transfer
   stays within 5% of the model.

    python benchmarks/link_accuracy.py [--json]      (tc needs root; it is skipped otherwise)
"""

from __future__ import annotations

import argparse
import json
import os

from emulator.catalog.links import get_tier
from emulator.net.probe import Transfer, measure

TIERS = [("scale-up", get_tier("nvlink4")), ("scale-out", get_tier("ib-ndr-400")), ("pcie", get_tier("ethernet-100"))]
SIZES = [1e6, 1e7, 1e8]
WIRE = 40e6


def three_tiers(backend: str, size: float) -> list[dict]:
    fastest = TIERS[0][1]
    dilation = 0.1 / (fastest.latency_s + size / fastest.bandwidth)
    transfers, model = [], []
    for kind, tier in TIERS:
        scale = max(1.0, tier.bandwidth / dilation / WIRE)
        transfers.append(
            Transfer(kind, tier.bandwidth / dilation / scale, int(size / scale), tier.latency_s * dilation)
        )
        model.append((tier.latency_s + size / tier.bandwidth) * dilation)
    took = measure(backend, transfers)
    return [
        {
            "tier": t.name,
            "size_MB": size / 1e6,
            "dilation": dilation,
            "model_s": m,
            "measured_s": g,
            "error_pct": 100 * (g / m - 1),
        }
        for (_, t), m, g in zip(TIERS, model, took, strict=True)
    ]


def max_realtime_rate(backend: str, size: float = 1e8) -> float:
    best = 0.0
    for gbps in (0.3125, 0.625, 1.25, 2.5, 5, 12.5, 25, 50, 100, 200, 450, 900):  # logical GB/s
        bw = gbps * 1e9
        scale = max(1.0, bw / WIRE)
        took = measure(backend, [Transfer("scale-out", bw / scale, int(size / scale))])[0]
        if abs(took / (size / bw) - 1) > 0.05:
            break
        best = bw
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    backends = ["inproc"]
    if os.geteuid() == 0:
        from emulator.net.tc import available

        if available()[0]:
            backends.append("tc")
    out = {"backends": {}}
    for b in backends:
        rows = [r for size in SIZES for r in three_tiers(b, size)]
        rate = max_realtime_rate(b)
        out["backends"][b] = {"max_error_pct": max(abs(r["error_pct"]) for r in rows), "max_rate_gbps": rate * 8 / 1e9}
        if not args.json:
            for r in rows:
                print(
                    f"{b:6s} {r['tier']:12s} {r['size_MB']:5.0f} MB  D={r['dilation']:8.0f}  model {r['model_s']:.3f} s"
                    f"  measured {r['measured_s']:.3f} s  error {r['error_pct']:+.1f}%"
                )
            print(
                f"{b:6s} max error {out['backends'][b]['max_error_pct']:.1f}%; in real time, 100 MB messages stay"
                f" within 5% up to {rate / 1e9:g} GB/s logical ({rate * 8 / 1e9:g} Gbit/s)"
            )
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
