"""The ``infemu`` command as a user runs it: output shapes, JSON keys, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, example

from emulator.results import SUMMARY_KEYS

STAT_KEYS = {"mean", "p50", "p90", "p99"}


def infemu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emulator.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_sim_json_has_exactly_the_public_keys():
    r = infemu("sim", example("quickstart.yaml"), "--requests", "50", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert list(summary) == list(SUMMARY_KEYS)
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert set(summary[key]) == STAT_KEYS
    assert summary["requests"] == 50 and summary["completed"] == 50 and summary["failed"] == 0


def test_sim_human_table_and_report_folder(tmp_path):
    r = infemu("sim", example("quickstart.yaml"), "--requests", "30", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "TTFT ms" in r.stdout and "SLO attainment" in r.stdout
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 30 and "ttft_ms" in json.loads(lines[0])
    assert list(json.loads((tmp_path / "summary.json").read_text())) == list(SUMMARY_KEYS)


def test_command_line_lengths_are_exact():
    r = infemu(
        "sim",
        example("quickstart.yaml"),
        "--requests",
        "20",
        "--input-len",
        "100",
        "--output-len",
        "7",
        "--out",
        "/tmp/infemu-cli-exact",
    )
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in Path("/tmp/infemu-cli-exact/requests.jsonl").read_text().splitlines()]
    assert {x["prompt_tokens"] for x in recs} == {100} and {x["output_tokens"] for x in recs} == {7}


def test_multi_document_json_prints_one_object_per_cluster():
    r = infemu("sim", example("tp-vs-pp.yaml"), "--requests", "100", "--json")
    assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(objs) == 2 and all(list(o) == list(SUMMARY_KEYS) for o in objs)


def test_cost_prints_per_operator_breakdown():
    r = infemu(
        "cost",
        example("quickstart.yaml"),
        "--pool",
        "agg",
        "--prefill-tokens",
        "512",
        "--decode-batch",
        "8",
        "--context",
        "1024",
    )
    assert r.returncode == 0, r.stderr
    for op in ("qkv_proj", "mlp_gate_up", "attention_prefill", "attention_decode", "lm_head", "host_step"):
        assert op in r.stdout
    assert "table" in r.stdout and "KV per token (whole model) 131072 B" in r.stdout
    # the host-side component and the checkpoint's precisions, with where they come from
    assert "host side:" in r.stdout and "engine_constants.json" in r.stdout
    assert "precisions: dense bf16, attention bf16, experts bf16, KV cache bf16 (from unquantized)" in r.stdout
    assert "async scheduling" not in r.stdout  # off unless the spec turns it on


def test_cost_says_when_the_spec_models_async_schedulings_admission_lag(tmp_path):
    spec = tmp_path / "async.yaml"
    spec.write_text(
        Path(example("quickstart.yaml")).read_text().replace("spec:\n", "spec:\n  engine: {asyncScheduling: true}\n", 1)
    )
    r = infemu("cost", str(spec), "--decode-batch", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["host"]["async_scheduling"] is True
    text = " ".join(infemu("cost", str(spec), "--decode-batch", "8").stdout.split())
    assert "a request that comes during a step joins the step after the next (async scheduling)" in text


def test_cost_shows_a_hybrid_models_linear_state_per_sequence_not_per_token(tmp_path):
    """Qwen3.5's Gated DeltaNet layers hold a fixed state per sequence (45 layers x 64 heads x 128 x 128
    fp32, plus the convolution window): once printed as the KV of one token (192 MB)."""
    quickstart = Path(example("quickstart.yaml")).read_text()
    spec = tmp_path / "qwen.yaml"
    spec.write_text(
        quickstart.replace("name: llama-3.1-8b", "name: Qwen/Qwen3.5-397B-A17B")
        .replace("gpu: h100-sxm", "gpu: b200-sxm")
        .replace("gpusPerNode: 1", "gpusPerNode: 8")
        .replace("tp: 1", "tp: 8")
    )
    r = infemu("cost", str(spec), "--decode-batch", "4")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    # 15 full-attention layers x 2 x 2 KV heads x 256 dims x 2 bytes
    assert "KV per token (whole model) 30720 B + 192.1 MB per sequence (linear-attention state)" in text


def test_cost_says_what_of_a_step_the_engine_would_not_run_as_one():
    """A what-if step is priced as asked, and the reader learns where a real engine would queue,
    chunk or preempt instead (the quickstart: max_num_seqs 128, 27,880 KV blocks of 16 tokens)."""
    big = infemu("cost", example("quickstart.yaml"), "--decode-batch", "512", "--context", "8192", "--json")
    small = infemu("cost", example("quickstart.yaml"), "--decode-batch", "4", "--context", "1024", "--json")
    assert big.returncode == 0 and small.returncode == 0, big.stderr + small.stderr
    notes = json.loads(big.stdout)["beyond_the_engine"]
    assert any("512 sequences in one step" in n and "max_num_seqs" in n for n in notes)
    assert any("262656 blocks of 16 tokens" in n for n in notes)  # 512 x ceil(8193 / 16)
    assert json.loads(small.stdout)["beyond_the_engine"] == []
    text = infemu("cost", example("quickstart.yaml"), "--decode-batch", "512", "--context", "8192")
    assert "note: 512 sequences in one step" in text.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["sim", "examples/quickstart.yaml", "--rate", "-3"], "argument --rate: -3 must be > 0"),
        (["sim", "examples/quickstart.yaml", "--requests", "abc"], "'abc' is not a whole number"),
        (["sim", "missing.yaml"], "error: missing.yaml: no such file"),
        (["sim", "examples/quickstart.yaml", "--trace", "nope.csv"], "error: nope.csv: trace file not found"),
        (["cost", "examples/quickstart.yaml", "--pool", "zzz", "--decode-batch", "1"], "--pool: 'zzz' is not a pool"),
        (["sim", "examples/tp-vs-pp.yaml", "--cluster", "x"], "--cluster: 'x' is not in the spec"),
        (
            ["cost", "examples/quickstart.yaml", "--decode-batch", "4", "--context", "99999999"],
            "--context: 99999999 tokens plus the decoded one exceed the pool's context window (max_model_len 131072)",
        ),
        (
            ["cost", "examples/quickstart.yaml", "--prefill-tokens", "200000"],
            "--prefill-tokens + --prefill-context: 200000 tokens exceed the pool's context window",
        ),
        (["run", "examples/quickstart.yaml", "--time-dilation", "0.5"], "timeDilation: 0.5: Input should be greater"),
        (["run", "examples/quickstart.yaml", "--time-dilation", "fast"], "'fast' is neither a number nor auto"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, fragment):
    r = infemu(*args)
    assert r.returncode == 2
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr


def test_malformed_spec_exit_2_one_line_per_problem(tmp_path):
    p = tmp_path / "bad.yaml"
    quickstart = Path(example("quickstart.yaml")).read_text()
    p.write_text(quickstart.replace("tp: 1", "tp: 3").replace("maxNumSeqs: 128", "maxNumSeqs: 0"))
    r = infemu("sim", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "spec.pools[0].maxNumSeqs: 0" in lines[0]
    p.write_text(quickstart.replace("tp: 1", "tp: 3"))
    r = infemu("sim", str(p))
    assert r.returncode == 2
    first, second = r.stderr.strip().splitlines()
    assert first == f"error: {p}: spec.pools[0].tp: 3 does not divide the model's 32 attention heads"
    assert "tp*pp*dp = 3 GPUs exceeds the 1-GPU scale-up domain" in second


def test_malformed_trace_is_a_clear_error(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2}\nnot json\n')
    r = infemu("sim", "examples/quickstart.yaml", "--trace", str(bad), "--trace-format", "mooncake")
    assert r.returncode == 2 and f"{bad}:2: invalid JSON" in r.stderr


def test_sweep_finds_goodput_and_writes_a_plot(tmp_path):
    r = infemu(
        "sweep",
        example("quickstart.yaml"),
        "--rates",
        "8,20,28",
        "--sim",
        "--requests",
        "400",
        "--json",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    attain = {p["rate"]: p["slo_attainment"] for p in out["points"]}
    assert attain[8.0] >= 0.9 and attain[28.0] < 0.9  # past the ~22 req/s knee
    assert out["goodput_rps"] == max(rate for rate, a in attain.items() if a >= 0.9)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "sweep.json").read_text())["goodput_rps"] == out["goodput_rps"]


@pytest.mark.parametrize(
    "rates, says",
    [
        ("2,4", "goodput: 4 req/s (every swept rate met attainment >= 90%: goodput is at least this; sweep higher)"),
        ("60,80", "goodput: 0 req/s (no swept rate met attainment >= 90%: sweep lower)"),
    ],
)
def test_sweep_says_when_the_knee_lies_outside_the_swept_rates(rates, says):
    r = infemu("sweep", example("quickstart.yaml"), "--rates", rates, "--sim", "--requests", "300")
    assert r.returncode == 0 and says in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_an_emulated_sweep_says_at_each_rate_whether_the_host_kept_time(tmp_path):
    """An emulated point the host could not keep time at must not read as a measurement like the others:
    each carries its run's trust verdict (in `--json`, sweep.json and the table's trust column)."""
    r = infemu(
        "sweep",
        example("quickstart.yaml"),
        "--rates",
        "6,12",
        "--requests",
        "10",
        "--shaping",
        "inproc",
        "--json",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    points = json.loads(r.stdout)["points"]
    assert [p["rate"] for p in points] == [6.0, 12.0]
    for p in points:
        assert p["trust"]["verdict"] in ("faithful", "degraded") and p["trust"]["time_dilation"] == 1.0, p
    kept = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert [p["trust"] for p in kept] == [p["trust"] for p in points] and kept[0]["completed"] == 10


def test_an_emulated_sweep_lets_pilots_choose_each_rates_dilation_when_the_spec_sets_none(monkeypatch):
    """Each rate's load decides its dilation, as `infemu run` decides a run's: pilots where the spec sets
    none and the plan is longer than a pilot; the spec's own D (or a plan of one pilot) runs as it is."""
    from types import SimpleNamespace

    import emulator.run
    from emulator.spec import load_clusters, with_time_dilation
    from emulator.sweep import sweep

    piloted, ran = [], []

    def pilots(cluster, spec_path, plan, shaping):
        piloted.append(len(plan.requests))
        return with_time_dilation(cluster, 3.0)

    def run(cluster, spec_path, plan, out_dir, shaping):
        ran.append(cluster.spec.emulation.time_dilation)
        return SimpleNamespace(summary={"slo_attainment": 1.0}, trust={"verdict": "faithful"})

    monkeypatch.setattr(emulator.run, "choose_time_dilation", pilots)
    monkeypatch.setattr(emulator.run, "run", run)
    quickstart = load_clusters(example("quickstart.yaml"))[0]
    sweep(quickstart, example("quickstart.yaml"), [4.0, 8.0], simulate_only=False, requests=200)
    assert piloted == [200, 200] and ran == [3.0, 3.0]
    piloted.clear()
    ran.clear()
    sweep(with_time_dilation(quickstart, 2.0), example("quickstart.yaml"), [4.0], simulate_only=False, requests=200)
    sweep(quickstart, example("quickstart.yaml"), [4.0], simulate_only=False, requests=20)  # one pilot's worth
    assert piloted == [] and ran == [2.0, 1.0]


