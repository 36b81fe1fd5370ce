"""``infemu run``: start the local cluster, drive the spec's workload through the router, measure
every request from the stream, stop the cluster, and report.

The report folder holds ``requests.jsonl`` (one record per request, the simulator's fields),
``summary.json`` (the same keys as ``infemu sim --json``), ``instances.json`` (final engine
stats scraped from each worker) and ``trust.json`` (whether the run was faithful on this host).
Live progress goes to stderr once a second.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import urllib.request
from dataclasses import dataclass, field, replace

from emulator import event_loop
from emulator.catalog.models import get_model
from emulator.client import ClusterLink, run_closed_loop, run_plan, to_emulated_time
from emulator.cluster.local import LocalCluster
from emulator.faults.accounting import fault_accounting
from emulator.locust_driver import LocustLoad, run_locust
from emulator.results import RequestRecord, goodput, summarize
from emulator.spec import InferenceCluster, sets_time_dilation, with_time_dilation
from emulator.trust import trust_verdict
from emulator.workload.clients import ClientBehaviour
from emulator.workload.plan import RequestPlan


@dataclass
class RunResult:
    name: str
    records: list[RequestRecord]
    summary: dict
    instances: dict = field(default_factory=dict)
    events: int = 0
    simulated_s: float = 0.0  # wall seconds of load (the table's "simulated" line reads it)
    prometheus: dict | None = None  # what the real Prometheus recorded, when --prometheus
    goodput: dict = field(default_factory=dict)  # requests/s and output tokens/s that met every SLO
    trust: dict | None = None  # can these numbers be trusted on this host (emulator.trust); trust.json


class Progress:
    """Elapsed, completed, req/s and the running SLO attainment, printed once a second."""

    def __init__(self, cluster: InferenceCluster, total: int, stream=sys.stderr) -> None:
        self.slo = cluster.spec.slo
        self.total = total
        self.stream = stream
        self.done = 0
        self.met = 0
        self.sent = 0
        self.records: list[RequestRecord] = []  # what an interrupted run still reports
        self.t0 = time.perf_counter()
        self._last = 0.0

    def on_send(self) -> None:
        self.sent += 1

    def __call__(self, rec: RequestRecord) -> None:
        self.records.append(rec)
        self.done += 1
        self.met += rec.meets(self.slo.ttft_ms, self.slo.tpot_ms, self.slo.e2e_ms)
        now = time.perf_counter()
        if now - self._last >= 1.0 or self.done == self.total:
            self._last = now
            el = now - self.t0
            print(
                f"  {el:6.1f}s  {self.done}/{self.total} done  {self.done / max(el, 1e-9):6.1f} req/s"
                f"  attainment {100 * self.met / self.done:5.1f}%",
                file=self.stream,
                flush=True,
            )


def scrape(url: str) -> dict:
    out: dict = {}
    try:
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()  # loopback only
    except OSError:
        return out
    for line in text.splitlines():
        for key, name in (
            ("prefix_cache_hits", "vllm:prefix_cache_hits_total"),
            ("prefix_cache_queries", "vllm:prefix_cache_queries_total"),
            ("preemptions", "vllm:num_preemptions_total"),
            ("timing_error_p99_s", "infemu_iteration_timing_error_p99_seconds"),
            ("overloaded", "infemu_emulation_overloaded"),
            ("timing_error_ratio", "infemu_iteration_timing_error_ratio"),
            ("timed_steps", "infemu_iteration_timing_error_seconds_count"),
            ("suggested_time_dilation", "infemu_emulation_suggested_time_dilation"),
            ("kv_transfer_bytes", "infemu_kv_transfer_bytes_total"),
            ("afd_exchanges", "infemu_afd_exchanges_total"),  # an FFN instance
            ("afd_exchange_failures", "infemu_afd_exchange_failures_total"),  # an AFD engine
            ("kvstore_fetched_tokens", "infemu_kvstore_fetched_tokens_total"),  # an engine with a KV store
            ("kvstore_written_blocks", "infemu_kvstore_written_blocks_total"),
            ("kvstore_failures", "infemu_kvstore_failures_total"),
            ("lookup_blocks", "infemu_kvstore_lookup_blocks_total"),  # the KV store
            ("hit_blocks", "infemu_kvstore_hit_blocks_total"),
            ("fetched_blocks", "infemu_kvstore_fetched_blocks_total"),
            ("evicted_blocks", "infemu_kvstore_evicted_blocks_total"),
            ("blocks", "infemu_kvstore_blocks"),
            ("retrieval_queries", "infemu_retrieval_queries_total"),  # a retriever
            ("retrieval_batches", "infemu_retrieval_batch_size_count"),
        ):
            if line.startswith((name + "{", name + " ")):
                out[key] = float(line.rsplit(" ", 1)[1])
        for key, direction in (("afd_rx_bytes", "afd_rx"), ("afd_tx_bytes", "afd_send")):
            if line.startswith("infemu_link_bytes_total{") and f'direction="{direction}"' in line:
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Sampler:
    """Polls every worker's /load twice a second during the run: queue depth and KV usage series."""

    def __init__(self, workers: list, interval_s: float = 0.5) -> None:
        import threading

        self.workers = workers
        self.interval_s = interval_s
        self.series: dict[str, list[tuple[float, dict]]] = {w.name: [] for w in workers}
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for w in self.workers:
                try:
                    with urllib.request.urlopen(f"{w.url}/load", timeout=1) as r:  # loopback only
                        self.series[w.name].append((time.perf_counter() - self._t0, json.loads(r.read())))
                except (OSError, ValueError):
                    pass

    def stop(self) -> dict[str, list[tuple[float, dict]]]:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.series


