"""Shared fixtures: paths to the examples and to the reference data beside the checkout."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))


def example(name: str) -> str:
    return os.path.join(EXAMPLES, name)


def example_files(kind: str = "InferenceCluster") -> list[str]:
    """The example files holding at least one resource of ``kind`` (InferenceCluster, LoadTest)."""
    out = []
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))):
        with open(path, encoding="utf-8") as fh:
            if any(d and d.get("kind") == kind for d in yaml.safe_load_all(fh)):
                out.append(path)
    return out


@pytest.fixture
def shared_data() -> str:
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"reference data not found at {SHARED_DATA} (CI clones with shared/ beside the checkout)")
    return SHARED_DATA


def run_infemu(*args: str, cwd: str = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """The ``infemu`` command as a user runs it, from this checkout, in a given folder."""
    return subprocess.run(
        [sys.executable, "-m", "emulator.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


def metric_value(url: str, sample: str) -> float:
    """The value of one sample in an instance's /metrics (summed over label sets); it must exist."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    values = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == sample]
    assert values, f"{url}/metrics has no {sample}"
    return sum(values)