def test_the_sweep_tables_trust_column_names_the_dilation_that_would_fix_a_rate():
    from emulator.sweep import SweepPoint, trust_mark

    assert trust_mark(SweepPoint(8.0, {})) == ""  # simulated
    assert trust_mark(SweepPoint(8.0, {}, {"verdict": "faithful", "time_dilation": 1.0})) == "faithful"
    assert trust_mark(SweepPoint(20.0, {}, {"verdict": "faithful", "time_dilation": 2.0})) == "faithful at D=2"
    degraded = {"verdict": "degraded", "suggested_time_dilation": 4.0}
    assert trust_mark(SweepPoint(30.0, {}, degraded)) == "NOT faithful (timeDilation 4 would be)"


@pytest.mark.parametrize("rates", ["a,b", "-1,2", ""])
def test_sweep_rejects_bad_rates(rates):
    r = infemu("sweep", "examples/quickstart.yaml", "--rates", rates, "--sim")
    assert r.returncode == 2 and "--rates" in r.stderr and "Traceback" not in r.stderr


def test_every_command_and_option_has_help_and_version_prints():
    import argparse

    from emulator.cli import build_parser

    undocumented = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, [*path, name])
            elif not action.help and not isinstance(action, argparse._HelpAction):
                undocumented.append(f"{' '.join(path)} {action.option_strings or action.dest}")

    walk(build_parser(), ["infemu"])
    assert undocumented == []
    r = infemu("--version")
    assert r.returncode == 0 and r.stdout.startswith("infemu ")
    assert "(default: auto)" in infemu("run", "--help").stdout


