"""Chaos experiments (issue 13): declared faults in the simulator and on real processes, the
router's resilience (ejection, retries, backpressure, deadlines), and an accounting that loses
nothing. The simulator and the local cluster play the same schedule and must agree."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import httpx
import numpy as np
import pytest
import yaml
from conftest import ROOT, example, run_infemu

from emulator.errors import SpecError
from emulator.faults.schedule import resolve_faults
from emulator.router.backends import Backend
from emulator.router.resilience import RetryBudget, overloaded
from emulator.sim.simulator import RESTART_S, simulate
from emulator.spec import parse_cluster
from emulator.topology import place
from emulator.workload.plan import plan_for

CHAOS = yaml.safe_load(open(example("chaos.yaml"), encoding="utf-8"))  # noqa: SIM115


def _cluster(mutate=None):
    doc = copy.deepcopy(CHAOS)
    if mutate is not None:
        mutate(doc["spec"])
    return parse_cluster(doc)


def _sim(cluster) -> dict:
    return simulate(cluster, plan_for(cluster)).summary


# ---- the declared schedule ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fault,expected",
    [
        ({"kind": "kill", "atSeconds": 1, "durationSeconds": 2, "target": {"pool": "decode"}}, "a kill has no"),
        ({"kind": "slow", "atSeconds": 1, "target": {"pool": "decode"}}, "needs factor"),
        ({"kind": "hang", "target": {"pool": "decode"}}, "exactly one of atSeconds or afterRequests"),
        ({"kind": "hang", "atSeconds": 1, "target": {"instance": "decode-9"}}, "target.instance: 'decode-9'"),
        ({"kind": "partition", "atSeconds": 1, "between": [["prefill"], ["nope"]]}, "between[1][0]: 'nope'"),
        ({"kind": "link", "atSeconds": 1, "target": {"pool": "prefill"}}, "needs link"),
    ],
)
def test_bad_faults_name_the_field(fault, expected):
    with pytest.raises(SpecError) as exc:
        _cluster(lambda s: s.__setitem__("faults", [fault]))
    assert any(expected in line and "spec.faults[0]" in line for line in exc.value.problems), exc.value.problems


def test_faults_resolve_to_instances_pairs_and_groups():
    cluster = _cluster(
        lambda s: s.__setitem__(
            "faults",
            [
                {"kind": "slow", "atSeconds": 0, "factor": 2, "target": {"pool": "decode", "fraction": 0.5}},
                {
                    "kind": "link",
                    "atSeconds": 0,
                    "target": {"pool": "prefill", "peer": "decode-1"},
                    "link": {"cut": True},
                },
                {"kind": "partition", "afterRequests": 5, "between": [["prefill-0", "router"], ["decode"]]},
            ],
        )
    )
    slow, link, part = resolve_faults(cluster.spec, place(cluster.spec))
    assert slow.instances == ("decode-0",) and slow.factor == 2
    assert link.pairs() == [("prefill-0", "decode-1"), ("prefill-1", "decode-1")]
    assert part.groups == (("prefill-0", "router"), ("decode-0", "decode-1")) and part.after_requests == 5
    assert ("decode-1", "prefill-0") in part.pairs() and ("prefill-0", "decode-0") in part.pairs()


def test_retry_budget_and_admission():
    budget = RetryBudget(percent=20, min_per_second=0.1, window_s=10)
    for i in range(100):
        budget.record_request(i * 0.01)
    allowed = sum(budget.try_retry(1.0) for _ in range(50))
    assert allowed == 21  # 1 (floor: 0.1/s x 10 s) + 20% of 100
    backends = [Backend("a", "aggregated", "u", waiting=5), Backend("b", "aggregated", "u", waiting=3)]
    assert not overloaded(backends, 4) and overloaded(backends, 3) and not overloaded([], 1)


# ---- the simulator plays it --------------------------------------------------------------


def test_sim_chaos_example_loses_nothing_and_prices_each_fault():
    s = _sim(_cluster())
    assert s["lost"] == 0
    assert s["completed"] + s["failed"] == s["requests"]
    assert set(s["failed_by_reason"]) <= {"backend_failed"} and s["failed"] <= 0.03 * s["requests"]
    faults = {f["name"]: f for f in s["faults"]}
    assert list(faults) == ["kill-prefill", "slow-decode", "cut-kv", "hang-decode", "flap-kv"]
    kill = faults["kill-prefill"]
    assert kill["end_s"] - kill["start_s"] == pytest.approx(RESTART_S)
    slow = faults["slow-decode"]
    assert slow["during"]["tpot_ms_p99"] > 2.5 * slow["before"]["tpot_ms_p50"]  # decode-0 runs 3x slower
    for f in s["faults"]:
        for window in ("before", "during", "after"):
            assert f[window]["lost"] == 0


def test_sim_burst_past_the_queue_limit_is_rejected_not_queued():
    def burst(spec):
        spec["faults"] = []
        spec["router"]["admission"]["maxWaitingPerBackend"] = 8
        spec["workload"].update(rate=400, duration=1.0)

    s = _sim(_cluster(burst))
    assert s["failed_by_reason"].get("overloaded", 0) > 0 and s["lost"] == 0
    assert s["completed"] > 0


@pytest.mark.parametrize("fallback,code", [("recompute", None), ("fail", "request_failed")])
def test_sim_cut_kv_link_falls_back_as_configured(fallback, code):
    def cut(spec):
        spec["router"]["pdFallback"] = fallback
        spec["faults"] = [
            {"kind": "link", "atSeconds": 2, "durationSeconds": 4, "target": {"pool": "prefill"}, "link": {"cut": True}}
        ]

    s = _sim(_cluster(cut))
    during = s["faults"][0]["during"]
    assert during["sent"] > 10 and s["lost"] == 0
    if code is None:
        assert during["completed"] == during["sent"]  # the decode recomputed every prompt
    else:
        assert during["failed_by_reason"].get(code, 0) > 0.8 * during["sent"]


def test_sim_hang_is_ejected_and_traffic_moves():
    def hang(spec):
        spec["faults"] = [{"kind": "hang", "atSeconds": 2, "durationSeconds": 8, "target": {"instance": "prefill-0"}}]

    s = _sim(_cluster(hang))
    during = s["faults"][0]["during"]
    assert s["lost"] == 0 and during["completed"] >= 0.9 * during["sent"]


# ---- the local cluster plays it for real ---------------------------------------------------


@pytest.mark.slow
def test_chaos_example_on_real_processes_agrees_with_the_simulator(tmp_path):
    out = tmp_path / "out"
    r = run_infemu(  # at D=1 as the simulator's figures were checked, no pilots (a spec without a D gets them)
        "run", example("chaos.yaml"), "--out", str(out), "--time-dilation", "1", cwd=str(tmp_path), timeout=240
    )
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((out / "summary.json").read_text())
    sim = _sim(_cluster())
    instances = json.loads((out / "instances.json").read_text())
    assert run["lost"] == 0 and {n: i["restarts"] for n, i in instances.items()}["prefill-0"] == 1
    assert set(run["failed_by_reason"]) <= {"backend_failed"} and run["failed"] <= 0.05 * run["requests"]
    assert run["requests"] == sim["requests"]
    assert abs(run["completed"] - sim["completed"]) <= 4
    assert [f["name"] for f in run["faults"]] == [f["name"] for f in sim["faults"]]
    for real, model in zip(run["faults"], sim["faults"], strict=True):
        assert abs(real["start_s"] - model["start_s"]) < 0.3, real["name"]
    kill = run["faults"][0]
    assert 1.0 < kill["end_s"] - kill["start_s"] < 6.0  # SIGKILL, back-off, restart, ready
    slow = run["faults"][1]
    assert slow["during"]["tpot_ms_p99"] > 2.5 * slow["before"]["tpot_ms_p50"]
    html = (out / "report.html").read_text()
    assert "kill-prefill" in html


TWO = """
apiVersion: infemu.io/v1alpha1
kind: InferenceCluster
metadata: {name: two}
spec:
  model: llama-3.1-8b
  gpu: h100-sxm
  topology: {nodes: 1, gpusPerNode: 2}
  pools: [{name: agg, replicas: 2, maxNumSeqs: 4}]
  router:
    policy: round_robin
    admission: {maxWaitingPerBackend: 2, retryAfterS: 2}
    healthCheck: {intervalMs: 100, timeoutMs: 300, unhealthyThreshold: 2}
