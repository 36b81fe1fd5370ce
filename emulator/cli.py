"""The ``infemu`` command.

Every user error (bad spec, bad flag value, missing trace) prints one line per
problem and exits 2; a traceback means a bug in infemu.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

from emulator.errors import InputError, SpecError
from emulator.version import package_version
from loadgen.workloads import WORKLOADS


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload overrides (exact; replace the spec's values)")
    g.add_argument("--rate", type=_positive_float, help="requests per second (open loop)")
    g.add_argument("--requests", type=_positive_int, help="number of requests")
    g.add_argument("--duration", type=_positive_float, help="seconds of arrivals")
    g.add_argument("--concurrency", type=_positive_int, help="closed-loop clients")
    g.add_argument("--input-len", type=_positive_int, help="prompt tokens, fixed")
    g.add_argument("--output-len", type=_positive_int, help="output tokens, fixed")
    g.add_argument("--trace", help="replay a trace file (Azure CSV, Mooncake/RAGPulse JSONL, BurstGPT CSV)")
    g.add_argument("--trace-format", choices=["azure", "mooncake", "burstgpt", "ragpulse"])
    g.add_argument("--seed", type=_nonneg_int)
    g.add_argument(
        "--warmup-requests",
        type=_nonneg_int,
        help="closed loop: send this many first, drain them, then measure (AIPerf --warmup-request-count)",
    )
    g.add_argument(
        "--prompt-pool",
        type=_positive_int,
        help="draw prompts from this many distinct ones (benchmark datasets; repeats hit the prefix cache)",
    )
    g.add_argument(
        "--max-connections",
        type=_positive_int,
        help="connections the client holds at most (aiohttp's default is 100); a request waits for one, in its TTFT",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="infemu",
        description="Emulation testbed for distributed LLM inference: one spec, simulated or emulated.",
    )
    ap.add_argument("--version", action="version", version=f"infemu {package_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sim", help="discrete-event simulation of a spec in virtual time")
    p.add_argument("spec", help="InferenceCluster YAML (several documents = several designs)")
    _add_workload_flags(p)
    p.add_argument("--cluster", help="simulate only the document with this metadata.name")
    p.add_argument("--out", help="write requests.jsonl and summary.json here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (one object per cluster)")
    p.add_argument("--no-bulk", action="store_true", help="step every decode iteration (slower; for checks)")

    p = sub.add_parser("run", help="start the cluster locally, drive the workload, report SLO attainment")
    p.add_argument("spec")
    _add_workload_flags(p)
    p.add_argument("--cluster", help="document name in a multi-document spec")
    p.add_argument(
        "--out",
        help="report folder: report.html (plots), requests.jsonl (one record per request), summary.json "
        "(the `sim --json` keys, fault windows), goodput.json, instances.json (per-worker stats)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--shaping", choices=["auto", "tc", "inproc"], default="auto")
    p.add_argument(
        "--max-in-flight",
        type=_positive_int,
        help="open loop: drop (and count) a request due while this many are in flight",
    )
    p.add_argument(
        "--time-dilation",
        metavar="D|auto",
        help="run at time dilation D instead of spec.emulation.timeDilation; auto: a short pilot of the plan's first "
        "requests measures whether this host keeps time, raising D until it does (at most 3 pilots). Default: the "
        "spec's D, or auto when the spec sets none (D=1 where no pilot can run: --workload, a plan of one pilot)",
    )
    p.add_argument(
        "--shape",
        choices=["stages", "burst"],
        help="with --workload: Locust LoadTestShape (ramp stages, or periodic bursts)",
    )
    p.add_argument(
        "--workload",
        help="drive with Locust users of this kind: chat, coding, summarization, agentic, multihop, rag"
        " (closed loop: --concurrency users for --duration seconds)",
    )
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="run a real Prometheus with the spec's rules; its data stays in the report folder",
    )

    p = sub.add_parser("sweep", help="SLO attainment against rate, and goodput (simulated with --sim)")
    p.add_argument("spec")
    p.add_argument("--rates", required=True, help="comma-separated request rates, e.g. 1,2,4,8")
    p.add_argument("--sim", action="store_true", help="simulate instead of emulating")
    p.add_argument("--requests", type=_positive_int, help="requests per rate (default: the spec's)")
    p.add_argument("--cluster", help="document name in a multi-document spec")
    p.add_argument("--out", help="write sweep.json and sweep.png here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--shaping", choices=["auto", "tc", "inproc"], default="auto")

    p = sub.add_parser(
        "plan",
        help="search parallelism, disaggregation and placement for the most goodput per GPU under the SLO",
        description="Enumerate aggregated and prefill/decode designs (TP, PP, P:D ratio, placement) for the spec's "
        "model, GPU, topology and workload, prune them with the cost model, find each survivor's highest rate that "
        "meets the SLO attainment target in the simulator, and rank them by goodput per GPU.",
    )
    p.add_argument("spec", help="the spec: model, GPU, topology, SLO and workload (its pools are replaced)")
    p.add_argument("--cluster", help="document name in a multi-document spec")
    p.add_argument("--gpus", type=_positive_int, help="GPU budget (default: the spec's nodes x gpusPerNode)")
    p.add_argument(
        "--nodes", type=_positive_int, help="nodes of the spec's gpusPerNode (sets the budget if --gpus is not given)"
    )
    p.add_argument("--designs", default="agg,pd", help="comma-separated: agg, pd, afd (default: agg,pd)")
    p.add_argument("--slo-ttft-ms", type=_positive_float, help="TTFT SLO (default: the spec's slo.ttftMs)")
    p.add_argument("--slo-tpot-ms", type=_positive_float, help="TPOT SLO (default: the spec's slo.tpotMs)")
    p.add_argument("--attainment", type=_positive_float, help="attainment target, 0-1 (default: the spec's)")
    p.add_argument(
        "--budget-s", type=_positive_float, default=120.0, help="no new candidate starts after this (default: 120)"
    )
    p.add_argument(
        "--requests", type=_positive_int, default=400, help="simulated requests per rate tried (default: 400)"
    )
    p.add_argument("--jobs", type=_positive_int, help="parallel simulations (default: the CPU count)")
    p.add_argument("--json", action="store_true", help="print the ranked plans as JSON")
    p.add_argument("--out", help="write plan-1.yaml .. plan-3.yaml (and --confirm's runs) here")
    p.add_argument(
        "--confirm",
        type=_nonneg_int,
        default=0,
        help="run the top K plans as local emulations at their planned rate (default: 0)",
    )
    p.add_argument(
        "--confirm-dilation",
        type=_positive_float,
        default=4.0,
        help="time dilation of the confirmation runs (default: 4); a run the host could not keep up with is"
        " repeated once at the dilation its trust verdict suggests",
    )

    p = sub.add_parser("cost", help="per-operator time of one engine step")
    p.add_argument("spec")
    p.add_argument("--pool", help="pool name (default: the first pool)")
    p.add_argument("--cluster", help="document name in a multi-document spec")
    p.add_argument("--prefill-tokens", type=_nonneg_int, default=0, help="new prompt tokens in the step")
    p.add_argument("--prefill-context", type=_nonneg_int, default=0, help="tokens already cached before the chunk")
    p.add_argument("--decode-batch", type=_nonneg_int, default=0, help="decoding sequences in the step")
    p.add_argument("--context", type=_nonneg_int, default=1024, help="KV length of each decoding sequence")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("validate", help="check a spec and print its placement")
    p.add_argument("spec")

    p = sub.add_parser("topology", help="placement of every instance and the link tier between each pair")
    p.add_argument("spec")
    p.add_argument("--cluster", help="document name in a multi-document spec")
    p.add_argument("--json", action="store_true")

    sub.add_parser("catalog", help="list the GPUs, link tiers and models infemu knows")

    p = sub.add_parser("crds", help="write the CustomResourceDefinitions generated from the spec model")
    p.add_argument("--out", default="charts/infemu/crds", help="folder (default: the chart's crds/)")

    p = sub.add_parser("operator", help="run the Kubernetes operator against the current kubeconfig")
    p.add_argument(
        "--namespace",
        action="append",
        help="watch only this namespace (repeatable); default: every namespace",
    )
    p.add_argument("--liveness", help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--verbose", action="store_true")

    p = sub.add_parser("loadtest", help="drive a running router with Locust and print the SLO summary (JSON)")
    p.add_argument("--target", required=True, help="the router's base URL, e.g. http://quickstart-router")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--workload", choices=WORKLOADS, default="chat")
    p.add_argument("--arrival", choices=["closed", "stages", "burst"], default="closed")
    p.add_argument("--users", type=int, default=4, help="concurrent users (peak for stages and burst)")
    p.add_argument("--duration", type=_positive_float, default=60.0, help="seconds")
    p.add_argument("--workers", type=int, default=1, help="Locust worker processes beside the master")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-ms", type=_positive_float, default=1000.0)
    p.add_argument("--tpot-ms", type=_positive_float, default=100.0)
    p.add_argument("--out", default="loadtest", help="folder for summary.json, requests.jsonl, Locust CSVs")
    p.add_argument("--summary-file", help="also write the compact summary here (a pod's /dev/termination-log)")
    p.add_argument(
        "--faults-json",
        help="the fault timeline the operator plays ([{name, kind, targets, start_s, end_s}], seconds from this"
        " container's start): the summary then accounts each fault window",
    )

    p = sub.add_parser("rules", help="Prometheus recording and alert rules for a spec's SLOs (YAML)")
    p.add_argument("spec")
    p.add_argument("--cluster", help="document name in a multi-document spec")

    p = sub.add_parser("up", help="start the cluster as local processes (router + every instance)")
    p.add_argument("spec")
    p.add_argument("--cluster", help="document name in a multi-document spec")
    p.add_argument("--detach", action="store_true", help="return once ready; stop later with `infemu down`")
    p.add_argument("--json", action="store_true", help='print {"router": URL, "instances": [...]}')
    p.add_argument("--run-dir", help="where state and logs go (default .infemu/runs/<cluster>-<time>)")
    p.add_argument(
        "--shaping",
        choices=["auto", "tc", "inproc"],
        default="auto",
        help="link shaping backend: tc (root: namespaces + qdiscs), inproc (no privileges), auto",
    )

    p = sub.add_parser("link", help="change links of a running cluster live (degrade, delay, cut, reset)")
    lsub = p.add_subparsers(dest="link_command", required=True, metavar="ACTION")
    p = lsub.add_parser("set", help="change the links between two instances or pools, both directions")
    p.add_argument("--from", dest="src", help="instance or pool name (required unless --reset alone)")
    p.add_argument("--to", dest="dst", help="instance or pool name (required unless --reset alone)")
    p.add_argument("--bandwidth-factor", type=_positive_float, help="multiply the tier's bandwidth (0.1 = 10x slower)")
    p.add_argument("--latency-us", type=float, help="one-way latency in microseconds")
    p.add_argument("--cut", action="store_true", help="fail every transfer on these links")
    p.add_argument("--reset", action="store_true", help="back to the tier's own numbers")
    p.add_argument("--run-dir", help="the cluster's run directory (default: the newest under .infemu/runs)")

    p = sub.add_parser("fault", help="inject, clear and list faults on a running local cluster")
    fsub = p.add_subparsers(dest="fault_command", required=True, metavar="ACTION")
    p = fsub.add_parser("inject", help="start a fault now (the fields of a spec.faults entry)")
    p.add_argument("kind", choices=["kill", "hang", "slow", "link", "partition"])
    p.add_argument("--name", help="name it, to clear it later (default: <kind>-<n>)")
    p.add_argument("--pool", help="target: every replica of this pool (see --fraction)")
    p.add_argument("--instance", help="target: one instance")
    p.add_argument("--fraction", type=_positive_float, help="share of the pool's replicas hit")
    p.add_argument("--peer", help="link: the receiving pool or instance (default: every peer)")
    p.add_argument("--tier", help="link: only peers over this tier")
    p.add_argument("--factor", type=float, help="slow: k times slower")
    p.add_argument("--bandwidth-factor", type=_positive_float, help="link: multiply the rate")
    p.add_argument("--latency-us", type=float, help="link: added latency")
    p.add_argument("--loss-retransmit-ms", type=float, help="link: loss as a retransmit delay per transfer")
    p.add_argument("--cut", action="store_true", help="link: no byte passes")
    p.add_argument("--between", nargs=2, metavar=("A", "B"), help="partition: two comma-separated groups")
    p.add_argument(
        "--duration-seconds",
        type=float,
        help="end it after this long (emulated seconds: times the time dilation on the wall); "
        "without it, `fault clear` ends it",
    )
    p.add_argument("--run-dir", help="the cluster's run directory (default: the newest under .infemu/runs)")
    p = fsub.add_parser("clear", help="end one active fault (or --all)")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true")
    p.add_argument("--run-dir")
    p = fsub.add_parser("list", help="active faults, and what each process reports")
    p.add_argument("--run-dir")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("doctor", help="which link-shaping backends work here and how fast they shape accurately")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="probe fewer rates")

    p = sub.add_parser("status", help="running local clusters, wherever they were started: routers and instances")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per cluster (newest first)")

    p = sub.add_parser("down", help="stop detached clusters (all of them, or one run directory)")
    p.add_argument("run_dir", nargs="?", help="one run directory (default: every running cluster)")
    # the flag `up`, `link` and `fault` take for the same directory
    p.add_argument("--run-dir", dest="run_dir_flag", metavar="RUN_DIR", help="the same, as a flag")
    _finish_parser(ap)
    return ap


# Help for the arguments many commands share, where their own add_argument gave none.
COMMON_HELP = {
    "spec": "the spec: a YAML file with one or more InferenceCluster documents",
    "json": "print JSON instead of tables",
    "seed": "override spec.workload.seed",
    "trace_format": "the trace's format (default: told from its first line)",
    "shaping": "how links are shaped: tc (kernel HTB/TBF, needs root), inproc (paced in-process), auto (tc when it "
    "works)",
    "run_dir": "the cluster's run directory (default: the newest running cluster, started from any folder)",
    "verbose": "log every kopf event",
    "workload": "the Locust user class (loadgen/users.py)",
    "arrival": "closed: fixed users; stages: ramp up and down; burst: alternate base and peak",
    "ttft_ms": "TTFT SLO for the summary's attainment (ms)",
    "tpot_ms": "TPOT SLO for the summary's attainment (ms)",
    "kind": "the fault kind",
    "name": "the fault's name (as inject printed it)",
    "all": "every active fault",
}


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default where it has one worth showing (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _finish_parser(parser: argparse.ArgumentParser) -> None:
    """Every option documented, every default shown, in every subcommand."""
    parser.formatter_class = _DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _finish_parser(child)
        elif action.help is None:
            action.help = COMMON_HELP.get(action.dest)


def _select(clusters, name: str | None):
    if name is None:
        return clusters
    chosen = [c for c in clusters if c.name == name]
    if not chosen:
        raise SpecError([f"--cluster: {name!r} is not in the spec; documents: {', '.join(c.name for c in clusters)}"])
    return chosen


def _one_cluster(args: argparse.Namespace):
    """The one cluster a command runs for real: a multi-document spec needs --cluster."""
    from emulator.spec import load_clusters

    clusters = load_clusters(args.spec)
    if args.cluster is None and len(clusters) > 1:
        names = ", ".join(c.name for c in clusters)
        raise SpecError([f"--cluster: {args.spec} holds {len(clusters)} clusters; name one of {names}"])
    return _select(clusters, args.cluster)[0]


def cmd_sim(args: argparse.Namespace) -> int:
    from emulator.overrides import apply_overrides
    from emulator.report import print_summary_table, write_report
    from emulator.sim.simulator import simulate
    from emulator.spec import load_clusters
    from emulator.workload.plan import plan_for

    ov = _overrides(args)
    clusters = _select(load_clusters(args.spec), args.cluster)
    base_dir = os.path.dirname(os.path.abspath(args.spec))
    results = []
    for cluster in clusters:
        cluster = apply_overrides(cluster, ov)
        plan = plan_for(cluster, base_dir)
        t0 = time.perf_counter()
        result = simulate(cluster, plan, bulk=not args.no_bulk)
        wall = time.perf_counter() - t0
        results.append((cluster, result, wall))
        if args.out:
            out = args.out if len(clusters) == 1 else os.path.join(args.out, cluster.name)
            write_report(out, cluster, result)
    if args.json:
        for _, result, _ in results:
            print(json.dumps(result.summary))
    else:
        for cluster, result, wall in results:
            print_summary_table(cluster, result, wall)
    return max(_all_failed(c.name, r.records) for c, r, _ in results)


def _overrides(args: argparse.Namespace):
    from emulator.overrides import WorkloadOverrides

    return WorkloadOverrides(
        rate=args.rate,
        requests=args.requests,
        duration=args.duration,
        concurrency=args.concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        trace=args.trace,
        trace_format=args.trace_format,
        seed=args.seed,
        warmup_requests=args.warmup_requests,
        prompt_pool=args.prompt_pool,
        max_connections=args.max_connections,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from emulator.overrides import apply_overrides
    from emulator.report import print_summary_table
    from emulator.run import run
    from emulator.workload.plan import plan_for

    locust = None
    if args.workload is not None:
        from emulator.locust_driver import LocustLoad

        if args.workload not in WORKLOADS:
            raise SpecError([f"--workload: {args.workload!r} is unknown; use one of {', '.join(WORKLOADS)}"])
        locust = LocustLoad(args.workload, args.concurrency or 4, args.duration or 30.0, args.shape)
    overrides = _overrides(args)
    if locust is not None:  # --concurrency and --duration shape the Locust run, not the plan
        overrides = dataclasses.replace(overrides, concurrency=None, duration=None)
    cluster = apply_overrides(_one_cluster(args), overrides)
    plan = plan_for(cluster, os.path.dirname(os.path.abspath(args.spec)))
    if args.time_dilation is None:  # the spec's D, or the host's where the spec sets none
        from emulator.run import host_chosen_dilation

        cluster = host_chosen_dilation(cluster, args.spec, plan, args.shaping, locust)
    elif args.time_dilation == "auto":
        from emulator.run import choose_time_dilation

        if locust is not None:
            raise SpecError(["--time-dilation auto: pilots replay the spec's plan; with --workload give a number"])
        cluster = choose_time_dilation(cluster, args.spec, plan, args.shaping)
    else:
        from emulator.spec import with_time_dilation

        try:
            dilation = float(args.time_dilation)
        except ValueError:
            raise SpecError([f"--time-dilation: {args.time_dilation!r} is neither a number nor auto"]) from None
        cluster = with_time_dilation(cluster, dilation)
    result = run(
        cluster,
        args.spec,
        plan,
        args.out,
        shaping=args.shaping,
        prometheus=args.prometheus,
        locust=locust,
        max_in_flight=args.max_in_flight,
    )
    if args.json:
        print(json.dumps(result.summary))
    else:
        print_summary_table(cluster, result)
        if result.prometheus is not None and result.prometheus["slo_attainment"] is not None:
            print(
                f"  Prometheus recorded SLO attainment {100 * result.prometheus['slo_attainment']:.1f}% over"
                f" {result.prometheus['requests']:.0f} requests (client: {100 * result.summary['slo_attainment']:.1f}%)"
            )
        gp = result.goodput
        print(
            f"  goodput: {gp['requests_per_s']:.2f} req/s, {gp['output_tokens_per_s']:.0f} output tok/s"
            f" meeting every SLO, over the same {gp['window_s']:.1f} s"
        )
        if args.out:
            print(
                f"  report: {args.out}/report.html (plots), requests.jsonl, summary.json, goodput.json, instances.json,"
                " trust.json"
            )
    return _all_failed(cluster.name, result.records)


def _all_failed(name: str, records) -> int:
    """1, saying why on stderr, when requests were sent and none completed (a run that measured nothing)."""
    if not records or any(r.ok for r in records):
        return 0
    reasons: dict[str, int] = {}
    for r in records:
        reasons[r.error or "unknown"] = reasons.get(r.error or "unknown", 0) + 1
    worst = max(reasons, key=lambda k: reasons[k])
    print(f"error: {name}: all {len(records)} requests failed; most ({reasons[worst]}): {worst}", file=sys.stderr)
    return 1


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError([f"--rates: {text!r} is not a comma-separated list of numbers"]) from None
    if not rates or any(r <= 0 for r in rates):
        raise SpecError([f"--rates: {text!r}: give one or more rates > 0, e.g. 1,2,4"])
    return sorted(set(rates))


def cmd_plan(args: argparse.Namespace) -> int:
    from emulator.planner.run import plan_command

    return plan_command(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from emulator.spec import load_clusters
    from emulator.sweep import goodput, point_json, sweep, trust_mark, write_outputs

    rates = _rates(args.rates)
    clusters = _select(load_clusters(args.spec), args.cluster)
    for cluster in clusters:
        points = sweep(cluster, args.spec, rates, simulate_only=args.sim, requests=args.requests, shaping=args.shaping)
        gp = goodput(points, cluster.spec.slo.attainment_target)
        if args.out:
            out = args.out if len(clusters) == 1 else os.path.join(args.out, cluster.name)
            plot = write_outputs(out, cluster, points, gp)
        if args.json:
            print(
                json.dumps(
                    {
                        "cluster": cluster.name,
                        "goodput_rps": gp,
                        "points": [point_json(p) for p in points],
                    }
                )
            )
            continue
        print(f"{cluster.name} ({'simulated' if args.sim else 'emulated'}):")
        trust_column = "" if args.sim else "  trust"  # emulated: whether the host kept time at each rate
        print(f"  {'rate':>7} {'attain':>7} {'TTFT p90':>9} {'TPOT p90':>9} {'tok/s':>8}{trust_column}")
        for p in points:
            s = p.summary
            print(
                f"  {p.rate:7g} {100 * s['slo_attainment']:6.1f}% {s['ttft_ms']['p90'] or 0:9.1f}"
                f" {s['tpot_ms']['p90'] or 0:9.2f} {s['output_tokens_per_s']:8.0f}"
                + (f"  {trust_mark(p)}" if p.trust is not None else "")
            )
        target = cluster.spec.slo.attainment_target
        if gp == max(rates):  # the knee lies beyond what was swept
            where = f"every swept rate met attainment >= {100 * target:.0f}%: goodput is at least this; sweep higher"
        elif gp == 0:
            where = f"no swept rate met attainment >= {100 * target:.0f}%: sweep lower"
        else:
            where = f"highest swept rate with attainment >= {100 * target:.0f}%"
        print(f"  goodput: {gp:g} req/s ({where})" + (f"; plot {plot}" if args.out else ""))
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from emulator.report import print_cost_table
    from emulator.spec import load_clusters

    cluster = _select(load_clusters(args.spec), args.cluster)[0]
    return print_cost_table(cluster, args)


def cmd_validate(args: argparse.Namespace) -> int:
    from emulator.report import print_placement
    from emulator.spec import load_clusters

    for cluster in load_clusters(args.spec):
        print_placement(cluster)
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from emulator.report import print_topology
    from emulator.spec import load_clusters
    from emulator.topology import place

    for cluster in _select(load_clusters(args.spec), args.cluster):
        topo = place(cluster.spec)
        if args.json:
            print(json.dumps({"cluster": cluster.name, **topo.to_json()}))
        else:
            print_topology(cluster, topo)
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    import yaml

    from infemu_operator.crds import all_crds

    os.makedirs(args.out, exist_ok=True)
    for name, crd in all_crds().items():
        path = os.path.join(args.out, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("# generated by `infemu crds` from the pydantic models; do not edit\n")
            yaml.safe_dump(crd, fh, sort_keys=False, width=120)
        print(path)
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from infemu_operator.main import run_operator

    return run_operator(args.namespace, liveness=args.liveness, verbose=args.verbose)


def cmd_loadtest(args: argparse.Namespace) -> int:
    from emulator.loadtest import LoadTestArrival, run_loadtest
    from emulator.spec import SLOSpec

    try:
        arrival = LoadTestArrival(type=args.arrival, users=args.users)
        slo = SLOSpec(ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms)
    except ValueError as exc:
        raise SpecError([f"--users/--ttft-ms/--tpot-ms: {exc}"]) from None
    try:
        faults = json.loads(args.faults_json) if args.faults_json else None
        if faults is not None and not isinstance(faults, list):
            raise ValueError("expected a JSON list")
    except ValueError as exc:
        raise SpecError([f"--faults-json: {exc}"]) from None
    try:
        summary = run_loadtest(
            args.target,
            args.model,
            args.workload,
            arrival,
            args.duration,
            args.workers,
            args.seed,
            slo,
            args.out,
            args.summary_file,
            faults,
        )
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0 if summary["completed"] else 1


def cmd_rules(args: argparse.Namespace) -> int:
    import yaml

    from emulator.observability.rules import rules_for

    cluster = _one_cluster(args)
    print(f"# generated by `infemu rules {args.spec}` for {cluster.name}", flush=True)
    print(yaml.safe_dump(rules_for(cluster.spec.slo), sort_keys=False, width=200), end="")
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from emulator.report import print_catalog

    print_catalog()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from emulator.cluster.local import LocalCluster
    from emulator.report import print_endpoints

    cluster = _one_cluster(args)
    lc = LocalCluster(args.spec, cluster.name, args.run_dir, detach=args.detach, shaping=args.shaping)
    state = lc.start()
    try:  # SIGTERM arrives as KeyboardInterrupt (see main): either one stops the cluster
        print(f"shaping: {state.shaping} — {lc.shaping_reason}", file=sys.stderr)
        if args.json:
            print(json.dumps(state.to_json()), flush=True)
        else:
            print_endpoints(state)
        if args.detach:
            from emulator.cluster.supervisor import spawn_detached

            spawn_detached(state)  # restarts dead processes after this command returns
            return 0
        from emulator.cluster.supervisor import Supervisor

        supervisor = Supervisor(state, lc.children)  # one death no longer stops the cluster: it is restarted
        while True:
            for line in supervisor.poll_once():
                print(line, file=sys.stderr, flush=True)
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    lc.stop()
    print("cluster stopped")
    return 0


def cmd_link(args: argparse.Namespace) -> int:
    from emulator.cluster.links import FAILED, set_links

    lines = set_links(
        args.run_dir,
        args.src,
        args.dst,
        bandwidth_factor=args.bandwidth_factor,
        latency_us=args.latency_us,
        cut=args.cut,
        reset=args.reset,
    )
    for line in lines:
        print(line, file=sys.stderr if line.startswith(FAILED) else sys.stdout)
    return 1 if any(line.startswith(FAILED) for line in lines) else 0


def _declared_fault(args: argparse.Namespace) -> dict:
    """The command line as a spec.faults entry (validated by the same model)."""
    target = {
        k: v
        for k, v in (
            ("pool", args.pool),
            ("instance", args.instance),
            ("fraction", args.fraction),
            ("peer", args.peer),
            ("tier", args.tier),
        )
        if v is not None
    }
    out: dict = {"kind": args.kind}
    if args.name:
        out["name"] = args.name
    if target:
        out["target"] = target
    if args.factor is not None:
        out["factor"] = args.factor
    if args.kind == "link":
        link = {
            k: v
            for k, v in (
                ("bandwidthFactor", args.bandwidth_factor),
                ("latencyUs", args.latency_us),
                ("lossRetransmitMs", args.loss_retransmit_ms),
            )
            if v is not None
        }
        out["link"] = {**link, "cut": args.cut}
    if args.between:
        out["between"] = [[n for n in g.split(",") if n] for g in args.between]
    if args.duration_seconds is not None:  # a kill's is refused by the spec's own check
        out["durationSeconds"] = args.duration_seconds
    return out


def cmd_fault(args: argparse.Namespace) -> int:
    from emulator.faults import live

    if args.fault_command == "list":
        view = live.listing(args.run_dir)
        if args.json:
            print(json.dumps(view, indent=1))
            return 0
        print("active: " + (", ".join(f"{n} ({d['kind']})" for n, d in view["active"].items()) or "none"))
        playing = [e for e in view["schedule"] if e.get("end_s") is None]
        if playing:  # the spec's scheduled faults, while `infemu run` plays them
            on = (f"{e['name']} ({e['kind']}, since {e['start_s']:.1f} s)" for e in playing)
            print("scheduled, on now: " + ", ".join(on))
        for name, state in view["live"].items():
            print(f"  {name}: {json.dumps(state)}")
        return 0
    if args.fault_command == "clear":
        if args.name is None and not args.all:
            raise InputError("fault clear: name a fault or pass --all")
        lines = live.clear(args.run_dir, None if args.all else args.name)
    else:
        lines = live.inject(args.run_dir, _declared_fault(args))
    for line in lines:
        print(line)
    return 1 if any(": failed: " in line for line in lines) else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from emulator.net.doctor import diagnose

    report = diagnose(quick=args.quick)
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"root: {'yes' if report['root'] else 'no'}; netem: {'yes' if report['netem'] else 'no'};"
        f" ifb: {'yes' if report['ifb'] else 'no'}"
    )
    for name, b in report["backends"].items():
        line = f"{name:7s} {'works' if b['works'] else 'unavailable'} — {b['why']}"
        if "max_rate_MBps" in b:
            line += f"; shapes accurately (within 5%) up to {b['max_rate_MBps']:.0f} MB/s on the wire"
        print(line)
        for m in b.get("measurements", []):
            print(
                f"          {m['rate_MBps']:6.0f} MB/s: {m['measured_s']:.3f} s vs {m['expected_s']:.3f} s"
                f" ({m['error_pct']:+.1f}%)"
            )
    d = report["defaults"]
    print(
        f"defaults: shaping {d['shaping']}, {d['wire_rate_MBps']:.0f} MB/s per shaped link on the wire"
        f" (byte scaling), latency {d['latency']}"
    )
    return 0


def _timing_of(url: str | None, alive: bool) -> dict | None:
    """An engine's own verdict on its step timing (None: not answering, or no steps yet)."""
    from emulator.run import scrape

    got = scrape(url) if url and alive else {}
    if "timing_error_ratio" not in got:
        return None
    return {
        "share_of_step": got["timing_error_ratio"],
        "faithful": not got.get("overloaded"),
        "suggested_time_dilation": got.get("suggested_time_dilation"),
    }


