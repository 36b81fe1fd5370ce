"""`infemu up` as real processes: the official openai client through the router, P/D with a real
KV pull, a backend killed mid-run, and no process left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import ROOT, example, metric_value, run_infemu

pytestmark = pytest.mark.slow


def emulator_pids() -> list[int]:
    """Live infemu worker/router processes, read from /proc (no procps needed)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                state = fh.read().split(") ", 1)[1][0]
        except OSError:
            continue
        if b"emulator.cluster.process" in cmd and state != "Z":
            pids.append(int(entry))
    return pids


@pytest.fixture
def pd_cluster(tmp_path):
    r = run_infemu("up", example("pd-llama70b-h100.yaml"), "--detach", "--json", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    yield state
    run_infemu("down", cwd=str(tmp_path))


def test_openai_client_streams_through_the_pd_router_with_a_real_kv_pull(pd_cluster, tmp_path):
    assert set(pd_cluster) == {"router", "instances"}
    assert {(i["name"], i["role"]) for i in pd_cluster["instances"]} == {
        ("prefill-0", "prefill"),
        ("prefill-1", "prefill"),
        ("decode-0", "decode"),
    }
    client = openai.OpenAI(base_url=f"{pd_cluster['router']}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="llama-3.1-70b",
        messages=[{"role": "user", "content": "tell me about links " * 50}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks, usage, ids = 0, None, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
        if chunk.usage:
            usage = chunk.usage
    assert chunks == 12
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")  # one id per completion, as vLLM and OpenAI
    assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12
    decode = next(i["url"] for i in pd_cluster["instances"] if i["role"] == "decode")
    kv_per_token = 2 * 80 * 8 * 128 * 2  # 2 · layers · kv_heads · head_dim · bf16 bytes
    assert metric_value(decode, "infemu_kv_transfer_bytes_total") == kv_per_token * usage.prompt_tokens

    before = metric_value(decode, "infemu_kv_transfer_bytes_total")
    done = client.completions.create(
        model="llama-3.1-70b", prompt=list(range(100, 1100)), max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert done.usage.prompt_tokens == 1000 and done.usage.completion_tokens == 5
    assert metric_value(decode, "infemu_kv_transfer_bytes_total") - before == kv_per_token * 1000
    # the decode side counts those prompts as vLLM does: received over a KV transfer, computed by nobody here
    transferred = metric_value(decode, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    assert transferred == usage.prompt_tokens + 1000
    assert metric_value(decode, "vllm:prompt_tokens_by_source_total", source="local_compute") == 0

    # the raw stream: events separated by exactly one blank line, and the caller's X-Request-Id names it
    body = {"model": "llama-3.1-70b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    raw = httpx.post(
        f"{pd_cluster['router']}/v1/chat/completions", json=body, headers={"X-Request-Id": "exp-42"}, timeout=30
    ).text
    events = raw.split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1]), raw
    assert {json.loads(e[6:])["id"] for e in events[:-2]} == {"chatcmpl-exp-42"}


def test_hostile_input_through_the_router_is_a_4xx_and_ejects_no_backend(pd_cluster):
    router = pd_cluster["router"]
    hostile = [
        (b'{"model":"llama-3.1-70b","prompt":"\\ud800","max_tokens":2}', {}),  # served: a strange token
        (b'{"model":"llama-3.1-70b","prompt":' + b"[" * 1000 + b"]" * 1000 + b"}", {}),
        (b'{"model":"llama-3.1-70b","prompt":"hi"}', {"Content-Encoding": "gzip"}),
        (b'{"model":"llama-3.1-70b","prompt":"hi","max_tokens":' + b"9" * 5000 + b"}", {}),
        (
            b'{"model":"llama-3.1-70b","prompt":"hi","max_tokens":2}',
            {"Content-Type": "application/json; charset=bogus"},
        ),
        (b'{"model":"llama-3.1-70b","messages":["hi"]}', {}),
    ]
    for i, (raw, headers) in enumerate(hostile):
        path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        r = httpx.post(
            f"{router}{path}", content=raw, headers={"Content-Type": "application/json", **headers}, timeout=30
        )
        assert r.status_code < 500, (i, r.status_code, r.text)
    # every backend is still in service, and a good request goes through
    for inst in pd_cluster["instances"]:
        assert metric_value(router, "infemu_router_backend_healthy", backend=inst["name"]) == 1.0, inst["name"]

    # a client's kv_transfer_params never reach a worker: dropped by the router, refused by the worker
    kv = {"do_remote_prefill": True, "remote_url": "http://127.0.0.1:9", "remote_request_id": "x", "prompt_tokens": 1}
    body = {"model": "llama-3.1-70b", "prompt": "hi", "max_tokens": 3, "ignore_eos": True, "kv_transfer_params": kv}
    r = httpx.post(f"{router}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    decode = next(i["url"] for i in pd_cluster["instances"] if i["role"] == "decode")
    r = httpx.post(f"{decode}/v1/completions", json=body, timeout=30)
    assert r.status_code == 403, r.text

    # nor do the launcher's own headers: a client's "probe" is an ordinary request, run by the engine
    probe = {"model": "llama-3.1-70b", "prompt": "hi", "max_tokens": 3, "ignore_eos": True}
    r = httpx.post(f"{router}/v1/completions", json=probe, headers={"X-Infemu-Probe": "1"}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_down_leaves_no_process_behind(tmp_path):
    before = set(emulator_pids())
    run_dir = str(tmp_path / "rd")
    r = run_infemu("up", example("quickstart.yaml"), "--detach", "--json", "--run-dir", run_dir, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    mine = set(emulator_pids()) - before
    assert len(mine) >= 2
    r = run_infemu("down", "/elsewhere", "--run-dir", run_dir, cwd=str(tmp_path))
    assert r.returncode == 2 and "two run directories given" in r.stderr
    r = run_infemu("down", "--run-dir", run_dir, cwd=str(tmp_path))  # the flag `up` took
    assert "processes stopped" in r.stdout
    assert not mine & set(emulator_pids())


def test_foreground_up_stops_its_children_on_sigterm(tmp_path):
    before = set(emulator_pids())
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "up", example("quickstart.yaml"), "--json"],
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    line = proc.stdout.readline()
    assert json.loads(line)["router"].startswith("http://127.0.0.1:")
    children = set(emulator_pids()) - before
    assert children
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not children & set(emulator_pids())


def replicas_spec(name: str, replicas: int, extra: str = "") -> str:
    """One aggregated pool of Llama-3.1-8B replicas behind a round-robin router."""
    return f"""
apiVersion: infemu.io/v1alpha1
kind: InferenceCluster
metadata: {{name: {name}}}
spec:
  model: llama-3.1-8b
  gpu: h100-sxm
  topology: {{nodes: 1, gpusPerNode: {replicas}}}
  pools: [{{name: agg, replicas: {replicas}}}]
  router: {{policy: round_robin}}
{extra}"""


TWO_REPLICAS = replicas_spec("two", 2)


def up_detached(tmp_path, spec_text: str) -> dict:
    """`infemu up --detach --json` on the spec; the caller runs `infemu down`."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    r = run_infemu("up", str(spec), "--detach", "--json", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_killed_backend_gives_retries_before_the_first_byte_and_errors_after(tmp_path):
    state = up_detached(tmp_path, TWO_REPLICAS)
    try:
        client = openai.OpenAI(base_url=f"{state['router']}/v1", api_key="unused", max_retries=0, timeout=20)
        stream = client.completions.create(
            model="llama-3.1-8b", prompt="a long answer", max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
        )
        it = iter(stream)
        next(it)  # the first token arrived: from now on a failure must be an explicit error
        busy = max(state["instances"], key=lambda i: metric_value(i["url"], "vllm:num_requests_running"))
        run_dir = tmp_path / ".infemu" / "runs" / os.listdir(tmp_path / ".infemu" / "runs")[0]
        processes = json.loads((run_dir / "state.json").read_text())["processes"]
        os.killpg(next(p["pid"] for p in processes if p["name"] == busy["name"]), signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(openai.APIError) as exc:
            for _ in it:
                pass
        assert "failed mid-stream" in str(exc.value) or "ended the stream early" in str(exc.value)
        assert time.monotonic() - t0 < 10  # no hung client
        # new requests right after the kill: retried on the survivor before any byte was sent
        for _ in range(4):
            ok = client.completions.create(
                model="llama-3.1-8b", prompt="again", max_tokens=3, extra_body={"ignore_eos": True}
            )
            assert ok.usage.completion_tokens == 3
    finally:
        run_infemu("down", cwd=str(tmp_path))


def test_infemu_run_reports_the_sim_summary_keys_and_writes_the_report(tmp_path):
    from emulator.results import SUMMARY_KEYS

    before = set(emulator_pids())
    r = run_infemu(
        "run",
        example("quickstart.yaml"),
        "--requests",
        "20",
        "--rate",
        "10",
        "--output-len",
        "64",
        "--out",
        "rep",
        "--json",
        "--shaping",
        "inproc",
        "--time-dilation",
        "2",
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert list(summary) == list(SUMMARY_KEYS) and summary["completed"] == 20 and summary["failed"] == 0
    assert "20/20 done" in r.stderr  # live progress
    lines = (tmp_path / "rep" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 20 and json.loads(lines[0])["ttft_ms"] > 0
    assert json.loads((tmp_path / "rep" / "summary.json").read_text()) == summary
    assert "agg-0" in json.loads((tmp_path / "rep" / "instances.json").read_text())
    # --time-dilation reached the workers: their steps lasted twice as long, the client divided by two and the
    # TPOT matches the simulator's (a worker left at the spec's D=1 would read 50% short)
    trust = json.loads((tmp_path / "rep" / "trust.json").read_text())
    assert trust["time_dilation"] == 2 and abs(trust["vs_simulator"]["tpot_mean"]) < 0.05, trust
    # the client measured the way back of its first tokens (the workers took it out of the model's time)
    path = trust["http_path"]
    assert path["first_tokens_measured"] == 20 and 0 < path["way_back_ms"] < 1000 and path["idle_round_trip_ms"] > 0
    assert not set(emulator_pids()) - before


def test_infemu_run_closed_loop_concurrency(tmp_path):
    r = run_infemu(
        "run",
        example("quickstart.yaml"),
        "--concurrency",
        "3",
        "--requests",
        "9",
        "--output-len",
        "8",
        "--json",
        "--shaping",
        "inproc",
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completed"] == 9
    # the spec sets no time dilation, and a pilot would be the whole plan: it runs at D=1 and says why
    assert "the plan's 9 requests are no more than one pilot: running at D=1" in r.stderr
    assert "pilot 1" not in r.stderr


@pytest.mark.slow
def test_a_spec_without_a_time_dilation_runs_at_the_one_its_pilots_chose(tmp_path):
    """`infemu run` of a spec that leaves the dilation to the host: pilots of the plan's first requests
    measure it (issue 17: chosen from measured headroom when the spec does not say), and the run uses the
    last pilot's D, which its report records."""
    r = run_infemu(
        "run",
        example("quickstart.yaml"),
        "--requests",
        "40",
        "--rate",
        "16",
        "--output-len",
        "32",
        "--out",
        "rep",
        "--json",
        "--shaping",
        "inproc",
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert "the spec sets none, so pilots choose it" in r.stderr
    assert "time dilation auto: pilot 1 (30 requests at D=1)" in r.stderr
    chosen = float(re.search(r"time dilation auto: running at D=([0-9.]+)", r.stderr).group(1))
    assert json.loads(r.stdout)["completed"] == 40  # the run itself, not a pilot
    trust = json.loads((tmp_path / "rep" / "trust.json").read_text())
    assert trust["time_dilation"] == chosen


def test_a_cluster_that_fails_to_start_names_the_instance_and_leaves_nothing(tmp_path):
    """The spec validated, but the model's config.json vanished before the workers read it."""
    import shutil as _shutil

    from emulator.cluster.local import ClusterStartError, LocalCluster
    from emulator.spec import load_clusters

    config = tmp_path / "model.json"
    _shutil.copy(
        os.path.join(ROOT, "emulator", "catalog", "data", "models", "meta-llama--Meta-Llama-3.1-8B.config.json"), config
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(TWO_REPLICAS.replace("model: llama-3.1-8b", f"model: {config}"))
    cluster = load_clusters(str(spec))[0]
    config.unlink()
    before = set(emulator_pids())
    with pytest.raises(ClusterStartError) as exc:
        LocalCluster(str(spec), cluster.name, run_dir=str(tmp_path / "run"), shaping="inproc", cluster=cluster).start()
    assert re.search(r"instance agg-[01] exited with code 2 while starting", str(exc.value))
    assert "model.json" in str(exc.value)  # the worker's own one-line error, from its log
    assert not set(emulator_pids()) - before


PACKED = replicas_spec("packed", 4, "  emulation: {instancesPerProcess: 2}\n")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_several_instances_per_process_serve_apart_and_restart_together(tmp_path):
    state = up_detached(tmp_path, PACKED)
    try:
        run_dir = tmp_path / ".infemu" / "runs" / os.listdir(tmp_path / ".infemu" / "runs")[0]
        procs = {p["name"]: p for p in json.loads((run_dir / "state.json").read_text())["processes"]}
        workers = [procs[i["name"]] for i in state["instances"]]
        assert len(workers) == 4 and len({w["pid"] for w in workers}) == 2  # two interpreters for four engines
        assert len({i["url"] for i in state["instances"]}) == 4  # each instance its own port
        client = openai.OpenAI(base_url=f"{state['router']}/v1", api_key="unused", max_retries=0, timeout=20)
        for _ in range(8):
            done = client.completions.create(
                model="llama-3.1-8b", prompt="hi", max_tokens=2, extra_body={"ignore_eos": True}
            )
            assert done.usage.completion_tokens == 2
        # each instance its own engine and metrics registry: round robin gave each two requests
        served = {i["name"]: metric_value(i["url"], "vllm:request_success_total") for i in state["instances"]}
        assert served == dict.fromkeys(served, 2.0), served
        # a process death takes both of its instances; the supervisor restarts them together on their ports
        victim = workers[0]["pid"]
        mates = [w["name"] for w in workers if w["pid"] == victim]
        os.killpg(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        urls = {i["name"]: i["url"] for i in state["instances"]}
        while time.monotonic() < deadline:
            now = {p["name"]: p for p in json.loads((run_dir / "state.json").read_text())["processes"]}
            restarted = [now[m] for m in mates]
            if all(p["pid"] != victim for p in restarted) and all(_ready(urls[m]) for m in mates):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{mates} were not restarted on their ports")
        assert len({p["pid"] for p in restarted}) == 1 and all(p["restarts"] == 1 for p in restarted)
    finally:
        run_infemu("down", cwd=str(tmp_path))
