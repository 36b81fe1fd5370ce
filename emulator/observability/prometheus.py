"""A real Prometheus for one local run: scrapes the router and every worker each second with the
spec's generated rules, keeps its TSDB in the report folder, and is queried at the end."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import yaml

from emulator.errors import InputError
from emulator.observability.rules import rules_for

SCRAPE_INTERVAL_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _target(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


class LocalPrometheus:
    def __init__(self, folder: str, cluster, state) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise InputError(
                "--prometheus: the prometheus binary is not installed; `apt-get install prometheus` "
                "(make demo/test install it when run as root)"
            )
        folder = os.path.abspath(folder)
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "rules.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(rules_for(cluster.spec.slo), fh, sort_keys=False)
        workers = state.workers()
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S:g}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S:g}s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [
                {
                    "job_name": "infemu-router",
                    "static_configs": [
                        {"targets": [_target(state.router)], "labels": {"cluster": cluster.name, "role": "router"}}
                    ],
                },
                {
                    "job_name": "infemu-workers",
                    "static_configs": [
                        {
                            "targets": [_target(p.url)],
                            "labels": {"cluster": cluster.name, "role": p.role, "pod": p.name},
                        }
                        for p in workers
                    ],
                },
            ],
        }
        with open(os.path.join(folder, "prometheus.yml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(config, fh, sort_keys=False)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(folder, "prometheus.log"), "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={os.path.join(folder, 'prometheus.yml')}",
                f"--storage.tsdb.path={os.path.join(folder, 'data')}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=folder,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InputError(
                    f"--prometheus: prometheus exited with code {self.proc.returncode}; "
                    f"see {os.path.join(folder, 'prometheus.log')}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:  # loopback only
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise InputError("--prometheus: prometheus did not become ready within 30 s")

    def query(self, expr: str) -> float | None:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as r:  # loopback only
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{expr}: {body}")
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def final_scrape(self) -> None:
        time.sleep(2.5 * SCRAPE_INTERVAL_S)  # every target scraped at least twice after the last request

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
