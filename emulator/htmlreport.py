"""``report.html``: one self-contained page (plots embedded as PNG) for a run's report folder.

TTFT and TPOT CDFs against the SLOs, attainment and throughput over time, queue depth and
KV usage per instance (sampled from the workers during the run), failures per second by
reason, and the latency breakdown (queue + prefill until the first token, then decode) by
percentile. Injected faults are drawn on every time plot and tabled before / during / after.
Imports matplotlib, so only the report path pays for it.
"""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np

from emulator.results import RequestRecord

# a pipeline's stages in the order a request meets them (sim/stages.py and router/pipeline.py name them)
STAGE_ORDER = ("retrieval", "think", "api", "kv_fetch", "queue", "prefill", "reasoning", "network", "decode")


def _shade_faults(ax, faults: list[dict]) -> None:
    """Each fault's window as a labelled band (a kill: until its process served again)."""
    for i, f in enumerate(faults):
        ax.axvspan(f["start_s"], max(f["end_s"], f["start_s"] + 0.05), color=f"C{(i % 8) + 2}", alpha=0.15)
        ax.text(f["start_s"], 1.0, f" {f['name']}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")


UNITS = {"ttft_ms": "ms", "tpot_ms": "ms", "e2e_ms": "ms", "duration_s": "s", "output_tokens_per_s": "tok/s"}


def _num(v: float) -> str:
    """Sensible precision and no scientific notation: 2,250 · 44.1 · 8.47."""
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _readable(key: str, value) -> str:
    """A summary value as a person reads it: units, three significant digits, percentages."""
    unit = UNITS.get(key, "")
    if key == "slo_attainment" and isinstance(value, int | float):
        return f"{100 * value:.1f}%"
    if isinstance(value, dict) and {"mean", "p50", "p90", "p99"} <= set(value):
        parts = [f"{k} {'-' if value[k] is None else _num(value[k])}" for k in ("mean", "p50", "p90", "p99")]
        return " · ".join(parts) + f" {unit}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    if isinstance(value, float):
        return f"{_num(value)} {unit}".strip()
    return f"{value} {unit}".strip()


