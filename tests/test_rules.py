"""Shipped Prometheus rules: generated from the spec (no drift), valid, and unit-tested by promtool."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT, example

from emulator.observability.rules import rules_for
from emulator.spec import load_clusters

RULES = os.path.join(ROOT, "dashboards", "prometheus", "infemu-rules.yaml")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (Debian package prometheus; `make test` installs it when run as root)"
)


def test_shipped_rules_match_the_quickstart_spec():
    with open(RULES, encoding="utf-8") as fh:
        shipped = yaml.safe_load(fh)
    assert shipped == rules_for(load_clusters(example("quickstart.yaml"))[0].spec.slo)


def test_slo_thresholds_select_exact_bucket_boundaries():
    text = yaml.safe_dump(rules_for(load_clusters(example("pd-llama70b-h100.yaml"))[0].spec.slo))
    assert 'vllm:time_to_first_token_seconds_bucket{le="1.0"}' in text  # 1000 ms
    assert 'vllm:inter_token_latency_seconds_bucket{le="0.06"}' in text  # 60 ms: added to the buckets


@needs_promtool
def test_promtool_checks_and_unit_tests_the_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", RULES], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    tests = os.path.join(ROOT, "dashboards", "prometheus", "tests")
    r = subprocess.run([PROMTOOL, "test", "rules", "rules_test.yaml"], capture_output=True, text=True, cwd=tests)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_shipped_dashboard_matches_its_generator():
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("make_dashboard", os.path.join(ROOT, "tools", "make_dashboard.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(os.path.join(ROOT, "dashboards", "grafana", "infemu-fleet.json"), encoding="utf-8") as fh:
        assert json.load(fh) == module.dashboard()