"""


def _router_view(router: str, headers: dict) -> dict:
    req = urllib.request.Request(f"{router}/admin/fault", headers=headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_live_faults_backpressure_and_supervision(tmp_path):
    from emulator.serve.internal import internal_headers

    spec = tmp_path / "two.yaml"
    spec.write_text(TWO)
    run_dir = tmp_path / "somewhere-else"
    r = run_infemu("up", str(spec), "--detach", "--json", "--run-dir", str(run_dir), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    token = json.loads((run_dir / "state.json").read_text())["token"]
    router = state["router"]
    header = internal_headers(token)
    try:
        # a hang: the router's health check ejects it within interval x threshold + timeout (+ margin)
        r = run_infemu("fault", "inject", "hang", "--instance", "agg-0", "--name", "h", "--run-dir", str(run_dir))
        assert r.returncode == 0, r.stderr
        t0 = time.monotonic()
        while _router_view(router, header)["agg-0"]["healthy"]:
            assert time.monotonic() - t0 < 3.0, "a hung backend was not ejected"
            time.sleep(0.05)
        with httpx.Client(timeout=30) as client:
            for _ in range(4):  # every request is served by the survivor meanwhile
                ok = client.post(
                    f"{router}/v1/completions", json={"model": "llama-3.1-8b", "prompt": "x", "max_tokens": 2}
                )
                assert ok.status_code == 200
        listing = json.loads(run_infemu("fault", "list", "--json", "--run-dir", str(run_dir)).stdout)
        assert listing["live"]["agg-0"]["hang"] is True and "h" in listing["active"]
        assert run_infemu("fault", "clear", "h", "--run-dir", str(run_dir)).returncode == 0
        t0 = time.monotonic()
        while not _router_view(router, header)["agg-0"]["healthy"]:
            assert time.monotonic() - t0 < 3.0, "a recovered backend was not re-admitted"
            time.sleep(0.05)

        # a partition between the router and agg-0: routed around, healed on clear
        r = run_infemu(
            "fault", "inject", "partition", "--between", "router", "agg-0", "--name", "p", "--run-dir", str(run_dir)
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert _router_view(router, header)["agg-0"]["unreachable"] is True
        with httpx.Client(timeout=30) as client:
            for _ in range(3):
                ok = client.post(
                    f"{router}/v1/completions", json={"model": "llama-3.1-8b", "prompt": "z", "max_tokens": 2}
                )
                assert ok.status_code == 200
        assert run_infemu("fault", "clear", "p", "--run-dir", str(run_dir)).returncode == 0
        assert _router_view(router, header)["agg-0"]["unreachable"] is False

        # a burst far past the queue limit: 429 with Retry-After and OpenAI's error JSON, never a hang
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": "llama-3.1-8b", "prompt": "y", "max_tokens": 64, "ignore_eos": True}
                return await asyncio.gather(*(client.post(f"{router}/v1/completions", json=body) for _ in range(60)))

        answers = asyncio.run(burst())
        rejected = [a for a in answers if a.status_code == 429]
        assert rejected and all(a.status_code in (200, 429) for a in answers)
        assert rejected[0].headers["Retry-After"] == "2" and rejected[0].json()["error"]["code"] == "overloaded"

        # a kill: the detached supervisor restarts the worker on its port, the router re-admits it, and
        # a slowdown injected before the kill is on it again (the GPU's, not the process's)
        r = run_infemu("fault", "inject", "slow", "--instance", "agg-1", "--factor", "3", "--name", "s1",
                       "--run-dir", str(run_dir))  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        r = run_infemu("fault", "inject", "kill", "--instance", "agg-1", "--run-dir", str(run_dir))
        assert r.returncode == 0 and "killed" in r.stdout
        t0 = time.monotonic()
        while True:
            saved = json.loads((run_dir / "state.json").read_text())
            agg1 = next(p for p in saved["processes"] if p["name"] == "agg-1")
            if agg1["restarts"] == 1 and _router_view(router, header)["agg-1"]["healthy"]:
                break
            assert time.monotonic() - t0 < 15, "the killed worker did not come back"
            time.sleep(0.1)
        while True:
            listing = json.loads(run_infemu("fault", "list", "--json", "--run-dir", str(run_dir)).stdout)
            if listing["live"]["agg-1"].get("slow") == 3.0:
                break
            assert time.monotonic() - t0 < 20, ("the slowdown was not re-applied", listing)
            time.sleep(0.2)
        assert (
            "s1: re-applied after a restart: agg-1: slow True: ok" in (run_dir / "logs" / "supervisor.log").read_text()
        )
        assert list(listing["active"]) == ["s1"]  # the kill is not an active fault
        assert run_infemu("fault", "clear", "s1", "--run-dir", str(run_dir)).returncode == 0
        # link set goes on past a member that does not answer (here: one made to hang)
        run_infemu("fault", "inject", "hang", "--instance", "agg-0", "--name", "h2", "--run-dir", str(run_dir))
        r = run_infemu("link", "set", "--from", "agg", "--to", "agg", "--cut", "--run-dir", str(run_dir), timeout=60)
        assert "agg-1 -> agg-0" in r.stdout and "failed: " in r.stderr and r.returncode == 1
        run_infemu("fault", "clear", "--all", "--run-dir", str(run_dir))
        # from any other folder: `status` lists it, `link set --reset` resets every link
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        listed = json.loads(run_infemu("status", "--json", cwd=str(elsewhere)).stdout)
        ours = next(c for c in listed if c["run_dir"] == str(run_dir))
        assert ours["router"] == router and {i["name"] for i in ours["instances"]} == {"agg-0", "agg-1"}
        assert ours["timing"] in ("faithful", "degraded", "no engine steps yet")  # the workers' own verdict
        r = run_infemu("link", "set", "--reset", "--run-dir", str(run_dir), cwd=str(elsewhere))
        assert r.returncode == 0 and r.stdout.count("every link reset") == 2, r.stdout + r.stderr
    finally:
        # `infemu down` with no argument, from another folder, finds a run started with --run-dir
        down = run_infemu("down", cwd=str(tmp_path / "elsewhere") if (tmp_path / "elsewhere").exists() else "/")
    assert "two (" in down.stdout and "processes stopped" in down.stdout


def _ctrl_c_as_at_a_terminal() -> None:
    """The child takes SIGINT as a program started at a terminal does. A test run started in the
    background of a non-interactive shell (``make test &``, nohup) ignores SIGINT, and its children
    inherit that: the interrupt tests below then waited out their timeouts on a Ctrl-C never seen."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_an_interrupted_run_still_writes_its_report(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        # at D=1, no pilots first: the run's progress is what this test interrupts
        [
            sys.executable,
            "-m",
            "emulator.cli",
            "run",
            example("quickstart.yaml"),
            "--time-dilation",
            "1",
            "--out",
            str(out),
        ],
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        preexec_fn=_ctrl_c_as_at_a_terminal,
    )
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # interrupt once requests are finishing
        if "/240 done" in line:
            break
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-1000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and 0 < summary["requests"] < 240