def cmd_status(args: argparse.Namespace) -> int:
    from emulator.cluster.local import _alive, running_runs

    clusters = []
    for st in running_runs():
        engines = {p.name for p in st.engines()}
        instances = []
        for p in st.workers():
            alive = _alive(p.pid)
            entry = {"name": p.name, "role": p.role, "url": p.url, "pid": p.pid, "alive": alive, "restarts": p.restarts}
            timing = _timing_of(p.url, alive) if p.name in engines else None
            if timing is not None:
                entry["timing"] = timing
            instances.append(entry)
        timed = [i["timing"] for i in instances if "timing" in i]
        verdict = (
            "no engine steps yet" if not timed else ("faithful" if all(t["faithful"] for t in timed) else "degraded")
        )
        clusters.append(
            {
                "cluster": st.cluster,
                "run_dir": st.run_dir,
                "router": st.router,
                "shaping": st.shaping,
                "timing": verdict,
                "instances": instances,
            }
        )
    if args.json:
        print(json.dumps(clusters))
        return 0
    if not clusters:
        print("no running cluster (start one with `infemu up SPEC --detach`)")
    for c in clusters:
        print(f"{c['cluster']}: router {c['router']}  ({c['run_dir']}, shaping {c['shaping']}); timing {c['timing']}")
        for i in c["instances"]:
            state = "up" if i["alive"] else "down"
            extra = f", restarted {i['restarts']}x" if i["restarts"] else ""
            t = i.get("timing")
            if t is not None:
                extra += f", step timing error p99 {100 * t['share_of_step']:.1f}% of the step"
                if not t["faithful"]:
                    extra += f" (NOT faithful: timeDilation {t['suggested_time_dilation']:g} would be)"
            print(f"  {i['name']:<12} {i['role']:<10} {i['url']}  {state}{extra}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from emulator.cluster.local import down

    if args.run_dir and args.run_dir_flag and args.run_dir != args.run_dir_flag:
        raise InputError(f"down: two run directories given ({args.run_dir}, --run-dir {args.run_dir_flag}); give one")
    stopped = down(args.run_dir or args.run_dir_flag)
    print("\n".join(stopped) if stopped else "no running cluster found")
    return 0


COMMANDS = {
    "sim": cmd_sim,
    "run": cmd_run,
    "sweep": cmd_sweep,
    "plan": cmd_plan,
    "cost": cmd_cost,
    "validate": cmd_validate,
    "catalog": cmd_catalog,
    "rules": cmd_rules,
    "crds": cmd_crds,
    "operator": cmd_operator,
    "loadtest": cmd_loadtest,
    "topology": cmd_topology,
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "link": cmd_link,
    "fault": cmd_fault,
    "doctor": cmd_doctor,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the program is, so the ``except KeyboardInterrupt`` that owns a cluster
    stops it as it would on Ctrl-C.

    A subclass on purpose: CPython (3.11-3.13, ``run_eval_code_obj`` in pythonrun.c) marks the process as
    ended by an unhandled Ctrl-C whenever a KeyboardInterrupt of exactly that class leaves code run by
    ``exec`` of a string, even if it is caught further up. dataclasses builds each ``__init__`` that way,
    so a SIGTERM that landed in the lazy import of a module with a dataclass made an ``infemu up`` that had
    stopped cleanly kill itself with SIGINT on exit (status -2, no traceback: 1 stop in ~20 here, once in CI).
    """


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM behaves like Ctrl-C from the first instruction on, so a cluster being started or
    # running is always stopped by the `finally`/`except` that owns it: no orphans, no namespaces left
    signal.signal(signal.SIGTERM, _terminate)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SpecError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