def _prometheus_view(prom) -> dict:
    """Attainment as Prometheus recorded it (cumulative counters at the last scrape) and the rules' view."""
    prom.final_scrape()
    met = prom.query('sum(infemu_router_slo_requests_total{met="true"})') or 0.0
    total = prom.query("sum(infemu_router_slo_requests_total)") or 0.0
    return {
        "url": prom.url,
        "slo_attainment": met / total if total else None,
        "requests": total,
        "ttft_attainment_rule": prom.query("infemu:ttft_attainment:ratio_rate5m"),
        "itl_attainment_rule": prom.query("infemu:itl_attainment:ratio_rate5m"),
    }


def run(
    cluster: InferenceCluster,
    spec_path: str,
    plan: RequestPlan,
    out_dir: str | None,
    shaping: str = "auto",
    prometheus: bool = False,
    locust: LocustLoad | None = None,
    max_in_flight: int | None = None,
) -> RunResult:
    """Drive ``plan`` with the asyncio client, or, with ``locust``, a Locust user class; play the spec's
    faults meanwhile; restart processes that die. Ctrl-C still writes the report of what finished."""
    from emulator.faults.local import FaultRunner, LocalInjector
    from emulator.faults.schedule import resolve_faults
    from emulator.topology import place

    lc = LocalCluster(spec_path, cluster.name, shaping=shaping, cluster=cluster)
    state = lc.start()
    supervisor = lc.supervise()
    prom = None
    if prometheus:
        from emulator.observability.prometheus import LocalPrometheus

        folder = os.path.join(out_dir or lc.run_dir, "prometheus")
        try:
            prom = LocalPrometheus(folder, cluster, state)
        except BaseException:
            lc.stop()
            raise
        print(f"prometheus {prom.url} scraping every second; data in {folder}", file=sys.stderr)
    print(
        f"cluster {cluster.name} ready: router {state.router}; shaping {state.shaping} ({lc.shaping_reason})",
        file=sys.stderr,
    )
    progress = Progress(cluster, len(plan.requests) - plan.warmup)
    if locust is not None:
        print(f"locust: {locust.users} {locust.workload} users for {locust.duration_s:g} s", file=sys.stderr)
    model = cluster.spec.model.name
    vocab = get_model(model).vocab
    dilation = cluster.spec.emulation.time_dilation
    # the client gives up only well after the router's own deadline: a request it abandons is "lost"
    deadline_s = cluster.spec.router.timeouts.request_ms * 1e-3 * dilation * 1.5 + 10.0
    faults = resolve_faults(cluster.spec, place(cluster.spec))
    runner = FaultRunner(LocalInjector(state), faults, dilation, lambda: progress.sent, lc.run_dir)
    supervisor.on_ready.append(runner.reapply)  # a restarted instance gets its scheduled faults back
    if faults:
        print(f"faults: {', '.join(f.name for f in faults)} scheduled", file=sys.stderr)
    t0 = time.perf_counter()
    runner.start(t0)
    sampler = Sampler(state.engines())  # queues and KV usage: engines only (AFD's FFN instances have neither)
    link = ClusterLink(lc.token)  # the client's own way in and back, taken out of the model's time
    interrupted = False
    instances: dict = {}
    prom_view = None
    try:
        if locust is not None:
            records = run_locust(locust, state.router, model, out_dir or lc.run_dir, cluster.spec.workload.seed)
        elif plan.concurrency:
            client = cluster.spec.workload.client
            behaviour = ClientBehaviour(client.overhead_ms * 1e-3, client.overhead_cv, plan.warmup)
            records = event_loop.run(
                run_closed_loop(
                    state.router,
                    model,
                    plan,
                    vocab,
                    dilation,
                    on_done=progress,
                    behaviour=behaviour,
                    seed=cluster.spec.workload.seed,
                    deadline_s=deadline_s,
                    on_send=progress.on_send,
                    link=link,
                    max_connections=client.max_connections,
                )
            )
        else:
            records, _ = event_loop.run(
                run_plan(
                    state.router,
                    model,
                    plan,
                    vocab,
                    dilation=dilation,
                    on_done=progress,
                    max_connections=cluster.spec.workload.client.max_connections,
                    max_in_flight=max_in_flight,
                    deadline_s=deadline_s,
                    on_send=progress.on_send,
                    link=link,
                )
            )
        instances = {p.name: {"role": p.role, "restarts": p.restarts, **scrape(p.url)} for p in state.workers()}
        prom_view = _prometheus_view(prom) if prom is not None else None
    except KeyboardInterrupt:
        # what finished is still a result: the report says the run was cut short
        interrupted = True
        records = sorted(progress.records, key=lambda r: int(r.request_id.split("-")[1]))
        for rec in records:
            _emulated_once(rec, dilation)
        print(f"interrupted: reporting the {len(records)} requests that finished", file=sys.stderr)
    finally:
        timeline = runner.stop()
        samples = sampler.stop()
        if prom is not None:
            prom.stop()
        lc.stop()
    wall = time.perf_counter() - t0
    slo = cluster.spec.slo
    summary = summarize(records, slo.ttft_ms, slo.tpot_ms, slo.e2e_ms)
    end_s = max((r.finish_s for r in records if r.finish_s is not None), default=wall / dilation)
    summary["faults"] = fault_accounting(records, timeline, slo.ttft_ms, slo.tpot_ms, end_s)
    if interrupted:
        summary["interrupted"] = True
    store = store_summary(cluster, instances)
    if store is not None:  # the KV tier as the simulator reports it
        summary["kvstore"], summary["kv_fetched_tokens"] = store
    # the report's first line: can these numbers be trusted on this host?
    trust = None if interrupted else trust_verdict(cluster, plan if locust is None else None, summary, instances)
    if trust is not None:  # what the emulation's own HTTP path cost, and what the workers took out of the model's time
        trust["http_path"] = {
            "idle_round_trip_ms": 1e3 * state.path_overhead_s,
            "way_back_ms": None if link.estimate_s is None else 1e3 * link.estimate_s,
            "first_tokens_measured": len(link.samples),
        }
    result = RunResult(
        cluster.name,
        records,
        summary,
        instances,
        simulated_s=wall,
        prometheus=prom_view,
        goodput=goodput(records, slo.ttft_ms, slo.tpot_ms, summary["duration_s"], slo.e2e_ms),
        trust=trust,
    )
    if out_dir:
        from emulator.htmlreport import write_html
        from emulator.report import write_json, write_report

        write_report(out_dir, cluster, result)  # requests.jsonl, summary.json, instances.json, as `infemu sim`
        write_json(os.path.join(out_dir, "goodput.json"), result.goodput)
        if trust is not None:
            write_json(os.path.join(out_dir, "trust.json"), trust)
        if prom_view is not None:
            write_json(os.path.join(out_dir, "prometheus.json"), prom_view)

        write_html(
            os.path.join(out_dir, "report.html"),
            f"infemu run: {cluster.name}",
            records,
            result.summary,
            result.goodput,
            slo,
            samples,
            trust,
        )
    if interrupted:
        raise KeyboardInterrupt
    return result


