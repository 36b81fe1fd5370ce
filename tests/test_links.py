"""The inproc shaping backend: pacing accuracy, fair sharing, and live link changes on a cluster."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import openai
import pytest
from conftest import ROOT, example, metric_value

from emulator.net.inproc import PacedLink, byte_scale


async def _send(link: PacedLink, nbytes: int) -> float:
    async def write(chunk: bytes) -> None:
        await asyncio.sleep(0)

    return await link.send(nbytes, write)


async def test_paced_transfer_time_is_bytes_over_rate_plus_latency():
    link = PacedLink("ib", 20e6, 0.005)
    took = await _send(link, 3_000_000)
    assert took == pytest.approx(0.005 + 3e6 / 20e6, rel=0.05)


async def test_two_flows_share_a_link_and_another_tier_is_unaffected():
    shared = PacedLink("ib", 20e6, 0.0)
    other = PacedLink("eth", 10e6, 0.0)
    a, b, c = await asyncio.gather(_send(shared, 2_000_000), _send(shared, 2_000_000), _send(other, 1_000_000))
    alone = 2e6 / 20e6
    assert a == pytest.approx(2 * alone, rel=0.10) and b == pytest.approx(2 * alone, rel=0.10)  # half each
    assert c == pytest.approx(1e6 / 10e6, rel=0.05)


async def test_live_rate_change_applies_to_the_rest_of_a_transfer():
    link = PacedLink("ib", 20e6, 0.0)
    task = asyncio.ensure_future(_send(link, 4_000_000))  # 0.2 s at the full rate
    await asyncio.sleep(0.05)
    link.set(rate_bytes_per_s=5e6)  # the remaining ~3 MB now take ~0.6 s
    took = await task
    assert took == pytest.approx(0.05 + 3e6 / 5e6, rel=0.10)


def test_byte_scale_keeps_wire_rates_low_and_never_below_one():
    assert byte_scale(200e9) == pytest.approx(5000)
    assert byte_scale(1e6) == 1.0


def _kv_seconds(url: str) -> tuple[float, float]:
    return (metric_value(url, "infemu_kv_transfer_seconds_sum"), metric_value(url, "infemu_kv_transfer_seconds_count"))


@pytest.mark.slow
def test_link_set_degrades_cuts_and_resets_a_running_cluster(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}

    def infemu(*args):
        return subprocess.run(
            [sys.executable, "-m", "emulator.cli", *args],
            capture_output=True,
            text=True,
            cwd=str(tmp_path),
            timeout=120,
            env=env,
        )

    r = infemu("up", example("pd-llama70b-h100.yaml"), "--detach", "--json")
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    decode = next(i["url"] for i in state["instances"] if i["role"] == "decode")
    client = openai.OpenAI(base_url=f"{state['router']}/v1", api_key="unused", max_retries=0, timeout=30)

    def one() -> float:
        before = _kv_seconds(decode)
        client.completions.create(
            model="llama-3.1-70b", prompt=list(range(1, 1001)), max_tokens=2, extra_body={"ignore_eos": True}
        )
        after = _kv_seconds(decode)
        assert after[1] == before[1] + 1
        return after[0] - before[0]

    try:
        base = one()
        t0 = time.monotonic()
        r = infemu("link", "set", "--from", "prefill", "--to", "decode", "--bandwidth-factor", "0.01")
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 1.0 + 2.0  # the CLI itself starts Python; the change is immediate
        slow = one()
        modelled = 1000 * 2 * 80 * 8 * 128 * 2 / (4 * 50e9 * 0.01)  # 1000 tokens over 4 NDR NICs at 1%
        assert slow == pytest.approx(modelled, rel=0.25) and slow > 10 * base
        assert infemu("link", "set", "--from", "prefill", "--to", "decode", "--cut").returncode == 0
        # a cut link fails the pull at once; router.pdFallback (recompute, the default) has the decode
        # instance prefill the prompt itself: the request completes and the fallback is counted
        done = client.completions.create(
            model="llama-3.1-70b", prompt=list(range(1, 500)), max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert done.usage.completion_tokens == 3
        assert metric_value(decode, "infemu_kv_transfer_failures_total", outcome="recompute") == 1
        assert infemu("link", "set", "--from", "prefill", "--to", "decode", "--reset").returncode == 0
        assert one() < 5 * base + 0.01
    finally:
        infemu("down")
