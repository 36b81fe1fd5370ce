"""The tc backend: the static tree, accuracy per tier, isolation between tiers, a P/D cluster in
network namespaces, and cleanup after a run, SIGTERM, or SIGKILL followed by `infemu down`.
Tests that build namespaces need root; they skip with the reason otherwise (CI runs as root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest
from conftest import ROOT, example, metric_value, run_infemu

from emulator.net.probe import Transfer, measure
from emulator.net.tc import WIRE_PER_PAYLOAD, TierClass, available, tree_commands

TC_OK, TC_WHY = available() if os.geteuid() == 0 else (False, "not root")
needs_tc = pytest.mark.skipif(not TC_OK, reason=f"tc backend unavailable: {TC_WHY}")


def test_tree_is_static_tos_classified_with_a_tbf_leaf_per_tier():
    cmds = [
        " ".join(c) for c in tree_commands("eth0", [TierClass("scale-up", 25e6, 10), TierClass("scale-out", 5e6, 20)])
    ]
    assert cmds[0].startswith("tc qdisc replace dev eth0 root handle 1: htb default 99")
    assert any("classid 1:10 htb rate" in c for c in cmds) and any("parent 1:10 handle 10: tbf" in c for c in cmds)
    assert any("match ip tos 0x20 0xfc flowid 1:10" in c for c in cmds)
    assert any("match ip tos 0x40 0xfc flowid 1:20" in c for c in cmds)
    c = TierClass("scale-out", 5e6, 20)
    assert c.wire_bits_per_s == int(5e6 * 8 * 1514 / 1448) and WIRE_PER_PAYLOAD == 1514 / 1448
    assert c.burst_bytes >= 64 * 1024
    assert not any(p in " ".join(cmds) for p in ("10.", "dst", "src"))  # no peer addresses needed


THREE_TIERS = [  # NVLink-, IB- and Ethernet-class after byte scaling and dilation
    Transfer("scale-up", 40e6, 8_000_000, 0.010),
    Transfer("scale-out", 10e6, 2_000_000, 0.015),
    Transfer("pcie", 2.5e6, 2_000_000, 0.050),
]


@pytest.mark.parametrize("backend", ["inproc", pytest.param("tc", marks=needs_tc)])
def test_three_tiers_at_once_are_each_within_5_percent(backend):
    took = measure(backend, THREE_TIERS)
    for t, got in zip(THREE_TIERS, took, strict=True):
        assert got == pytest.approx(t.expected_s, rel=0.05), (backend, t, got)


@needs_tc
def test_tc_flows_share_a_tier_and_leave_other_tiers_alone():
    transfers = [
        Transfer("scale-out", 10e6, 2_000_000),
        Transfer("scale-out", 10e6, 2_000_000),
        Transfer("scale-up", 20e6, 4_000_000),
    ]
    a, b, other = measure("tc", transfers)
    assert max(a, b) == pytest.approx(0.4, rel=0.10)  # the tier carried both at its rate
    assert other == pytest.approx(0.2, rel=0.05)  # another tier is unaffected
    # note: this kernel offers no fair-queueing qdisc (sfq/fq/fq_codel), so the split between the
    # two flows inside one class is TCP's, not exactly half; the inproc backend splits exactly.


def _leftovers() -> list[str]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found = [line.split()[0] for line in ns.splitlines() if line.startswith("infemu-")]
    found += [
        line.split(": ")[1].split("@")[0]
        for line in links.splitlines()
        if line.split(": ")[1].startswith(("ibr", "iv"))
    ]
    return found


@pytest.mark.slow
@needs_tc
def test_pd_example_runs_under_tc_and_down_removes_everything(tmp_path):
    before = set(_leftovers())
    r = run_infemu("up", example("pd-llama70b-h100.yaml"), "--detach", "--json", "--shaping", "tc", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "shaping: tc" in r.stderr
    state = json.loads(r.stdout)
    assert all(i["url"].startswith("http://10.213.") for i in state["instances"])
    assert set(_leftovers()) - before
    client = openai.OpenAI(base_url=f"{state['router']}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(
        model="llama-3.1-70b", prompt=list(range(1, 1201)), max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert done.usage.completion_tokens == 4
    r = run_infemu("down", cwd=str(tmp_path))
    assert "removed" in r.stdout
    assert not set(_leftovers()) - before


@pytest.mark.slow
@needs_tc
def test_sigterm_and_sigkill_of_the_launcher_leave_nothing_after_down(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    before = set(_leftovers())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(
            [sys.executable, "-m", "emulator.cli", "up", example("quickstart.yaml"), "--json", "--shaping", "tc"],
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert json.loads(proc.stdout.readline())["router"]
        assert set(_leftovers()) - before
        proc.send_signal(sig)
        proc.wait(timeout=30)
        if sig == signal.SIGKILL:  # nothing could clean up: `infemu down` finishes the job
            time.sleep(0.2)
            assert set(_leftovers()) - before
            run_infemu("down", cwd=str(tmp_path))
        assert not set(_leftovers()) - before, sig


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inproc", pytest.param("tc", marks=needs_tc)])
def test_pd_kv_transfer_time_in_metrics_matches_the_tier(tmp_path, backend):
    """D=20 stretches a ~5 ms KV transfer to ~100 ms of wall time, well above timer jitter."""
    import yaml

    with open(example("pd-llama70b-h100.yaml"), encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    doc["spec"]["emulation"] = {"timeDilation": 20}
    spec = tmp_path / "pd.yaml"
    spec.write_text(yaml.safe_dump(doc))
    r = run_infemu("up", str(spec), "--detach", "--json", "--shaping", backend, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    try:
        client = openai.OpenAI(base_url=f"{state['router']}/v1", api_key="unused", max_retries=0, timeout=120)
        client.completions.create(
            model="llama-3.1-70b", prompt=list(range(1, 3001)), max_tokens=2, extra_body={"ignore_eos": True}
        )
        decode = next(i["url"] for i in state["instances"] if i["role"] == "decode")
        seconds = metric_value(decode, "infemu_kv_transfer_seconds_sum")
        # 3000 tokens x 327,680 B over the prefill's 4 ConnectX-7 NICs (4 x 50 GB/s) + 15 us
        expected = 15e-6 + 3000 * 327_680 / (4 * 50e9)
        assert seconds == pytest.approx(expected, rel=0.05), (backend, seconds, expected)
    finally:
        run_infemu("down", cwd=str(tmp_path))