@pytest.mark.slow
def test_half_sent_headers_are_timed_out_and_the_router_keeps_serving(tmp_path):
    """800 half-sent requests once held 800 sockets forever: each is closed after the header deadline."""
    import socket

    from emulator.cluster import process

    spec = tmp_path / "two.yaml"
    spec.write_text(TWO)
    r = run_infemu("up", str(spec), "--detach", "--json", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    router = json.loads(r.stdout)["router"]
    host, port = router.removeprefix("http://").split(":")
    socks = []
    try:
        for _ in range(200):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")  # never finished
            socks.append(s)
        with httpx.Client(timeout=30) as client:  # the router still answers others meanwhile
            ok = client.post(f"{router}/v1/completions", json={"model": "llama-3.1-8b", "prompt": "x", "max_tokens": 2})
            assert ok.status_code == 200
        time.sleep(process.HEADER_TIMEOUT_S + 2)
        closed = 0
        for s in socks:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(socks)
    finally:
        for s in socks:
            s.close()
        run_infemu("down", cwd=str(tmp_path))


def test_sim_partition_cuts_pairs_and_the_router():
    def split(spec):
        spec["faults"] = [
            {
                "kind": "partition",
                "atSeconds": 2,
                "durationSeconds": 6,
                "between": [["prefill-0", "router"], ["decode-0"]],
            }
        ]

    cluster = _cluster(split)
    s = _sim(cluster)
    during = s["faults"][0]["during"]
    assert s["lost"] == 0 and during["completed"] == during["sent"]  # routed around, or recomputed


@pytest.mark.slow
def test_a_decode_killed_after_the_hand_off_never_leaves_a_stream_unterminated(tmp_path):
    """P/D: streams on a decode that dies end with an error event (or complete elsewhere), never silently;
    the simulator's count of such failures agrees."""

    def kill_decode(spec):
        spec["faults"] = [{"name": "kill-decode", "kind": "kill", "atSeconds": 4, "target": {"instance": "decode-0"}}]
        spec["workload"]["duration"] = 8

    doc = copy.deepcopy(CHAOS)
    kill_decode(doc["spec"])
    spec = tmp_path / "kill-decode.yaml"
    spec.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    r = run_infemu("run", str(spec), "--out", str(out), "--time-dilation", "1", cwd=str(tmp_path), timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((out / "summary.json").read_text())
    sim = _sim(_cluster(kill_decode))
    assert run["lost"] == 0 and sim["lost"] == 0
    assert set(run["failed_by_reason"]) <= {"backend_failed"}, run["failed_by_reason"]  # no "truncated"
    assert run["failed"] >= 1 and sim["failed"] >= 1  # streams in flight on decode-0 fail explicitly
    assert abs(run["failed"] - sim["failed"]) <= max(3, sim["failed"])


# ---- the operator's side (pure) ------------------------------------------------------------


def test_operator_plans_starts_flaps_and_clears_on_time():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "operator"))
    from infemu_operator.faults import plan_step

    cluster = _cluster()
    faults = {f.name: f for f in resolve_faults(cluster.spec, place(cluster.spec))}
    flap, kill = faults["flap-kv"], faults["kill-prefill"]
    assert plan_step([kill], 2.9, {}) == []
    (start,) = plan_step([kill], 3.0, {})
    assert start.action == "start"
    assert plan_step([kill], 9.0, {"kill-prefill": {"state": "Restarting"}}) == []  # the pod's return ends it
    (first,) = plan_step([flap], 19.1, {})
    assert first.action == "start" and first.cut is True
    (flip,) = plan_step([flap], 19.6, {"flap-kv": {"state": "Active", "cut": True}})
    assert flip.action == "flip" and flip.cut is False
    (clear,) = plan_step([flap], 22.0, {"flap-kv": {"state": "Active", "cut": False}})
    assert clear.action == "clear"
    assert plan_step([flap], 23.0, {"flap-kv": {"state": "Cleared"}}) == []


