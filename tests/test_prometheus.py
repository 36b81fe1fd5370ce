"""A real Prometheus on a real run: its attainment agrees with the client's, and every dashboard
query evaluates against it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from conftest import ROOT, example

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus not installed (Debian package; `make test` installs it as root)",
    ),
]
DASHBOARD = os.path.join(ROOT, "dashboards", "grafana", "infemu-fleet.json")


def test_prometheus_agrees_with_the_client_and_serves_every_dashboard_query(tmp_path):
    # well past saturation (~24 req/s): the queue grows steadily, attainment far from 0% and 100%
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "emulator.cli",
            "run",
            example("quickstart.yaml"),
            "--requests",
            "250",
            "--rate",
            "36",
            "--prometheus",
            "--out",
            "rep",
            "--json",
            "--shaping",
            "inproc",
            "--time-dilation",  # the spec sets none: no pilots before the run this test reads
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert r.returncode == 0, r.stderr
    client = json.loads(r.stdout)["slo_attainment"]
    prom = json.loads((tmp_path / "rep" / "prometheus.json").read_text())
    assert prom["requests"] == 250
    assert 0.05 < client < 0.95
    assert abs(prom["slo_attainment"] - client) <= 0.02, (prom, client)
    assert (tmp_path / "rep" / "prometheus" / "data").is_dir()

    # the recorded data stays queryable: restart Prometheus on it and evaluate every panel
    port = 19000 + os.getpid() % 1000
    folder = tmp_path / "rep" / "prometheus"
    proc = subprocess.Popen(
        [
            shutil.which("prometheus"),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=error",
        ],
        cwd=str(folder),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if urllib.request.urlopen(f"{base}/-/ready", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        with open(DASHBOARD, encoding="utf-8") as fh:
            dash = json.load(fh)
        assert {v["name"] for v in dash["templating"]["list"]} >= {"model_name", "namespace"}
        exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
        assert len(exprs) >= 10
        non_empty = 0
        for expr in exprs:
            q = expr.replace("$model_name", ".*").replace("$namespace", ".*").replace("$__rate_interval", "1m")
            url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q, "time": prom_end(prom, tmp_path)})
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
            assert body["status"] == "success", (expr, body)
            non_empty += bool(body["data"]["result"])
        assert non_empty >= len(exprs) // 2  # most panels have data from the run
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def prom_end(prom: dict, tmp_path) -> str:
    """Evaluate at the end of the run (the TSDB holds its last samples)."""
    return str((tmp_path / "rep" / "summary.json").stat().st_mtime)
