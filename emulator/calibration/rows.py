"""Rows of the silicon calibration set: real TTFT/TPOT of vLLM, SGLang and TensorRT-LLM deployments.

The file is aiconfigurator's ``silicon_sample.csv`` (``../shared/data/measurements/
silicon_calibration.csv``; its README documents every column). Each row is one deployment
under a closed-loop load of ``concurrency`` clients sending requests of exactly ``isl``
prompt and ``osl`` output tokens; the values are means over the benchmark's requests.

Groups (model, GPU system, engine, engine version) are the unit of cross-validation: a
constant fitted from data is never scored on the group it was fitted on. Families
(engine, mode, GPU) are the unit of reporting.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass

DEFAULT_PATH = os.path.join("..", "shared", "data", "measurements", "silicon_calibration.csv")


@dataclass(frozen=True)
class Layout:
    """One worker's parallel layout (agg: the engine; disagg: a prefill or decode worker)."""

    tp: int
    pp: int
    dp: int  # attention data-parallel ranks
    moe_tp: int
    moe_ep: int
    workers: int = 1
    batch: int | None = None


@dataclass(frozen=True)
class CalibrationRow:
    id: str
    backend: str
    version: str  # "" when not recorded
    model_path: str
    system: str
    precision: str
    mode: str  # agg | disagg
    isl: int
    osl: int
    gemm_quant: str
    moe_quant: str
    concurrency: int | None
    agg: Layout | None
    prefill: Layout | None
    decode: Layout | None
    ttft_ms: float
    tpot_ms: float
    image: str
    source: str  # db-dump | source_file
    wip: bool
    harness: str = "generator"  # who deployed and benchmarked it: "generator" or "gap-analysis" (GAP_ANALYSIS_MARK)

    @property
    def group(self) -> str:
        return f"{self.model_path}|{self.system}|{self.backend}|{self.version or '?'}"

    @property
    def family(self) -> str:
        return f"{self.backend}/{self.mode}/{self.system}"


def _int(v: str) -> int | None:
    v = (v or "").strip()
    return int(float(v)) if v else None


def _layout(rec: dict, prefix: str) -> Layout | None:
    tp = _int(rec[f"{prefix}tp_size"])
    if tp is None:
        return None
    return Layout(
        tp=tp,
        pp=_int(rec[f"{prefix}pp_size"]) or 1,
        dp=_int(rec[f"{prefix}attention_dp_size"]) or 1,
        moe_tp=_int(rec[f"{prefix}moe_tp_size"]) or 1,
        moe_ep=_int(rec[f"{prefix}moe_ep_size"]) or 1,
        workers=_int(rec.get(f"{prefix}num_workers", "")) or 0 if prefix else 1,
        batch=_int(rec[f"{prefix}batch_size"]),
    )


def _provenance(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if "=" in part:
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip()
        elif "/" in part and ":" in part:
            out.setdefault("image", part)
        elif part.startswith("db-dump"):
            out["db"] = part
    return out


# Who deployed the engine the row measured. Most rows come from deployments aiconfigurator's generator
# wrote (its rule plugins set the engine flags express.deployment() follows: SGLang with
# --enable-mixed-chunk, TensorRT-LLM without chunked prefill, ...). The rows whose provenance is a
# source file of the "aic-auto-gap-analysis" project (Qwen3-32B and Qwen3-235B-FP8 on SGLang 0.5.1-0.5.8,
# TensorRT-LLM 1.0-1.3, vLLM 0.12: 688 rows) were produced by that separate harness; their SGLang rows
# behave as SGLang's defaults schedule (prefill batches pause decoding: long TTFT, short TPOT at high
# concurrency), not as mixed chunks (docs/fidelity.md, "Who deployed the row").
GAP_ANALYSIS_MARK = "aic-auto-gap-analysis"


def load_rows(path: str = DEFAULT_PATH) -> list[CalibrationRow]:
    rows: list[CalibrationRow] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for rec in csv.DictReader(fh):
            prov = _provenance(rec["silicon_data_source"])
            conc = _int(prov.get("silicon_concurrency", ""))
            agg = _layout(rec, "") if rec["mode"] == "agg" else None
            if conc is None and agg is not None and agg.batch:
                conc = agg.batch * agg.dp
            rows.append(
                CalibrationRow(
                    id=rec["id"],
                    backend=rec["backend"],
                    version=rec["backend_version"].strip(),
                    model_path=rec["model_path"],
                    system=rec["system"],
                    precision=(rec["precision"] or "bf16").strip(),
                    mode=rec["mode"],
                    isl=int(rec["isl"]),
                    osl=int(rec["osl"]),
                    gemm_quant=(rec["gemm_quant_mode"] or "bf16").strip(),
                    moe_quant=(rec["moe_quant_mode"] or "bf16").strip(),
                    concurrency=conc,
                    agg=agg,
                    prefill=_layout(rec, "prefill_") if rec["mode"] == "disagg" else None,
                    decode=_layout(rec, "decode_") if rec["mode"] == "disagg" else None,
                    ttft_ms=float(rec["silicon_ttft_ms"]),
                    tpot_ms=float(rec["silicon_tpot_ms"]),
                    image=prov.get("image", ""),
                    source="db-dump" if "db" in prov or re.search(r"db-dump", rec["silicon_data_source"]) else "file",
                    wip=prov.get("wip", "False") == "True",
                    harness="gap-analysis" if GAP_ANALYSIS_MARK in prov.get("source_file", "") else "generator",
                )
            )
    return rows


def dedupe(rows: list[CalibrationRow]) -> list[CalibrationRow]:
    """Drop rows that repeat another row's measurement under another id (same model, system,
    engine, lengths, TTFT and TPOT; the README counts 748 of them)."""
    seen: set[tuple] = set()
    out = []
    for r in rows:
        key = (r.model_path, r.system, r.backend, r.isl, r.osl, round(r.ttft_ms, 6), round(r.tpot_ms, 6))
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out
