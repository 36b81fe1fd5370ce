"""report.html as a reader sees it: every panel drawn, not empty, and shown by a real browser.

The page is built from a simulated run with faults and failures (every panel has something to
draw) and worker samples; each embedded plot must hold drawn content, and a headless Chromium
screenshot of the page must show each plot pixel for pixel (a broken or missing image fails).
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_chaos import _cluster

from emulator.htmlreport import write_html
from emulator.results import goodput
from emulator.sim.simulator import simulate
from emulator.workload.plan import plan_for

PANELS = (
    "Latency CDFs",
    "Attainment, throughput and load",
    "Queues and KV cache",
    "Emulation timing",
    "Failures",
    "Latency breakdown",
)
WIDTH = 1050  # the page's max-width: a window this wide puts every plot at x = 0


def _samples(end_s: float) -> dict[str, list[tuple[float, dict]]]:
    """Worker samples as the run's sampler takes them from /load (two instances, half-second steps)."""
    t = np.arange(0.0, end_s, 0.5)
    return {
        name: [
            (
                float(x),
                {
                    "running": 4 + k,
                    "waiting": int(x) % 3,
                    "kv_usage": 0.2 + 0.1 * k,
                    "timing_error_ratio": 0.02 * (k + 1),
                },
            )
            for x in t
        ]
        for k, name in enumerate(("prefill-0", "decode-0"))
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    cluster = _cluster()
    result = simulate(cluster, plan_for(cluster))
    slo = cluster.spec.slo
    gp = goodput(result.records, slo.ttft_ms, slo.tpot_ms, result.summary["duration_s"])
    trust = {"verdict": "degraded", "line": "trust: NOT faithful — a test's stated verdict"}
    path = tmp_path_factory.mktemp("report") / "report.html"
    write_html(str(path), "report test", result.records, result.summary, gp, slo, _samples(30.0), trust)
    page = path.read_text()
    figures = re.findall(r"<h2>([^<]+)</h2><img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    return (
        path,
        page,
        {title: np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")) for title, b64 in figures},
    )


def _drawn(img: np.ndarray) -> tuple[float, float]:
    """(share of non-white pixels, share of saturated ones: lines, bars and bands in colour)."""
    rgb = img.astype(int)
    ink = (rgb.min(axis=2) < 235).mean()
    colour = ((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean()
    return float(ink), float(colour)


def test_every_panel_is_there_and_has_something_drawn(report):
    _, page, figures = report
    assert list(figures) == list(PANELS)
    for title, img in figures.items():
        ink, colour = _drawn(img)
        assert ink > 0.03 and colour > 0.0005, (title, ink, colour)  # axes alone: ink, no colour
    assert "trust: NOT faithful" in page and page.index("trust:") < page.index("<table>")


def test_a_plot_without_data_is_detected_as_empty():
    """The emptiness check itself: a figure with axes and labels but no data fails it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3))
    ax.set(xlabel="time (s)", ylabel="requests", title="nothing plotted")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _, colour = _drawn(np.asarray(Image.open(buf).convert("RGB")))
    assert colour <= 0.0005


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_headless_chromium_shows_every_plot(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (make test installs Debian's chromium when run as root)")
    path, _, figures = report
    height = sum(img.shape[0] for img in figures.values()) + 4000  # plots, headings, the summary and fault tables
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",  # containers often give /dev/shm 64 MB
            "--no-first-run",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size={WIDTH},{height}",
            f"--screenshot={shot}",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), f"chromium wrote no screenshot (exit {run.returncode}): {run.stderr[-1500:]}"
    screen = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    last = -1
    for title, img in figures.items():
        h, w, _ = img.shape
        rows = [h // 4, h // 2, 3 * h // 4]
        # the rows of the plot as the browser painted them, at x = 0, below the previous plot
        found = [
            y
            for y in range(last + 1, screen.shape[0] - h + 1)
            if all(np.array_equal(screen[y + r, :w], img[r].astype(int)) for r in rows)
        ]
        assert found, f"{title}: not on the screenshot (missing, broken or scaled)"
        last = found[0]
