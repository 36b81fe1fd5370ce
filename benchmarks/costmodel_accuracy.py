"""Per-operator error of the cost model against the profiled tables, for every GPU.

Each table's rows are split 80/20 at random; the table is rebuilt from 80% as the
shipped one is, and the held-out 20% are predicted through the cost model's own
lookup code. The roofline row shows what a GPU without tables would get.

    python benchmarks/costmodel_accuracy.py [--profiles DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from emulator.catalog.gpus import get_gpu
from emulator.costmodel.accuracy import (
    held_out_all_reduce,
    held_out_attention,
    held_out_gemm,
    held_out_moe,
    roofline_gemm_error,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "profiles", "aiconfigurator"))
SYSTEMS = {"a100_sxm": "a100-sxm-80g", "h100_sxm": "h100-sxm", "h200_sxm": "h200-sxm", "b200_sxm": "b200"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=DEFAULT)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not os.path.isdir(args.profiles):
        sys.exit(f"error: {args.profiles}: profile directory not found (pass --profiles)")
    results: dict[str, dict[str, dict]] = {}
    for system, gpu_name in SYSTEMS.items():
        d = os.path.join(args.profiles, system)
        ops = {
            "gemm_bf16": held_out_gemm(d, "bfloat16"),
            "gemm_fp8": held_out_gemm(d, "fp8"),
            "attention_prefill": held_out_attention(d, "attn_ctx"),
            "attention_decode": held_out_attention(d, "attn_gen"),
            "moe_experts": held_out_moe(d),
            "nccl_all_reduce": held_out_all_reduce(d),
            "gemm_bf16_roofline": roofline_gemm_error(d, get_gpu(gpu_name), "bfloat16"),
        }
        results[gpu_name] = {k: vars(v) for k, v in ops.items() if v is not None and v.rows > 0}
    if args.json:
        print(json.dumps(results))
        return
    print(f"{'gpu':14} {'operator':20} {'rows':>7} {'median err':>11} {'p90 err':>9}")
    for gpu, ops in results.items():
        for op, e in ops.items():
            print(f"{gpu:14} {op:20} {e['rows']:7d} {100 * e['median']:10.2f}% {100 * e['p90']:8.2f}%")


if __name__ == "__main__":
    main()
