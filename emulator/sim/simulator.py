"""The discrete-event driver: the same engine objects as the live workers, in virtual time.

Events: request arrivals, batch completions (an instance's step, or a whole
steady decode stretch advanced in bulk), pipeline launches, and KV-transfer
flows (start, completion) on a max-min fair flow network. Routing uses the
same pure policies as the live router.

Bulk decode: between events that can change or observe an instance, a batch
of decoding requests does not change; ``Scheduler.steady_decode_horizon`` says
for how many steps, the cost model prices them in one vectorised call, and
every token's timestamp is still recorded. Stepping one by one gives the same
timelines (a test checks this).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from emulator.build import build_instances
from emulator.capacity import profile_of
from emulator.costmodel.engines import EngineProfile
from emulator.engine.hashing import hashes_from_segments
from emulator.engine.outputs import RequestOutput
from emulator.engine.request import Request
from emulator.engine.scheduler import Scheduler
from emulator.errors import SpecError
from emulator.results import RequestRecord, summarize
from emulator.rng import PartitionedRNG
from emulator.router.policies import EndpointSnapshot, KVAware, RoutingRequest, make_policy
from emulator.sim.events import EventQueue
from emulator.sim.network import FlowNetwork
from emulator.spec import ENGINE_ROLES, InferenceCluster
from emulator.workload.clients import ClientBehaviour, ClosedLoopClients
from emulator.workload.plan import PlannedRequest, RequestPlan

MAX_STRETCH_STEPS = 4096


class SimInstance:
    def __init__(self, setup) -> None:
        self.setup = setup
        self.name = setup.instance.name
        self.role = setup.instance.role
        self.scheduler = Scheduler(setup.engine)
        self.cost = setup.cost
        self.pp = setup.pool.pp
        self.block_size = setup.engine.block_size
        self.in_flight = 0
        self.next_launch_s = 0.0
        self.launch_pending = False
        self.live: dict[str, Request] = {}
        self.busy_s = 0.0
        self.api_free_s = 0.0  # when this instance's API server is next free
        self.api_queued = 0  # requests sent to it that its engine has not seen yet

    def snapshot(self) -> EndpointSnapshot:
        s = self.scheduler
        return EndpointSnapshot(
            self.name,
            num_running=len(s.running),
            num_waiting=s.stats().num_waiting + self.api_queued,
            kv_usage=s.kv.usage,
            free_blocks=s.kv.num_free_blocks,
        )


@dataclass
class SimResult:
    name: str
    records: list[RequestRecord]
    summary: dict
    instances: dict[str, dict] = field(default_factory=dict)
    events: int = 0
    simulated_s: float = 0.0


@dataclass
class _Transfer:
    prefill: SimInstance
    decode: SimInstance
    nbytes: float
    start_s: float = 0.0


class Simulation:
    def __init__(
        self, cluster: InferenceCluster, plan: RequestPlan, *, bulk: bool = True, profile: EngineProfile | None = None
    ) -> None:
        """``profile`` replaces the spec's engine profile (the calibration fit tries other constants)."""
        spec = cluster.spec
        for i, pool in enumerate(spec.pools):
            if pool.role not in ENGINE_ROLES:
                raise SpecError(
                    [f"spec.pools[{i}].role: {pool.role!r} is not simulated yet; supported: {', '.join(ENGINE_ROLES)}"]
                )
        self.cluster = cluster
        self.plan = plan
        self.bulk = bulk
        self.profile = profile or profile_of(spec)
        self.topo, setups = build_instances(spec, self.profile)
        self.instances = [SimInstance(s) for s in setups]
        self.front = [i for i in self.instances if i.role in ("aggregated", "prefill")]
        self.decoders = [i for i in self.instances if i.role == "decode"]
        self.policy = make_policy(spec.router.policy)
        self.decode_policy = KVAware()
        self.events = EventQueue()
        self.net = FlowNetwork()
        self._net_version = 0
        self.transfers: dict[str, _Transfer] = {}
        self.records: dict[str, RequestRecord] = {}
        self._planned: dict[str, PlannedRequest] = {}
        self.api = self.profile.api
        client = spec.workload.client
        self.clients = (
            ClosedLoopClients(
                plan.concurrency,
                len(plan.requests),
                ClientBehaviour(client.overhead_ms * 1e-3, client.overhead_cv, plan.warmup),
                PartitionedRNG(spec.workload.seed).for_subsystem("workload.clients"),
            )
            if plan.concurrency
            else None
        )
        self._hash_cache: dict[tuple, tuple[int, ...]] = {}
        for inst in self.instances:
            for tier in {self.topo.scale_up, self.topo.scale_out}:
                cap = tier.bandwidth * inst.setup.instance.num_gpus
                self.net.set_capacity(f"{inst.name}:tx:{tier.name}", cap)
                self.net.set_capacity(f"{inst.name}:rx:{tier.name}", cap)

    # ---- driver loop -----------------------------------------------------------
    def run(self) -> SimResult:
        plan = self.plan
        if self.clients is not None:
            self._send(self.clients.start(0.0))
        else:
            for p in plan.requests:
                self._send([(p.arrival_s, p.index)])
        handlers = {
            "send": self._on_send,
            "arrival": self._on_arrival,
            "batch_done": self._on_batch_done,
            "launch": self._on_launch,
            "flow_start": self._on_flow_start,
            "flow_done": self._on_flow_done,
        }
        now = 0.0
        while len(self.events):
            now, kind, payload = self.events.pop()
            handlers[kind](now, payload)
        return self._result(now)

    # ---- clients and the API server --------------------------------------------------
    def _send(self, sends: list[tuple[float, int]]) -> None:
        for t, index in sends:
            if self.plan.concurrency and self.plan.duration_s is not None and t >= self.plan.duration_s:
                continue
            self.events.push(t, "send", index, observing=True)  # it schedules an arrival

    def _on_send(self, now: float, index: int) -> None:
        """The client sends: the router picks an instance, whose API server (one process, one
        event loop: HTTP, chat template, tokenisation) handles requests one at a time and
        hands each to the engine when done. That serial front door is also what spreads
        requests that clients send together."""
        p = self.plan.requests[index]
        rid = f"req-{index}"
        self._planned[rid] = p
        rec = self.records[rid] = RequestRecord(rid, now, p.input_len)
        if not self.front:
            self._fail(rec, now, "no instance accepts requests")
            return
        snaps = [i.snapshot() for i in self.front]
        # Block hashes are computed once per block size (cached): prefix-affinity routes on the
        # leading blocks, and the chosen engine caches by the same hashes.
        bs = self.front[0].block_size
        routing = RoutingRequest(rid, self._hashes(p, bs), None, p.input_len)
        inst = self.front[self.policy.choose(snaps, routing)]
        inst.api_queued += 1
        inst.api_free_s = max(now, inst.api_free_s) + self.api.request_s(p.input_len)
        self.events.push(inst.api_free_s + self.api.latency_s, "arrival", (index, inst), observing=True)

    def _stream(self, inst: SimInstance, ends: np.ndarray, outputs: int) -> np.ndarray:
        """When clients see the tokens of steps ending at ``ends``: each step's streaming work waits
        for the API server's loop (FIFO with the requests it takes in): o_k = max(e_k, o_k-1) + c."""
        c = self.api.step_s(outputs)
        k = np.arange(1, len(ends) + 1, dtype=np.float64)
        out = c * k + np.maximum(inst.api_free_s, np.maximum.accumulate(ends - (k - 1) * c))
        inst.api_free_s = float(out[-1])
        return out

    def _client_done(self, rec: RequestRecord) -> None:
        """A request ended (completed or failed); closed-loop clients send their next one."""
        if self.clients is not None and rec.finish_s is not None:
            self._send(self.clients.on_done(int(rec.request_id.split("-")[1]), rec.finish_s))

    # ---- requests --------------------------------------------------------------
    def _hashes(self, p: PlannedRequest, block_size: int) -> tuple[int, ...]:
        if not p.segments:
            return ()
        key = (p.segments, block_size)  # pooled prompts repeat: hash each distinct prompt once
        if key not in self._hash_cache:
            self._hash_cache[key] = hashes_from_segments(p.segments, block_size)
        return self._hash_cache[key]

    def _on_arrival(self, now: float, payload: tuple[int, SimInstance]) -> None:
        index, inst = payload
        inst.api_queued -= 1
        p = self.plan.requests[index]
        rid = f"req-{index}"
        rec = self.records[rid]
        role = "producer" if inst.role == "prefill" and p.output_len > 1 else "none"
        req = Request(rid, p.input_len, p.output_len, now, self._hashes(p, inst.block_size), kv_role=role)
        rejected = inst.scheduler.add_request(req)
        if rejected is not None:
            self._fail(rec, now, req.error or "rejected")
            return
        inst.live[rid] = req
        rec.instance = inst.name
        self._try_launch(inst, now)

    def _fail(self, rec: RequestRecord, now: float, error: str) -> None:
        rec.ok = False
        rec.error = error
        rec.finish_s = now
        self._client_done(rec)

    # ---- instances ---------------------------------------------------------------
    def _on_launch(self, now: float, inst: SimInstance) -> None:
        inst.launch_pending = False
        self._try_launch(inst, now)

    def _try_launch(self, inst: SimInstance, now: float) -> None:
        if inst.in_flight >= inst.pp:
            return
        if now < inst.next_launch_s:
            if not inst.launch_pending:
                inst.launch_pending = True
                self.events.push(inst.next_launch_s, "launch", inst)
            return
        sched = inst.scheduler
        if self.bulk and inst.pp == 1 and self._try_stretch(inst, now):
            return
        out = sched.schedule(now)
        for rid in out.kv_pulls:
            self._start_pull(inst, rid, now)
        if out.is_empty:
            return
        st = inst.cost.step_time(out.shape)
        inst.in_flight += 1
        inst.busy_s += st.interval_s
        self.events.push(now + st.total_s, "batch_done", (inst, out, None), observing=inst.role == "prefill")
        if inst.pp > 1:
            inst.next_launch_s = now + st.interval_s
            if inst.in_flight < inst.pp and not inst.launch_pending:
                inst.launch_pending = True
                self.events.push(inst.next_launch_s, "launch", inst)

    def _try_stretch(self, inst: SimInstance, now: float) -> bool:
        sched = inst.scheduler
        horizon = sched.steady_decode_horizon(MAX_STRETCH_STEPS)
        if horizon < 2:
            return False
        batch = len(sched.running)
        kv_sum = sum(r.num_computed_tokens + 1 for r in sched.running)
        dts = inst.cost.decode_stretch_s(batch, kv_sum, horizon)
        ends = np.add.accumulate(np.concatenate(([now], dts)))[1:]
        t_obs = self.events.next_observing()
        # steps that end before the next observing event run unchanged; the one it falls in is
        # stepped on its own, because the API server's loop takes that event's work (a new
        # request's intake) before it streams the tokens of a step that ends after it
        n = int(np.searchsorted(ends, t_obs, side="left"))  # ends holds horizon steps: n <= horizon
        if n < 2:
            return False
        results = sched.advance_steady(ends[:n])
        inst.in_flight += 1
        inst.busy_s += float(ends[n - 1] - now)
        self.events.push(
            float(ends[n - 1]), "batch_done", (inst, None, (results, ends[:n])), observing=inst.role == "prefill"
        )
        return True

    def _on_batch_done(self, now: float, payload: tuple) -> None:
        inst, output, stretch = payload
        inst.in_flight -= 1
        if stretch is None:
            results = inst.scheduler.update_from_output(output, now)
            seen = float(self._stream(inst, np.array([now]), len(results))[0])
            for ro in results:  # first tokens reach their clients through the API server
                req = inst.live.get(ro.request_id)
                rec = self.records.get(ro.request_id)
                if req is not None and rec is not None and rec.first_token_s is None and req.first_token_s == now:
                    rec.first_token_s = seen
        else:
            results, ends = stretch
            seen = float(self._stream(inst, ends, len(results))[-1])
        self._handle_results(inst, results, now, seen)
        self._try_launch(inst, now)

    def _handle_results(self, inst: SimInstance, results: list[RequestOutput], now: float, seen: float) -> None:
        """``seen``: when the clients see this step's (or stretch's last step's) tokens."""
        for ro in results:
            if not ro.finished:
                continue
            req = inst.live.pop(ro.request_id)
            rec = self.records[ro.request_id]
            if rec.first_scheduled_s is None:
                rec.first_scheduled_s = req.first_scheduled_s
            if ro.finish_reason == "remote_decode":
                self._hand_off(inst, req, rec, now)
                continue
            rec.ok = ro.finish_reason == "length"
            rec.error = None if rec.ok else (req.error or ro.finish_reason)
            rec.output_tokens = req.num_output_tokens
            rec.finish_s = seen
            rec.instance = inst.name
            rec.cached_tokens = max(rec.cached_tokens, req.num_cached_tokens)
            rec.preemptions += req.num_preemptions
            times = req.token_times() + (seen - now)  # the client's view, shifted by the streaming path
            if rec.prefill_instance is not None and rec.first_token_s is not None:
                times = np.concatenate([[rec.first_token_s], times])
            if len(times) > 1:
                rec.itl_max_ms = float(np.max(np.diff(times))) * 1e3
            self._client_done(rec)

    # ---- P/D ---------------------------------------------------------------------
    def _hand_off(self, prefill: SimInstance, req: Request, rec: RequestRecord, now: float) -> None:
        rec.prefill_instance = prefill.name
        rec.cached_tokens = req.num_cached_tokens
        rec.preemptions += req.num_preemptions
        if not self.decoders:
            prefill.scheduler.release_kv(req.request_id)
            self._fail(rec, now, "no decode instance")
            return
        p = self._planned[req.request_id]
        snaps = [d.snapshot() for d in self.decoders]
        dec = self.decoders[self.decode_policy.choose(snaps, RoutingRequest(req.request_id))]
        consumer = Request(
            req.request_id,
            req.num_prompt_tokens,
            req.max_tokens,
            req.arrival_s,
            self._hashes(p, dec.block_size),
            kv_role="consumer",
            num_output_tokens=1,
        )
        rejected = dec.scheduler.add_request(consumer)
        if rejected is not None:
            prefill.scheduler.release_kv(req.request_id)
            self._fail(rec, now, consumer.error or "rejected by decode")
            return
        dec.live[req.request_id] = consumer
        nbytes = prefill.cost.kv_transfer_bytes(req.num_prompt_tokens)
        self.transfers[req.request_id] = _Transfer(prefill, dec, nbytes)
        self._try_launch(dec, now)

    def _start_pull(self, dec: SimInstance, rid: str, now: float) -> None:
        tr = self.transfers[rid]
        tr.start_s = now
        tier = self.topo.tier_between(tr.prefill.setup.instance, dec.setup.instance)
        self.events.push(now + tier.latency_s, "flow_start", (rid, tier.name))

    def _on_flow_start(self, now: float, payload: tuple[str, str]) -> None:
        rid, tier = payload
        tr = self.transfers[rid]
        resources = (f"{tr.prefill.name}:tx:{tier}", f"{tr.decode.name}:rx:{tier}")
        self.net.add(rid, tr.nbytes, resources, now)
        self._reschedule_flows(now)

    def _reschedule_flows(self, now: float) -> None:
        self._net_version += 1
        for rid, t_done in self.net.completion_times(now).items():
            if t_done != float("inf"):
                self.events.push(t_done, "flow_done", (rid, self._net_version), observing=True)

    def _on_flow_done(self, now: float, payload: tuple[str, int]) -> None:
        rid, version = payload
        if version != self._net_version or rid not in self.net.flows:
            return
        self.net.remove(rid, now)
        self._reschedule_flows(now)
        tr = self.transfers.pop(rid)
        self.records[rid].kv_transfer_s = now - tr.start_s
        tr.decode.scheduler.finish_remote_kv(rid, now)
        tr.prefill.scheduler.release_kv(rid)
        self._try_launch(tr.decode, now)
        self._try_launch(tr.prefill, now)

    # ---- results -------------------------------------------------------------------
    def _result(self, end: float) -> SimResult:
        for rec in self.records.values():
            if rec.finish_s is None and rec.error is None:
                rec.error = "did not complete: the cluster could never schedule it"
        ordered = sorted(
            (r for r in self.records.values() if not self.plan.is_warmup(int(r.request_id.split("-")[1]))),
            key=lambda r: int(r.request_id.split("-")[1]),
        )
        slo = self.cluster.spec.slo
        summary = summarize(ordered, slo.ttft_ms, slo.tpot_ms)
        instances = {}
        for inst in self.instances:
            s = inst.scheduler.stats()
            instances[inst.name] = {
                "role": inst.role,
                "iterations": s.num_iterations,
                "generation_tokens": s.generation_tokens,
                "prompt_tokens": s.prompt_tokens,
                "preemptions": s.num_preemptions,
                "prefix_hit_rate": s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
                "busy_fraction": inst.busy_s / end if end > 0 else 0.0,
                "num_gpu_blocks": s.num_gpu_blocks,
            }
        return SimResult(self.cluster.name, ordered, summary, instances, self.events.processed, end)


def simulate(
    cluster: InferenceCluster, plan: RequestPlan, *, bulk: bool = True, profile: EngineProfile | None = None
) -> SimResult:
    return Simulation(cluster, plan, bulk=bulk, profile=profile).run()