def test_sim_where_every_request_fails_exits_1_and_says_why(tmp_path):
    spec = tmp_path / "toolong.yaml"
    spec.write_text(
        "apiVersion: infemu.io/v1alpha1\nkind: InferenceCluster\nmetadata: {name: toolong}\nspec:\n"
        "  model: llama-3.1-8b\n  pools: [{name: a, maxModelLen: 2048}]\n"
        "  workload: {requests: 5, inputLength: 4000, outputLength: 10}\n"
    )
    r = infemu("sim", str(spec))
    assert r.returncode == 1
    assert "all 5 requests failed" in r.stderr and "maximum context length is 2048" in r.stderr


def test_sigterm_caught_inside_exec_d_code_still_exits_cleanly():
    """The SIGTERM lands in code run by exec() (as dataclasses builds __init__ during a lazy import): the CLI
    catches it and returns 0, and the process must exit 0, not kill itself with SIGINT afterwards. The program
    ends normally, so its status is Py_RunMain's, as `python -m emulator.cli`'s is."""
    script = (
        "import signal\n"
        "from emulator.cli import _terminate\n"
        "signal.signal(signal.SIGTERM, _terminate)\n"
        "try:\n"
        "    exec('import os, signal\\nos.kill(os.getpid(), signal.SIGTERM)\\nfor _ in range(100000): pass')\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped')\n"  # and the program ends normally
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, "stopped"), r.stderr