def _fault_table(faults: list[dict]) -> str:
    if not faults:
        return ""
    head = (
        "<tr><th>fault</th><th>kind</th><th>window (s)</th><th>phase</th><th>sent</th><th>completed</th>"
        "<th>failed (by reason)</th><th>lost</th><th>TTFT p99 ms</th><th>TPOT p99 ms</th><th>attainment</th>"
        "<th>recovery (s)</th></tr>"
    )
    rows = []
    for f in faults:
        for phase in ("before", "during", "after"):
            w = f[phase]
            cells = [
                html.escape(f["name"]) if phase == "before" else "",
                html.escape(f["kind"]) if phase == "before" else "",
                f"{f['start_s']:.2f}–{f['end_s']:.2f}" if phase == "before" else "",
                phase,
                str(w["sent"]),
                str(w["completed"]),
                f"{w['failed']} {html.escape(json.dumps(w['failed_by_reason'])) if w['failed'] else ''}",
                str(w["lost"]),
                "-" if w["ttft_ms_p99"] is None else f"{w['ttft_ms_p99']:.1f}",
                "-" if w["tpot_ms_p99"] is None else f"{w['tpot_ms_p99']:.1f}",
                "-" if w["slo_attainment"] is None else f"{100 * w['slo_attainment']:.1f}%",
                ("-" if f["recovery_s"] is None else f"{f['recovery_s']:.2f}") if phase == "after" else "",
            ]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<h2>Faults</h2><table border='1' cellspacing='0'>{head}{''.join(rows)}</table>"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def write_html(
    path: str,
    title: str,
    records: list[RequestRecord],
    summary: dict,
    goodput: dict,
    slo,
    samples: dict[str, list[tuple[float, dict]]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figs = []
    ok = [r for r in records if r.ok]
    faults = summary.get("faults") or []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, limit, label in ((axes[0], "ttft_ms", slo.ttft_ms, "TTFT"), (axes[1], "tpot_ms", slo.tpot_ms, "TPOT")):
        vals = np.sort([getattr(r, key) for r in ok if getattr(r, key) is not None])
        if len(vals):
            ax.plot(vals, np.arange(1, len(vals) + 1) / len(vals))
        ax.axvline(limit, color="red", ls="--", label=f"SLO {limit:g} ms")
        ax.set(xlabel=f"{label} (ms)", ylabel="CDF", title=f"{label} CDF", xscale="log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones collide
        ax.legend()
    fig.tight_layout()
    figs.append(("Latency CDFs", _png(fig)))
    plt.close(fig)

    if ok:
        end = max(r.finish_s for r in ok)
        bins = np.arange(0, end + 1.0, 1.0)
        fin = np.array([r.finish_s for r in ok])
        met = np.array([r.meets(slo.ttft_ms, slo.tpot_ms, slo.e2e_ms) for r in ok])
        toks = np.array([r.output_tokens for r in ok])
        idx = np.digitize(fin, bins)
        att = [met[idx == i].mean() if (idx == i).any() else np.nan for i in range(1, len(bins))]
        thr = [toks[idx == i].sum() for i in range(1, len(bins))]
        fig, ax = plt.subplots(figsize=(10, 3.4))
        ax.plot(bins[1:], 100 * np.array(att), "o-", ms=3, label="attainment %")
        ax.axhline(100 * slo.attainment_target, color="grey", ls="--")
        ax2 = ax.twinx()
        ax2.plot(bins[1:], thr, color="C1", label="output tok/s")
        ax.set(xlabel="time (s)", ylabel="attainment (%)", ylim=(0, 105), title="Attainment and throughput over time")
        ax2.set_ylabel("output tokens/s")
        _shade_faults(ax, faults)
        fig.tight_layout()
        figs.append(("Attainment and throughput", _png(fig)))
        plt.close(fig)

    if samples:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
        for name, series in samples.items():
            t = [s[0] for s in series]
            a1.plot(t, [s[1].get("running", 0) + s[1].get("waiting", 0) for s in series], label=name)
            a2.plot(t, [100 * s[1].get("kv_usage", 0) for s in series], label=name)
        a1.set(xlabel="time (s)", ylabel="running + waiting", title="Queue depth per instance")
        a2.set(xlabel="time (s)", ylabel="KV usage (%)", title="KV-cache usage per instance", ylim=(0, 100))
        a1.legend(fontsize=7)
        _shade_faults(a1, faults)
        _shade_faults(a2, faults)
        fig.tight_layout()
        figs.append(("Queues and KV cache", _png(fig)))
        plt.close(fig)

    failed = [r for r in records if not r.ok and r.finish_s is not None]
    if failed:
        end = max(r.finish_s for r in failed)
        bins = np.arange(0, end + 1.0, 1.0)
        fig, ax = plt.subplots(figsize=(10, 3.0))
        for reason in sorted({r.error_code or "other" for r in failed}):
            times = [r.finish_s for r in failed if (r.error_code or "other") == reason]
            ax.hist(times, bins=bins, histtype="step", label=reason)
        ax.set(xlabel="time (s)", ylabel="failed requests / s", title="Failures by reason")
        ax.legend(fontsize=8)
        _shade_faults(ax, faults)
        fig.tight_layout()
        figs.append(("Failures", _png(fig)))
        plt.close(fig)

    if ok:
        qs = [50, 90, 99]
        ttft = np.percentile([r.ttft_ms for r in ok], qs)
        decode = np.percentile([r.e2e_ms - r.ttft_ms for r in ok], qs)
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.bar([f"p{q}" for q in qs], ttft, label="queue + prefill (+ KV transfer): TTFT")
        ax.bar([f"p{q}" for q in qs], decode, bottom=ttft, label="decode")
        ax.set(ylabel="ms", title="Latency breakdown")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs.append(("Latency breakdown", _png(fig)))
        plt.close(fig)

    piped = [r for r in ok if r.breakdown_ms]
    if piped:  # pipelines: where each request's end-to-end time went, stage by stage (means add up)
        stages = [k for k in STAGE_ORDER if any(r.breakdown_ms.get(k) for r in piped)]
        means = [float(np.mean([r.breakdown_ms.get(k, 0.0) for r in piped])) for k in stages]
        fig, ax = plt.subplots(figsize=(10, 1.8 + 0.1 * len(stages)))
        left = 0.0
        for k, v in zip(stages, means, strict=True):
            ax.barh(["mean"], [v], left=left, label=f"{k} {v:.1f} ms")
            left += v
        ax.set(xlabel="mean ms per request (stages in order; the bar is the mean end-to-end latency)")
        kinds = sorted({r.pipeline for r in piped})
        ax.set_title(f"{' + '.join(kinds)} pipelines: where the end-to-end time goes")
        ax.legend(fontsize=8, ncol=min(len(stages), 4), loc="upper center", bbox_to_anchor=(0.5, -0.45))
        fig.tight_layout()
        figs.append(("Pipeline stages", _png(fig)))
        plt.close(fig)

    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(_readable(k, v))}</td></tr>"
        for k, v in summary.items()
        if k != "faults"
    )
    imgs = "".join(f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b64}'/>" for t, b64 in figs)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1050px;margin:auto}td{padding:2px 10px}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><p>goodput: {goodput['requests_per_s']:.2f} req/s, "
        f"{goodput['output_tokens_per_s']:.0f} output tok/s meeting TTFT &le; {slo.ttft_ms:g} ms and TPOT "
        f"&le; {slo.tpot_ms:g} ms, over {goodput.get('window_s', 0):.1f} s ({goodput.get('window', '')})</p>"
        f"<table>{rows}</table>{_fault_table(faults)}{imgs}</body></html>"
    )
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