def test_a_fault_resource_resolves_against_its_cluster_and_names_bad_targets():
    from emulator.faults.resource import parse_fault_resource, resolve_resource

    body = {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "Fault",
        "metadata": {"name": "slow-decodes"},
        "spec": {"cluster": "chaos", "kind": "slow", "factor": 4, "durationSeconds": 30, "target": {"pool": "decode"}},
    }
    fault = resolve_resource(parse_fault_resource(body), _cluster())
    assert fault.name == "slow-decodes" and fault.instances == ("decode-0", "decode-1") and fault.factor == 4
    body["spec"]["target"] = {"instance": "decode-7"}
    with pytest.raises(SpecError) as exc:
        resolve_resource(parse_fault_resource(body), _cluster())
    assert exc.value.problems[0].startswith("spec.target.instance: 'decode-7'")
    body["spec"].pop("factor")
    with pytest.raises(SpecError) as exc:
        parse_fault_resource(body)
    assert "needs factor" in exc.value.problems[0]
    body["spec"].update(kind="burst", factor=10, target=None)
    with pytest.raises(SpecError) as exc:
        parse_fault_resource(body)
    assert "a burst is load, not a fault on pods" in exc.value.problems[0]


def _burst(spec):
    spec["faults"] = [{"name": "burst", "kind": "burst", "atSeconds": 6, "durationSeconds": 3, "factor": 50}]
    spec["router"]["admission"]["maxWaitingPerBackend"] = 8
    spec["workload"]["duration"] = 16