def _pilot_plan(requests: int, concurrency: int | None = None, warmup: int = 0):
    from emulator.workload.plan import PlannedRequest, RequestPlan

    arrival = (lambda i: None) if concurrency else (lambda i: 0.5 * i)  # open loop: 2 requests a second
    return RequestPlan(
        tuple(PlannedRequest(i, arrival(i), 128, 64) for i in range(requests)), concurrency=concurrency, warmup=warmup
    )


def test_a_pilot_is_the_plans_first_requests():
    from emulator.run import PILOT_MIN_REQUESTS, pilot_plan

    assert len(pilot_plan(_pilot_plan(1000)).requests) == 60  # 20% would be 200: the first 30 s (60 arrivals)
    assert len(pilot_plan(_pilot_plan(100)).requests) == PILOT_MIN_REQUESTS  # 20% is fewer than a pilot needs
    assert len(pilot_plan(_pilot_plan(12)).requests) == 12  # a plan shorter than a pilot: all of it
    closed = pilot_plan(_pilot_plan(500, concurrency=16, warmup=32))
    assert len(closed.requests) == 32 + 64 and closed.concurrency == 16 and closed.warmup == 32


class _Pilots:
    """Stands in for the pilot runs: hands out the trust verdicts given, records the dilations asked for."""

    def __init__(self, *verdicts: tuple[str, float | None]) -> None:
        self.verdicts = list(verdicts)
        self.dilations: list[float] = []

    def __call__(self, cluster, plan):
        from types import SimpleNamespace

        self.dilations.append(cluster.spec.emulation.time_dilation)
        self.faults = len(cluster.spec.faults)
        verdict, suggested = self.verdicts.pop(0)
        return SimpleNamespace(trust={"verdict": verdict, "suggested_time_dilation": suggested, "line": verdict})


