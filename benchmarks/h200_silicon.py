"""The cost model's H200 kernels against kernels measured on a real H200 (Llama-3.1-8B shapes).

Ground truth: ../shared/data/measurements/h200_llama31_8b_graph_steps.json (CUDA-graph
replays, medians; see the README beside it). Prints, per GEMM of one layer, the ratio of
aiconfigurator's profiled table to the measurement by token count, then the whole 32-layer
prefill and decode steps of the cost model's kernels (no host-side work) against the measured
steps, which run plain PyTorch (unfused norms and activations, SDPA instead of paged
attention) and so bound vLLM's kernels from above.

The measured GEMMs ship as emulator/costmodel/data/silicon/h200-sxm.json, which the cost model
prefers over the table for these shapes; this benchmark shows why.

    python benchmarks/h200_silicon.py [--measurements PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emulator.catalog.gpus import get_gpu
from emulator.catalog.models import get_model
from emulator.costmodel.instance import InstanceConfig, InstanceCostModel
from emulator.costmodel.interface import BatchShape
from emulator.costmodel.tables import load_tables

DEFAULT = os.path.join("..", "shared", "data", "measurements", "h200_llama31_8b_graph_steps.json")
SHAPES = {"qkv_proj": (6144, 4096), "attn_out": (4096, 4096), "mlp_gate_up": (28672, 4096), "mlp_down": (4096, 14336)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measurements", default=DEFAULT)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(args.measurements):
        print(f"error: {args.measurements}: no such file; pass --measurements PATH", file=sys.stderr)
        return 2
    with open(args.measurements, encoding="utf-8") as fh:
        data = json.load(fh)
    table = load_tables("h200-sxm").gemm("bf16")
    gemm_rows = []
    for g in data["gemm"]:
        if g["op"] not in SHAPES:
            continue
        n, k = SHAPES[g["op"]]
        t = float(table(g["m"], n, k)) * 1e3
        gemm_rows.append(
            {"op": g["op"], "m": g["m"], "measured_ms": g["ms"], "table_ms": t, "table_over_measured": t / g["ms"]}
        )

    model, gpu = get_model("llama-3.1-8b"), get_gpu("h200-sxm")
    kernels = {
        "tables": InstanceCostModel(InstanceConfig(model, gpu, dtype="bf16")),
    }
    step_rows = []
    for p in data["prefill"]:
        shape = BatchShape(prefill_chunks=((p["tokens"], 0),), num_logits=1)
        pred = {k: cm.step_time(shape).total_s * 1e3 for k, cm in kernels.items()}
        step_rows.append(
            {"step": f"prefill {p['tokens']}", "measured_ms": p["ms"], **{f"{k}_ms": v for k, v in pred.items()}}
        )
    for d in data["decode"]:
        shape = BatchShape(num_decode=d["batch"], decode_kv_sum=d["batch"] * d["context"])
        pred = {k: cm.step_time(shape).total_s * 1e3 for k, cm in kernels.items()}
        step_rows.append(
            {
                "step": f"decode b={d['batch']} ctx={d['context']}",
                "measured_ms": d["ms"],
                **{f"{k}_ms": v for k, v in pred.items()},
            }
        )
    if args.json:
        print(json.dumps({"gemm": gemm_rows, "steps": step_rows}))
        return 0
    print("GEMM, one layer of Llama-3.1-8B on H200 (bf16): aiconfigurator table / measured (CUDA graph)")
    ms = sorted({r["m"] for r in gemm_rows})
    print(f"{'op':12}" + "".join(f"{m:>8}" for m in ms))
    for op in SHAPES:
        ratios = {r["m"]: r["table_over_measured"] for r in gemm_rows if r["op"] == op}
        print(f"{op:12}" + "".join(f"{ratios.get(m, float('nan')):8.2f}" for m in ms))
    small = [r["table_over_measured"] for r in gemm_rows if r["m"] <= 128]
    large = [r["table_over_measured"] for r in gemm_rows if r["m"] >= 512]
    print(f"median table/measured: m <= 128 {np.median(small):.2f}, m >= 512 {np.median(large):.2f}")
    print("\nwhole steps (kernels only, the cost model now using the measured GEMMs) vs measured plain-PyTorch steps")
    for r in step_rows:
        print(
            f"  {r['step']:26} measured {r['measured_ms']:8.2f} ms  model {r['tables_ms']:8.2f} ms"
            f"  ratio {r['tables_ms'] / r['measured_ms']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