def test_sim_burst_fault_reports_rejections_and_recovery():
    s = _sim(_cluster(_burst))
    (burst,) = s["faults"]
    during, before = burst["during"], burst["before"]
    assert 800 < during["sent"] < 1000  # ~50 x 6 req/s over 3 s
    assert during["failed_by_reason"].get("overloaded", 0) > 0 and s["lost"] == 0
    assert before["failed"] == 0 and burst["recovery_s"] is not None


def test_a_burst_needs_an_open_loop_rate():
    def closed(spec):
        _burst(spec)
        spec["workload"] = {"arrival": {"type": "concurrency", "n": 4}, "requests": 50}

    with pytest.raises(SpecError) as exc:
        _cluster(closed)
    assert "spec.faults[0].kind: a burst multiplies an open-loop rate" in exc.value.problems[0]


def _net_names() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = {line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": " in line}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names |= {line.split()[0] for line in netns.splitlines() if line.strip()}
    return {n for n in names if n.startswith(("infemu-", "ibr", "iv"))}


@pytest.mark.slow
def test_two_interrupts_during_start_up_leave_no_network_behind(tmp_path):
    from emulator.net import tc

    ok, why = tc.available()
    if not ok:
        pytest.skip(f"the tc backend is unavailable here: {why}")
    before = _net_names()
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "up", example("chaos.yaml"), "--shaping", "tc"],
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT},
        preexec_fn=_ctrl_c_as_at_a_terminal,
    )
    deadline = time.monotonic() + 60
    while not (_net_names() - before):  # the namespaces exist: start-up is under way
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert _net_names() - before == set()


