"""The tc init container: install this pod's static TOS-classified HTB/TBF tree, then exit.

python -m infemu_operator.tcinit --spec /etc/infemu/cluster.yaml --cluster NAME --instance POD_NAME
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from emulator.errors import SpecError
from emulator.spec import load_clusters
from infemu_operator.desired import tc_tree_for


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infemu_operator.tcinit")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--instance", required=True)
    ap.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = ap.parse_args(argv)
    try:
        cluster = next(c for c in load_clusters(args.spec) if c.name == args.cluster)
        commands = tc_tree_for(cluster, args.instance)
    except (SpecError, StopIteration, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for cmd in commands:
        if args.dry_run:
            print(" ".join(cmd))
            continue
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"error: {' '.join(cmd)}: {r.stderr.strip()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
