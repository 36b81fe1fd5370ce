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
from dataclasses import dataclass, replace

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
    # set by dedupe() when the same measurement is recorded under another layout: why it cannot be scored
    conflict: str | None = None

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

# An aggregated row's id names the engine's sizes (``..._tp8_ep8_920``: --tp 8 --ep 8, eight GPUs, the
# experts split eight ways). 234 rows of source_file=2026-04-06.csv record those two sizes multiplied
# instead: tp_size 64 (or tp 1 x attention_dp 64), moe_tp 8 x moe_ep 8 — DeepSeek-R1 on 64 GPUs for 4
# clients. The same measurements recorded elsewhere (the gap-analysis files; qwen3.5-397b-gap-analysis,
# kimi-k2.5-gap-analysis) read tp 8 (or 4), moe_tp 1, moe_ep 8 (or 4): the GPUs the id names. Such a
# row is read as its id says: the multiplied dimension (attention DP where it is over 1, else TP)
# divided by the EP size, the experts split moe_tp = tp x dp / ep ways x ep.
_ID_SIZES = re.compile(r"_tp(\d+)(?:_\d+)?_ep(\d+)(?:_\d+)?_\d+$")


def _as_the_id_says(row_id: str, lay: Layout) -> Layout:
    m = _ID_SIZES.search(row_id)
    if m is None:
        return lay
    tp, ep = int(m.group(1)), int(m.group(2))
    if ep <= 1 or tp % ep or lay.tp * lay.dp != tp * ep or lay.moe_tp * lay.moe_ep != tp * ep:
        return lay
    if lay.dp > 1:
        return replace(lay, dp=lay.dp // ep, moe_tp=tp // ep, moe_ep=ep)
    return replace(lay, tp=lay.tp // ep, moe_tp=tp // ep, moe_ep=ep)


def _vllm_attention_dp(backend: str, rec: dict, lay: Layout) -> Layout:
    """vLLM spreads an MoE layer's experts over every rank of tp x dp: ``FusedMoEParallelConfig.make``
    flattens TP across DP (vllm/model_executor/layers/fused_moe/config.py), so its moe_tp x moe_ep is
    tp x attention-DP, always. 19 rows of the gap-analysis harness (Qwen3-235B-A22B-FP8, vLLM 0.12,
    H200) leave attention_dp_size blank with moe_tp x moe_ep two or four times tp: tp 1 with moe_tp 2
    (TPOT 55-58 ms, as the TP2 rows' 51-56 ms; 235 GB of FP8 weights do not fit one 141 GB H200), tp 1
    or 2 with moe_tp 4 (37-46 ms, between TP2 and TP4's 34-38 ms). The only vLLM deployment with those
    MoE sizes runs tp x (moe_tp x moe_ep / tp) GPUs: read so. A recorded attention_dp_size stands."""
    width = lay.moe_tp * lay.moe_ep
    if backend != "vllm" or (rec["attention_dp_size"] or "").strip() or lay.dp != 1:
        return lay
    if width > lay.tp and width % lay.tp == 0:
        return replace(lay, dp=width // lay.tp)
    return lay


def load_rows(path: str = DEFAULT_PATH) -> list[CalibrationRow]:
    rows: list[CalibrationRow] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for rec in csv.DictReader(fh):
            prov = _provenance(rec["silicon_data_source"])
            conc = _int(prov.get("silicon_concurrency", ""))
            agg = _layout(rec, "") if rec["mode"] == "agg" else None
            if agg is not None:
                agg = _vllm_attention_dp(rec["backend"], rec, _as_the_id_says(rec["id"], agg))
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
    """Count every measurement once. Rows that repeat another row's measurement under another id (same
    system, engine, lengths, TTFT and TPOT; the README counts 748 of them) are dropped, and so are the
    gap-analysis files' copies of the database's rows, whose figures are rounded to 1/100 ms, and the
    database's DeepSeek-R1 runs filed under DeepSeek-V3: the most precise record of a measurement stays.

    Records of one measurement can disagree on its layout. The database dump's rows of some
    configurations multiply the engine's sizes as the 2026-04-06 file did (``_as_the_id_says``):
    Kimi-K2.5 on vLLM as tp 4 x attention-DP 4 with EP 16, where the rows whose ids name their
    sizes read tp 4 with EP 4; Qwen3.5 on SGLang as tp 16. The layout a record's own id confirms
    wins, else (P/D) the one record that has the worker counts; a measurement whose layouts nothing
    settles cannot be attributed: its rows stay, marked with the conflict, and are skipped with it
    (``express``). A different batch field alone (per rank or per deployment) is no conflict."""
    groups: dict[tuple, list[CalibrationRow]] = {}
    for r in rows:
        groups.setdefault(measurement_key(r), []).append(r)
    keep: dict[str, CalibrationRow] = {}
    for same in groups.values():
        layouts = {_sizes(r) for r in same}
        if len(layouts) > 1:
            confirmed = {_sizes(r) for r in same if _id_confirms(r)} or {_sizes(r) for r in same if _complete(r)}
            if len(confirmed) != 1:
                reason = "the same measurement is recorded under another layout too: which one ran is unknown"
                distinct = {_sizes(r): r for r in reversed(same)}  # one row per layout
                keep.update((r.id, replace(r, conflict=reason)) for r in distinct.values())
                continue
            same = [r for r in same if _sizes(r) in confirmed]
        best = max(same, key=lambda r: _digits(r.ttft_ms) + _digits(r.tpot_ms))  # the first of equals
        keep[best.id] = best
    return [keep[r.id] for r in rows if r.id in keep]


def measurement_key(r: CalibrationRow) -> tuple:
    """What makes two rows one measurement (``dedupe``): the system, engine, lengths and figures at the
    gap-analysis copies' 1/100 ms. No model: the database dump files DeepSeek-R1's runs (ids dsr1_...)
    under DeepSeek-V3's model path (the same architecture), 388 of them repeating the 2026-04-06 file's
    DeepSeek-R1 rows."""
    return (r.system, r.backend, r.isl, r.osl, round(r.ttft_ms, 2), round(r.tpot_ms, 2))


def copies_expressed(rows: list[CalibrationRow], expressed: list[CalibrationRow]) -> int:
    """How many of the data set's ``rows`` (copies included) record a measurement of ``expressed``: the
    count as the issue counts rows (4,892 in the set), beside ``dedupe``'s count of measurements."""
    keys = {measurement_key(r) for r in expressed}
    return sum(measurement_key(r) in keys for r in rows)


def _sizes(r: CalibrationRow) -> tuple:
    """A row's parallel layout without its batch field."""
    return tuple(None if lay is None else replace(lay, batch=None) for lay in (r.agg, r.prefill, r.decode))


def _complete(r: CalibrationRow) -> bool:
    """A P/D record with its worker counts (the 2026-03-25 and 2026-04-06 files' P/D rows have none)."""
    return r.mode == "disagg" and all(lay is not None and lay.workers for lay in (r.prefill, r.decode))


def _id_confirms(r: CalibrationRow) -> bool:
    """The row's id names the engine sizes its layout has (``..._tp4_ep4_1872``: four GPUs, EP 4)."""
    m = _ID_SIZES.search(r.id)
    lay = r.agg
    return m is not None and lay is not None and lay.tp * lay.dp == int(m.group(1)) and lay.moe_ep == int(m.group(2))


def _digits(value: float) -> int:
    """Significant digits a figure was recorded with (a rounded copy has fewer)."""
    return len(repr(value).replace(".", "").lstrip("0"))