@pytest.mark.slow
def test_a_killed_router_is_restarted_on_its_port(tmp_path):
    spec = tmp_path / "two.yaml"
    spec.write_text(TWO)
    proc = subprocess.Popen(  # foreground `infemu up`: its supervisor restarts what dies
        [sys.executable, "-m", "emulator.cli", "up", str(spec), "--json"],
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    try:
        router = json.loads(proc.stdout.readline())["router"]
        run_dir = tmp_path / ".infemu" / "runs" / os.listdir(tmp_path / ".infemu" / "runs")[0]
        pids = {p["name"]: p["pid"] for p in json.loads((run_dir / "state.json").read_text())["processes"]}
        for name in ("router", "agg-0"):
            os.killpg(pids[name], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            try:
                ok = httpx.post(
                    f"{router}/v1/completions",
                    json={"model": "llama-3.1-8b", "prompt": "x", "max_tokens": 2},
                    timeout=5,
                )
                if ok.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the router did not come back"
            time.sleep(0.2)
        assert proc.poll() is None  # one death no longer stops the cluster
        saved = {p["name"]: p for p in json.loads((run_dir / "state.json").read_text())["processes"]}
        assert saved["router"]["restarts"] == 1 and saved["router"]["url"] == router
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_sim_slow_instance_triples_its_steps_and_the_router_sends_it_less():
    doc = yaml.safe_load(TWO)
    doc["spec"].update(
        router={"policy": "least_loaded"},
        slo={"ttftMs": 500, "tpotMs": 50},
        workload={
            "rate": 12,
            "duration": 20,
            "inputLength": {"type": "fixed", "value": 512},
            "outputLength": {"type": "fixed", "value": 128},
            "seed": 3,
        },
        faults=[{"kind": "slow", "atSeconds": 5, "durationSeconds": 10, "factor": 3, "target": {"instance": "agg-1"}}],
    )
    doc["spec"]["pools"][0]["maxNumSeqs"] = 64
    cluster = parse_cluster(doc)
    result = simulate(cluster, plan_for(cluster))
    during = [r for r in result.records if 6 <= r.arrival_s < 15 and r.ok]
    slowed = [r for r in during if r.instance == "agg-1"]
    fast = [r for r in during if r.instance == "agg-0"]
    assert len(slowed) < 0.45 * len(during)  # least-loaded sees its queue grow and sends it less
    tpot = lambda rs: float(np.median([r.tpot_ms for r in rs]))  # noqa: E731
    assert tpot(slowed) > 2.5 * tpot(fast)


def test_report_html_reads_well_and_draws_the_faults(tmp_path):
    from emulator.htmlreport import write_html
    from emulator.results import goodput

    cluster = _cluster()
    result = simulate(cluster, plan_for(cluster))
    slo = cluster.spec.slo
    path = tmp_path / "report.html"
    gp = goodput(result.records, slo.ttft_ms, slo.tpot_ms, result.summary["duration_s"])
    write_html(str(path), "chaos", result.records, result.summary, gp, slo, {})
    page = path.read_text()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 may spell "e+0" by chance
    assert "{'" not in text and "e+0" not in text  # no Python dicts, no scientific notation
    assert "ms</td>" in page and "%</td>" in page and "first arrival to last completion" in page
    assert "<h2>Faults</h2>" in page and all(f in page for f in ("kill-prefill", "slow-decode", "flap-kv"))
    assert page.count("data:image/png;base64,") >= 3  # CDFs, attainment over time, failures by reason


def test_a_kill_fault_is_refused_where_a_process_hosts_several_instances():
    def packed(spec):
        spec["faults"] = [{"kind": "kill", "atSeconds": 1, "target": {"pool": "decode"}}]
        spec["emulation"] = {"instancesPerProcess": 2}

    with pytest.raises(SpecError) as exc:
        _cluster(packed)
    assert any(
        "spec.faults[0].kind: a kill is a SIGKILL" in p and "instancesPerProcess" in p for p in exc.value.problems
    )


def test_tc_shaping_is_refused_for_packed_instances_and_auto_paces_them_in_process():
    from emulator.cluster.local import ClusterStartError, LocalCluster

    lc = LocalCluster("unused.yaml", "c", run_dir="/nonexistent", shaping="tc")
    with pytest.raises(ClusterStartError) as exc:
        lc._choose_shaping(packed=True)
    assert "instancesPerProcess to 1" in exc.value.problems[0]
    auto = LocalCluster("unused.yaml", "c", run_dir="/nonexistent", shaping="auto")
    assert auto._choose_shaping(packed=True) == "inproc" and "instancesPerProcess" in auto.shaping_reason


def test_a_live_fault_is_recorded_only_where_it_took_and_ends_when_its_duration_passes(tmp_path, monkeypatch):
    """`infemu fault inject` on a running cluster: a fault that reached none of its targets is not
    listed as active (it once was, and `fault list` then claimed a slowdown nobody had); a kill is over
    once sent; a fault with durationSeconds is cleared by a detached process when they pass (it was
    only informational). The injector is replaced by one that records what it is asked."""
    from emulator.cluster.local import ProcessInfo, RunState
    from emulator.faults import live

    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    state = RunState("quickstart", example("quickstart.yaml"), str(run_dir), router="http://127.0.0.1:9")
    state.processes = [ProcessInfo("agg-0", "aggregated", 1, "http://127.0.0.1:9", "", [], 0)]
    state.save()
    calls: list[tuple[str, bool]] = []
    reachable = {"ok": False}

    def apply(self, fault, on, cut=None):
        calls.append((fault.name, on))
        return [f"agg-0: {fault.kind} {on}: " + ("ok" if reachable["ok"] else "failed: connection refused")]

    monkeypatch.setattr(live.LocalInjector, "apply", apply)
    lines = live.inject(str(run_dir), {"kind": "slow", "name": "s", "factor": 3, "target": {"instance": "agg-0"}})
    assert lines[-1] == "s: reached none of its targets; not recorded as active"
    assert live.listing(str(run_dir))["active"] == {}
    reachable["ok"] = True
    live.inject(str(run_dir), {"kind": "kill", "target": {"instance": "agg-0"}})
    assert live.listing(str(run_dir))["active"] == {}  # a kill is over once sent
    lines = live.inject(
        str(run_dir),
        {"kind": "hang", "name": "h", "durationSeconds": 0.5, "target": {"instance": "agg-0"}},
    )
    assert lines[-1] == "h: ends in 0.5 s (durationSeconds 0.5)"
    assert "h" in live.listing(str(run_dir))["active"]
    # the detached process runs the real injector (no monkeypatch there): it reaches nobody at port 9,
    # but it clears the record, ends the timeline entry and says so in logs/faults.log
    t0 = time.monotonic()
    while live.listing(str(run_dir))["active"]:
        assert time.monotonic() - t0 < 20, (run_dir / "logs" / "faults.log").read_text()
        time.sleep(0.1)
    timeline = live.listing(str(run_dir))["timeline"]
    assert next(e for e in timeline if e["name"] == "h")["ended"] is not None
    assert "expire agg-0: hang False" in (run_dir / "logs" / "faults.log").read_text()
    # a run at an overridden time dilation (`infemu run --time-dilation 3`) times it by that one
    state.time_dilation = 3.0
    state.save()
    lines = live.inject(str(run_dir), {"kind": "hang", "name": "h2", "durationSeconds": 0.3,
                                       "target": {"instance": "agg-0"}})  # fmt: skip
    assert lines[-1] == "h2: ends in 0.9 s (durationSeconds 0.3)"
    # cleared by hand first: the expiry finds nothing of its own to clear
    live.clear(str(run_dir), "h2")
    since = time.time()
    assert live.expire(str(run_dir), "h2", since) == ["h2: already cleared"]


def test_a_fault_injected_by_hand_during_a_run_stays_on_record_beside_the_runs_schedule(tmp_path, monkeypatch, capsys):
    """`infemu fault inject` during `infemu run`: the run's fault runner once rewrote faults.json's
    timeline with its own, so the hand-injected fault's entry vanished (and its end could not be
    recorded). Now each writer keeps to its own keys under one lock, and `fault list` also names the
    scheduled faults that are on."""
    from emulator.cli import main
    from emulator.cluster.local import ProcessInfo, RunState
    from emulator.faults import live, local, record
    from emulator.faults.schedule import Fault

    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    state = RunState("quickstart", example("quickstart.yaml"), str(run_dir), router="http://127.0.0.1:9")
    state.processes = [ProcessInfo("agg-0", "aggregated", 1, "http://127.0.0.1:9", "", [], 0)]
    state.save()
    monkeypatch.setattr(local.LocalInjector, "apply", lambda self, fault, on, cut=None: [f"agg-0: {on}: ok"])
    slow = Fault(0, "slow-0", "slow", 0.0, None, 10.0, instances=("agg-0",), factor=3.0)
    runner = local.FaultRunner(local.LocalInjector(state), [slow], 1.0, lambda: 0, str(run_dir))
    runner.t0 = 0.0
    live.inject(str(run_dir), {"kind": "hang", "name": "h", "target": {"instance": "agg-0"}})
    runner.tick(0.1)  # the schedule's slowdown begins: the runner writes its part
    view = live.listing(str(run_dir))
    assert list(view["active"]) == ["h"] and [e["name"] for e in view["timeline"]] == ["h"]
    assert [(e["name"], e["end_s"]) for e in view["schedule"]] == [("slow-0", None)]
    assert main(["fault", "list", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "active: h (hang)" in out and "scheduled, on now: slow-0 (slow, since 0.1 s)" in out
    live.clear(str(run_dir), "h")
    runner.tick(10.5)  # the slowdown ends
    view = live.listing(str(run_dir))
    assert view["active"] == {} and view["timeline"][0]["ended"] is not None
    assert view["schedule"][0]["end_s"] == pytest.approx(10.5)

    def append(k: int) -> None:
        for i in range(25):
            with record.updating(str(run_dir)) as data:
                data["log"].append(f"{k}-{i}")

    with record.updating(str(run_dir)) as data:
        data["log"] = []
    threads = [threading.Thread(target=append, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(record.read(str(run_dir))["log"]) == sorted(f"{k}-{i}" for k in range(6) for i in range(25))


def test_a_scheduled_kill_is_over_when_the_supervisor_reports_every_killed_instance_back():
    """The kill's end (its recovery in the accounting) comes from the supervisor, which watches the
    restarted instances' readiness: not from the runner's own probes, which once held up its ticks."""
    from emulator.cluster.local import ProcessInfo, RunState
    from emulator.faults import local
    from emulator.faults.schedule import Fault

    state = RunState("c", "unused.yaml", "/nonexistent")
    state.processes = [ProcessInfo(n, "aggregated", 10**7 + k, f"http://127.0.0.1:{9000 + k}") for k, n in
                       enumerate(("agg-0", "agg-1"))]  # fmt: skip

    class Injector(local.LocalInjector):
        def apply(self, fault, on, cut=None):
            return [f"{fault.name} {on}"]

    kill = Fault(0, "kill-both", "kill", 1.0, None, None, instances=("agg-0", "agg-1"))
    runner = local.FaultRunner(Injector(state), [kill], 1.0, lambda: 0, "/nonexistent")
    runner._save = lambda: None
    runner.t0 = 0.0
    runner.tick(1.0)
    runner.tick(30.0)  # no time limit of its own: still on
    assert runner.timeline[0]["end_s"] is None
    assert runner.reapply({"agg-0"}) == [] and runner.timeline[0]["end_s"] is None  # one of two back
    runner.reapply({"agg-1"})
    assert runner.timeline[0]["end_s"] is not None and runner.active[0].cleared


def test_a_scheduled_fault_goes_back_on_a_member_its_supervisor_restarted(monkeypatch):
    """A run's slowdown or link fault belongs to the GPU or the network: when a kill (or a crash)
    restarts its instance mid-fault, the supervisor, once the instance answers ready, tells the fault
    runner, which applies it again; once per restart, and not after the fault's own end; a member
    that was down as the fault started gets it once it is back."""
    from emulator.cluster import supervisor as sup
    from emulator.cluster.local import ProcessInfo, RunState
    from emulator.faults import local
    from emulator.faults.schedule import Fault

    state = RunState("c", "unused.yaml", "/nonexistent")
    state.processes = [
        ProcessInfo(n, "aggregated", 10**7 + k, f"http://127.0.0.1:{9000 + k}", cmd=["true"])
        for k, n in enumerate(("agg-0", "agg-1"))
    ]
    port = {"agg-0": "9000", "agg-1": "9001"}

    class Injector(local.LocalInjector):
        def __init__(self) -> None:
            super().__init__(state)
            self.applied: list[tuple[str, bool]] = []

        def apply(self, fault, on, cut=None):
            self.applied.append((fault.name, on))
            return [f"{fault.name} {on}"]

    ready = {"agg-0": True, "agg-1": False}  # agg-1 is restarting as the run begins
    monkeypatch.setattr(
        sup, "http_status", lambda url, timeout=1.0: 200 if any(ready[n] for n in ready if port[n] in url) else 503
    )
    monkeypatch.setattr(sup, "launch", lambda cmd, log, token: type("P", (), {"pid": 10**7 + 99})())
    monkeypatch.setattr(sup.Supervisor, "_dead", lambda self, w: False)  # deaths come from restart() below
    monkeypatch.setattr(RunState, "save", lambda self: None)
    supervisor = sup.Supervisor(state)
    supervisor.on_ready = []  # no live faults here: the run's schedule only
    slow = Fault(0, "slow-0", "slow", 0.0, None, 10.0, instances=("agg-0",), factor=3.0)
    hang = Fault(1, "hang-1", "hang", 0.0, None, 10.0, instances=("agg-1",))
    injector = Injector()
    runner = local.FaultRunner(injector, [slow, hang], 1.0, lambda: 0, "/nonexistent")
    monkeypatch.setattr(runner, "_save", lambda: None)
    supervisor.on_ready.append(runner.reapply)
    runner.t0 = 0.0
    runner.tick(0.1)
    assert injector.applied == [("slow-0", True), ("hang-1", True)]

    def restart(name: str) -> None:
        """The supervisor found the process dead and its back-off is over: it restarts it."""
        supervisor.watches[name].due = time.monotonic() - 1
        supervisor.poll_once()

    ready["agg-0"] = False  # agg-0 killed and restarted: not ready yet, so nothing is sent
    restart("agg-0")
    supervisor.poll_once()
    assert len(injector.applied) == 2
    ready["agg-0"] = True
    supervisor.poll_once()
    supervisor.poll_once()  # once per restart
    assert injector.applied[2:] == [("slow-0", True)]
    assert "slow-0: re-applied after agg-0 restarted" in runner.log
    ready["agg-1"] = True  # agg-1 is back now: its hang, sent while it was down, goes on
    restart("agg-1")
    supervisor.poll_once()
    assert injector.applied[3:] == [("hang-1", True)]
    runner.tick(10.5)  # the faults' end clears them
    ready["agg-0"] = True
    restart("agg-0")  # and a restart after the end does not bring one back
    assert injector.applied[4:] == [("slow-0", False), ("hang-1", False)]