PILOT_MIN_REQUESTS = 30  # enough engine steps for every worker's timing p99 (it needs 50 steps)
PILOT_SHARE = 0.2  # of the plan, at most
PILOT_MAX_S = 30.0  # emulated seconds of an open-loop plan, at most
PILOTS = 3


def pilot_plan(plan: RequestPlan) -> RequestPlan:
    """The first requests of a plan, as its load begins: what ``choose_time_dilation`` replays."""
    if plan.concurrency:  # closed loop: the warm-up, then a few rounds of every client
        n = plan.warmup + max(PILOT_MIN_REQUESTS, 4 * plan.concurrency)
        duration = None if plan.duration_s is None else min(plan.duration_s, PILOT_MAX_S)
        return replace(plan, requests=plan.requests[:n], duration_s=duration)
    n = max(PILOT_MIN_REQUESTS, math.ceil(PILOT_SHARE * len(plan.requests)))
    early = sum(1 for r in plan.requests if r.arrival_s is not None and r.arrival_s < PILOT_MAX_S)
    return replace(plan, requests=plan.requests[: max(min(n, early), PILOT_MIN_REQUESTS)])


def why_no_pilots(plan: RequestPlan, locust: LocustLoad | None) -> str | None:
    """Why a run whose spec leaves its time dilation to the host cannot have pilots choose it (None: it
    can). A Locust run has no plan to replay, and a plan no longer than its pilot would run twice."""
    if locust is not None:
        return "a Locust run has no plan for pilots to replay"
    if len(pilot_plan(plan).requests) >= len(plan.requests):
        return f"the plan's {len(plan.requests)} requests are no more than one pilot"
    return None