@pytest.mark.parametrize(
    "verdicts, tried, chosen",
    [
        ([("faithful", None)], [1.0], 1.0),  # the host keeps time at the spec's dilation
        ([("degraded", 4), ("faithful", None)], [1.0, 4.0], 4.0),
        ([("degraded", 4), ("degraded", 9), ("degraded", 20)], [1.0, 4.0, 9.0], 9.0),  # three pilots at most
        ([("degraded", 1)], [1.0], 1.0),  # a verdict that asks for no more dilation ends the search
    ],
)
def test_auto_time_dilation_follows_each_pilots_verdict(verdicts, tried, chosen):
    from emulator.run import choose_time_dilation
    from emulator.spec import load_clusters

    pilots = _Pilots(*verdicts)
    cluster = load_clusters(str(Path(ROOT) / "examples" / "quickstart.yaml"))[0]
    out = choose_time_dilation(cluster, "unused.yaml", _pilot_plan(200), run_pilot=pilots)
    assert pilots.dilations == tried and out.spec.emulation.time_dilation == chosen


def test_pilots_leave_the_specs_faults_for_the_run():
    from emulator.run import choose_time_dilation
    from emulator.spec import load_clusters

    pilots = _Pilots(("degraded", 3), ("faithful", None))
    cluster = load_clusters(str(Path(ROOT) / "examples" / "chaos.yaml"))[0]
    assert cluster.spec.faults
    out = choose_time_dilation(cluster, "unused.yaml", _pilot_plan(200), run_pilot=pilots)
    assert pilots.faults == 0 and out.spec.faults == cluster.spec.faults and out.spec.emulation.time_dilation == 3


def test_pilots_choose_the_dilation_only_where_they_can_replay_a_part_of_the_plan():
    from emulator.run import why_no_pilots

    assert why_no_pilots(_pilot_plan(200), None) is None
    assert "no more than one pilot" in why_no_pilots(_pilot_plan(30), None)
    assert "no more than one pilot" in why_no_pilots(_pilot_plan(32, concurrency=8), None)  # 4 rounds of 8
    assert why_no_pilots(_pilot_plan(40, concurrency=8), None) is None
    assert "Locust" in why_no_pilots(_pilot_plan(200), object())


def test_a_spec_sets_its_time_dilation_only_when_it_names_it(tmp_path):
    from emulator.spec import load_clusters, sets_time_dilation, with_time_dilation

    quickstart = load_clusters(str(Path(ROOT) / "examples" / "quickstart.yaml"))[0]
    assert not sets_time_dilation(quickstart)
    assert sets_time_dilation(with_time_dilation(quickstart, 1.0))  # `--time-dilation 1`: no pilots
    text = Path(example("quickstart.yaml")).read_text().replace("spec:\n", "spec:\n  emulation: {timeDilation: 1}\n", 1)
    (tmp_path / "q.yaml").write_text(text)
    assert sets_time_dilation(load_clusters(str(tmp_path / "q.yaml"))[0])


def test_validate_says_which_engine_profile_prices_the_spec(tmp_path):
    """A version older than every profiled one is priced as the oldest: `validate` says so (it was
    silent, and `engine: {name: sglang, version: "0.1"}` ran SGLang 0.5's host-side model unannounced)."""
    r = infemu("validate", example("quickstart.yaml"))
    assert r.returncode == 0, r.stderr
    assert "engine: vllm (no version: the newest profile): host side priced with the vllm" in r.stdout
    assert "spec is valid" in r.stdout
    text = (
        Path(example("quickstart.yaml"))
        .read_text()
        .replace("  gpu: h100-sxm", '  engine: {name: sglang, version: "0.1"}\n  gpu: h100-sxm')
    )
    spec = tmp_path / "old.yaml"
    spec.write_text(text)
    out = " ".join(infemu("validate", str(spec)).stdout.split())  # the console may wrap the line
    assert "engine: sglang 0.1: host side priced with the sglang 0.5 profile (0.1 is older than every profiled" in out
