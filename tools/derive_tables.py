"""Regenerate the shipped compact cost tables from ../shared/data (maintainers only).

Usage: python tools/derive_tables.py --shared ../shared/data --out emulator/costmodel/data
"""

from __future__ import annotations

import argparse
import os
import time

from emulator.costmodel.derive import write_tables

SYSTEMS = {"a100_sxm": "a100-sxm-80g", "h100_sxm": "h100-sxm", "h200_sxm": "h200-sxm", "b200_sxm": "b200"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default="emulator/costmodel/data")
    args = ap.parse_args()
    for system, gpu in SYSTEMS.items():
        t0 = time.perf_counter()
        src = os.path.join(args.shared, "profiles", "aiconfigurator", system)
        dst = os.path.join(args.out, f"{gpu}.npz")
        store = write_tables(src, dst)
        print(f"{gpu}: {len(store)} arrays, {os.path.getsize(dst) / 1e6:.2f} MB in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