def host_chosen_dilation(
    cluster: InferenceCluster,
    spec_path: str,
    plan: RequestPlan,
    shaping: str = "auto",
    locust: LocustLoad | None = None,
) -> InferenceCluster:
    """The cluster at the dilation its run uses when the command line names none: the spec's own, or,
    when the spec sets none, the one pilots choose (``choose_time_dilation``) where they can replay a
    part of the plan, else D=1; stderr says which (``infemu run`` and each rate of ``infemu sweep``)."""
    if sets_time_dilation(cluster):
        return cluster
    reason = why_no_pilots(plan, locust)
    if reason is not None:
        print(f"time dilation: the spec sets none and {reason}: running at D=1 (the report says whether"
              " this host kept time, and the D that would)", file=sys.stderr)  # fmt: skip
        return cluster
    print("time dilation: the spec sets none, so pilots choose it (set spec.emulation.timeDilation or"
          " --time-dilation to skip them)", file=sys.stderr)  # fmt: skip
    return choose_time_dilation(cluster, spec_path, plan, shaping)


def choose_time_dilation(
    cluster: InferenceCluster, spec_path: str, plan: RequestPlan, shaping: str = "auto", run_pilot=None
) -> InferenceCluster:
    """``infemu run --time-dilation auto``, and ``infemu run`` of a spec that sets no dilation: replay the
    plan's first requests on this host from the spec's dilation up, each pilot at the dilation the
    previous one's trust verdict asked for (its workers' step-timing error and its gap to the
    simulator), until one is faithful or a pilot asks for no more. The headroom is measured, under this
    workload, on this host: not estimated. Pilots leave the spec's faults out: they measure whether the
    host keeps time under the load, and a kill in a pilot would only cost a restart."""
    run_pilot = run_pilot or (lambda c, p: run(c, spec_path, p, None, shaping=shaping))
    pilot = pilot_plan(plan)
    dilation = cluster.spec.emulation.time_dilation
    for attempt in range(1, PILOTS + 1):
        trial = with_time_dilation(cluster, dilation)
        unfaulted = trial.model_copy(update={"spec": trial.spec.model_copy(update={"faults": []})})
        trust = run_pilot(unfaulted, pilot).trust or {}
        suggested = trust.get("suggested_time_dilation")
        line = trust.get("line", "no verdict")
        print(f"time dilation auto: pilot {attempt} ({len(pilot.requests)} requests at D={dilation:g}): {line}",
              file=sys.stderr)  # fmt: skip
        if trust.get("verdict") == "faithful" or not suggested or suggested <= dilation or attempt == PILOTS:
            break
        dilation = float(suggested)
    print(f"time dilation auto: running at D={dilation:g}", file=sys.stderr)
    return trial  # the last pilot's cluster: every exit above is right after a pilot at ``dilation``


def store_summary(cluster, instances: dict) -> tuple[dict, int] | None:
    """The KV store's figures from the scraped metrics, in the simulator's summary keys."""
    stores = [st for st in instances.values() if st.get("role") == "kvstore"]
    if not stores:
        return None
    from emulator.serve.kvstore_app import store_block_bytes

    block_bytes, _ = store_block_bytes(cluster.spec)
    asked = sum(st.get("lookup_blocks", 0.0) for st in stores)
    written = sum(st.get("kvstore_written_blocks", 0.0) for st in instances.values() if st.get("role") != "kvstore")
    kv = {
        "hit_rate": sum(st.get("hit_blocks", 0.0) for st in stores) / asked if asked else 0.0,
        "bytes_fetched": sum(st.get("fetched_blocks", 0.0) for st in stores) * block_bytes,
        "bytes_written": written * block_bytes,
        "evicted_blocks": int(sum(st.get("evicted_blocks", 0.0) for st in stores)),
    }
    return kv, int(sum(st.get("kvstore_fetched_tokens", 0.0) for st in instances.values()))


def _emulated_once(rec: RequestRecord, dilation: float) -> None:
    """Records handed to the progress callback are still in wall seconds since the client's origin."""
    if dilation != 1.0:
        to_emulated_time(rec, dilation)
