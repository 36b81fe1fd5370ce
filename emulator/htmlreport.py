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
from emulator.trust import TIMING_BUDGET

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


def _legend_both(ax, ax2, **kw) -> None:
    """One legend for a chart with two y axes (each axis alone would list half the lines)."""
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, **kw)


def _trust_banner(trust: dict | None) -> str:
    if not trust:
        return ""
    ok = trust.get("verdict") == "faithful"
    colour = "#1b7f3b" if ok else "#b00020"
    return (
        f"<p style='border-left:6px solid {colour};padding:6px 10px;background:#f6f6f6'>"
        f"<b>{html.escape(str(trust.get('line', '')))}</b></p>"
    )


def write_html(
    path: str,
    title: str,
    records: list[RequestRecord],
    summary: dict,
    goodput: dict,
    slo,
    samples: dict[str, list[tuple[float, dict]]],
    trust: dict | None = None,
) -> None:
    """The page: the trust verdict, the summary table, then one plot per question a reader asks
    (how fast, how steady over time, where the queues were, was the emulation on time, what failed,
    where the time went). Time plots share the run's clock and shade injected faults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    figs = []
    ok = [r for r in records if r.ok]
    faults = summary.get("faults") or []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, limit, label in ((axes[0], "ttft_ms", slo.ttft_ms, "TTFT"), (axes[1], "tpot_ms", slo.tpot_ms, "TPOT")):
        vals = np.sort([getattr(r, key) for r in ok if getattr(r, key) is not None])
        if len(vals):
            ax.plot(vals, np.arange(1, len(vals) + 1) / len(vals), label=f"{label} ({len(vals)} requests)")
        ax.axvline(limit, color="red", ls="--", label=f"SLO {limit:g} ms")
        ax.set(xlabel=f"{label} (ms, log scale)", ylabel="fraction of requests", title=f"{label} CDF", xscale="log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1-2-5 ticks, plain numbers
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
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
        sent = np.histogram([r.arrival_s for r in records if r.arrival_s is not None], bins=bins)[0]
        done = np.histogram(fin, bins=bins)[0]
        fig, (ax, axr) = plt.subplots(2, 1, figsize=(10, 5.4), sharex=True)
        ax.plot(bins[1:], 100 * np.array(att), "o-", ms=3, label="SLO attainment (%)")
        ax.axhline(100 * slo.attainment_target, color="grey", ls="--", label=f"target {100 * slo.attainment_target:g}%")
        ax2 = ax.twinx()
        ax2.plot(bins[1:], thr, color="C1", label="output tokens/s")
        ax.set(ylabel="attainment (%)", ylim=(0, 105), title="Attainment and throughput over time (1 s bins)")
        ax2.set_ylabel("output tokens/s")
        ax2.set_ylim(bottom=0)
        _legend_both(ax, ax2, fontsize=8, loc="lower left")
        axr.step(bins[1:], sent, where="pre", label="requests sent / s (offered load: bursts show here)")
        axr.step(bins[1:], done, where="pre", label="requests completed / s")
        axr.set(xlabel="time since the first request (s)", ylabel="requests / s")
        axr.set_ylim(bottom=0)
        axr.legend(fontsize=8, loc="upper left")
        _shade_faults(ax, faults)
        _shade_faults(axr, faults)
        fig.tight_layout()
        figs.append(("Attainment, throughput and load", _png(fig)))
        plt.close(fig)

    if samples:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
        for name, series in samples.items():
            t = [s[0] for s in series]
            a1.plot(t, [s[1].get("running", 0) + s[1].get("waiting", 0) for s in series], label=name)
            a2.plot(t, [100 * s[1].get("kv_usage", 0) for s in series], label=name)
        a1.set(xlabel="time (s)", ylabel="requests (running + waiting)", title="Queue depth per instance")
        a2.set(xlabel="time (s)", ylabel="KV usage (%)", title="KV-cache usage per instance", ylim=(0, 100))
        for a in (a1, a2):
            a.legend(fontsize=7, loc="upper left")
            _shade_faults(a, faults)
        fig.tight_layout()
        figs.append(("Queues and KV cache", _png(fig)))
        plt.close(fig)

        timed = {
            n: [(t, v["timing_error_ratio"]) for t, v in ser if "timing_error_ratio" in v] for n, ser in samples.items()
        }
        timed = {n: ser for n, ser in timed.items() if ser}
        if timed:  # was the emulation on time? a worker's step-timing error p99 over its median step
            fig, ax = plt.subplots(figsize=(10, 3.0))
            for name, ser in timed.items():
                ax.plot([t for t, _ in ser], [100 * v for _, v in ser], label=name)
            budget = 100 * TIMING_BUDGET
            ax.axhline(budget, color="red", ls="--", label=f"{budget:g}% budget: above it, timings are not faithful")
            ax.set(
                xlabel="time (s)",
                ylabel="p99 lateness / median step (%)",
                title="Step timing error per engine (infemu_iteration_timing_error_ratio)",
            )
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7, loc="upper left")
            _shade_faults(ax, faults)
            fig.tight_layout()
            figs.append(("Emulation timing", _png(fig)))
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
        # means add up (TTFT + decode = E2E); percentiles do not, so they stand side by side
        ttft = np.array([r.ttft_ms for r in ok])
        decode = np.array([r.e2e_ms - r.ttft_ms for r in ok])
        e2e = np.array([r.e2e_ms for r in ok])
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 2]})
        a1.bar(["mean"], [ttft.mean()], label=f"queue + prefill (+ KV transfer) = TTFT {ttft.mean():,.0f} ms")
        a1.bar(["mean"], [decode.mean()], bottom=[ttft.mean()], label=f"decode {decode.mean():,.0f} ms")
        a1.set(ylabel="ms", title=f"Mean end-to-end {e2e.mean():,.0f} ms")
        a1.legend(fontsize=7, loc="lower center")
        qs = (50, 90, 99)
        x = np.arange(len(qs))
        for k, (name, vals) in enumerate((("TTFT", ttft), ("decode time", decode), ("end-to-end", e2e))):
            a2.bar(x + (k - 1) * 0.27, np.percentile(vals, qs), width=0.27, label=name)
        a2.set_xticks(x, [f"p{q}" for q in qs])
        a2.set(ylabel="ms", title="Percentiles, each of its own distribution")
        a2.legend(fontsize=8)
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
        "<style>body{font-family:sans-serif;max-width:1050px;margin:auto}td{padding:2px 10px}"
        "tr:nth-child(even){background:#f3f3f3}img{display:block}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{_trust_banner(trust)}<p>goodput: {goodput['requests_per_s']:.2f} req/s, "
        f"{goodput['output_tokens_per_s']:.0f} output tok/s meeting TTFT &le; {slo.ttft_ms:g} ms and TPOT "
        f"&le; {slo.tpot_ms:g} ms, over {goodput.get('window_s', 0):.1f} s ({goodput.get('window', '')})</p>"
        f"<table>{rows}</table>{_fault_table(faults)}{imgs}</body></html>"
    )
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
