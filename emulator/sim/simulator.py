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

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from emulator.build import build_instances
from emulator.capacity import profile_of
from emulator.costmodel.engines import EngineProfile, delivered
from emulator.engine.hashing import hashes_from_segments
from emulator.engine.outputs import RequestOutput
from emulator.engine.request import Request
from emulator.engine.scheduler import Scheduler
from emulator.errors import SpecError
from emulator.faults.accounting import fault_accounting
from emulator.faults.schedule import ROUTER, Fault, cut_at, phases, resolve_faults
from emulator.results import RequestRecord, summarize
from emulator.rng import PartitionedRNG
from emulator.roles import get_role, holds_kv_for_peer, is_front, pulls_kv
from emulator.router.policies import EndpointSnapshot, KVAware, LeastLoaded, RoutingRequest, make_policy
from emulator.router.resilience import RetryBudget
from emulator.sim.events import EventQueue
from emulator.sim.loadboard import LoadBoard
from emulator.sim.network import FlowNetwork
from emulator.sim.stages import StagesMixin
from emulator.spec import InferenceCluster
from emulator.workload.clients import ClientBehaviour, ClosedLoopClients
from emulator.workload.plan import PlannedRequest, RequestPlan

MAX_STRETCH_STEPS = 4096
HASH_CACHE_SIZE = 65_536  # distinct prompts whose block hashes stay cached (pooled prompts repeat soon)
# A killed worker is serving again after its supervisor's first back-off (1 s, cluster/supervisor.py)
# plus the process start-up measured on the local cluster (0.85 s: kill at 3.02 s, ready at 4.87 s
# in examples/chaos.yaml's first fault on the CI-sized host). Kubernetes restarts take longer.
RESTART_S = 1.0 + 0.85


class SimInstance:
    def __init__(self, setup) -> None:
        self.setup = setup
        self.name = setup.instance.name
        self.role = setup.instance.role
        self.scheduler = Scheduler(setup.engine, report_every_output=False)
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
        self._snapshot_key: tuple | None = None
        self._snapshot: EndpointSnapshot | None = None
        # faults (emulator/faults): a kill bumps the epoch (events of the old process are dropped)
        self.epoch = 0
        self.down = False
        self.hung = False
        self.slowdown = 1.0
        self.ejected = False  # the router's health check has ejected it
        self.unreachable = False  # partitioned from the router
        self.stretch: _Stretch | None = None  # bulk decode steps planned, not yet applied (Simulation._settle)

    @property
    def routable(self) -> bool:
        return not (self.down or self.ejected or self.unreachable)

    def queue_lengths(self) -> tuple[int, int]:
        """(running, waiting) as the router counts them: waiting includes what its API server holds."""
        s = self.scheduler
        return len(s.running), s.num_waiting + self.api_queued

    def snapshot(self) -> EndpointSnapshot:
        """The router's view, rebuilt only when the engine's queues, its free blocks or its API
        queue changed (a thousand-instance fleet is asked for every view at every arrival)."""
        s = self.scheduler
        key = (id(s), s.version, s.kv.pool.version, self.api_queued)  # a restart brings a new scheduler
        if key == self._snapshot_key:
            return self._snapshot
        self._snapshot_key = key
        running, waiting = self.queue_lengths()
        self._snapshot = EndpointSnapshot(
            self.name,
            num_running=running,
            num_waiting=waiting,
            kv_usage=s.kv.usage,
            free_blocks=s.kv.num_free_blocks,
        )
        return self._snapshot


@dataclass(eq=False)  # one planned stretch is itself, whatever its values
class _Stretch:
    """Identical pure-decode steps an instance runs from ``start_s``, ending at ``ends``: applied to its
    scheduler when the last one ends, or up to the moment something reaches the instance first."""

    start_s: float
    ends: np.ndarray
    streamed: int = 0  # steps whose tokens the API server has already streamed
    seen: float = 0.0  # when clients saw the last of those


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
    prefill_epoch: int = 0


class Simulation(StagesMixin):
    def __init__(
        self, cluster: InferenceCluster, plan: RequestPlan, *, bulk: bool = True, profile: EngineProfile | None = None
    ) -> None:
        """``profile`` replaces the spec's engine profile (the calibration fit tries other constants)."""
        spec = cluster.spec
        for i, pool in enumerate(spec.pools):
            if get_role(pool.role).unavailable:
                raise SpecError([f"spec.pools[{i}].role: {pool.role!r} {get_role(pool.role).unavailable}"])
        self.cluster = cluster
        self.plan = plan
        self.bulk = bulk
        self.profile = profile or profile_of(spec)
        self.topo, setups = build_instances(spec, self.profile)
        self.instances = [SimInstance(s) for s in setups]
        self.front = [i for i in self.instances if is_front(i.role)]
        self.decoders = [i for i in self.instances if pulls_kv(i.role)]
        self.policy = make_policy(spec.router.policy)
        self.decode_policy = KVAware()
        self.events = EventQueue()
        self.net = FlowNetwork()
        self._net_version = 0
        self.transfers: dict[str, _Transfer] = {}
        self.records: dict[str, RequestRecord] = {}
        self._planned: dict[str, PlannedRequest] = {}
        self.api = self.profile.api
        self.stream_interval = spec.engine.stream_interval  # the API server sends every N tokens
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
        # the client's connection pool (workload.client.maxConnections): requests that find every
        # connection busy wait for one, in send order, and that wait counts in their TTFT
        self.conn_limit = client.max_connections
        self._connected: set[str] = set()
        self._conn_queue: deque[int] = deque()
        self._hash_cache: dict[tuple, tuple[int, ...]] = {}
        # the router's resilience, in emulated seconds (as the live router applies it)
        r = spec.router
        self.max_attempts = r.retry.max_attempts
        self.budget = RetryBudget(r.retry.budget_percent, r.retry.min_per_second)
        self.max_waiting = r.admission.max_waiting_per_backend
        self.detect_hang_s = (
            r.health_check.interval_ms * r.health_check.unhealthy_threshold + r.health_check.timeout_ms
        ) * 1e-3
        self.readmit_s = r.health_check.interval_ms * 1e-3 * r.health_check.healthy_threshold
        self.idle_s = r.timeouts.idle_ms * 1e-3
        self.first_byte_s = r.timeouts.first_byte_ms * 1e-3
        self.request_s = r.timeouts.request_ms * 1e-3
        self.recompute = r.pd_fallback == "recompute"
        self.by_name = {i.name: i for i in self.instances}
        self.faults = resolve_faults(spec, self.topo)
        self.timeline: list[dict] = []
        self.cut_pairs: dict[tuple[str, str], int] = {}  # (sender, receiver) -> active cuts
        self.link_changes: dict[tuple[str, str], list[tuple[float, float]]] = {}  # pair -> [(rate x, +lat)]
        self.sent = 0
        self._attempts: dict[str, set[str]] = {}  # request -> instances tried
        for inst in self.instances:
            for tier in {self.topo.scale_up, self.topo.scale_out}:
                cap = tier.bandwidth * inst.setup.instance.num_gpus
                self.net.set_capacity(f"{inst.name}:tx:{tier.name}", cap)
                self.net.set_capacity(f"{inst.name}:rx:{tier.name}", cap)
        self._init_stages(spec, self.topo, setups)
        # least-loaded routing over a fleet without faults (every instance routable) reads a board of
        # queue lengths kept current by change notices instead of snapshotting every instance
        self.board = LoadBoard(self.front) if type(self.policy) is LeastLoaded and not self.faults else None
        if self.stores and self.stores[0].spec.write_policy == "on-evict":
            for inst in self.front:
                inst.scheduler.kv.pool.evicted = []

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
            "connected": self._on_connected,
            "arrival": self._on_arrival,
            "batch_done": self._on_batch_done,
            "launch": self._on_launch,
            "flow_start": self._on_flow_start,
            "flow_done": self._on_flow_done,
            "fault_start": self._on_fault_start,
            "fault_end": self._on_fault_end,
            "fault_switch": self._on_fault_switch,
            "restart": self._on_restart,
            "eject": self._on_eject,
            "readmit": self._on_readmit,
            "stall_check": self._on_stall_check,
            "retrieval_done": self._on_retrieval_done,
            "think_done": self._on_think_done,
            "store_flow": self._on_store_flow,
        }
        for f in self.faults:
            if f.at_s is not None:
                self.events.push(f.at_s, "fault_start", f, observing=True)
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
            self.events.push(t, "send", index)  # routing settles only the instance it picks

    def _on_send(self, now: float, index: int) -> None:
        """The client sends: the router picks an instance, whose API server (one process, one
        event loop: HTTP, chat template, tokenisation) handles requests one at a time and
        hands each to the engine when done. That serial front door is also what spreads
        requests that clients send together."""
        p = self.plan.requests[index]
        rid = f"req-{index}"
        self._planned[rid] = p
        # The clock of the request starts now, whether or not the client has a free connection: aiohttp
        # clients (AIPerf, vllm bench serve, this project's) stamp the start before session.post waits
        # for one, so the wait counts in TTFT.
        self.records[rid] = RequestRecord(rid, now, p.input_len)
        if self.conn_limit is not None:
            if len(self._connected) >= self.conn_limit:
                self._conn_queue.append(index)
                return
            self._connected.add(rid)
        self._on_connected(now, index)

    def _on_connected(self, now: float, index: int) -> None:
        """The request leaves the client on a connection of its own and reaches the router."""
        rid = f"req-{index}"
        p = self._planned[rid]
        rec = self.records[rid]
        if now > rec.arrival_s:
            rec.client_wait_ms = (now - rec.arrival_s) * 1e3
        self.sent += 1
        self.budget.record_request(now)
        for f in self.faults:
            if f.after_requests is not None and self.sent == f.after_requests:
                self.events.push(now, "fault_start", f, observing=True)
        if p.pipeline is not None:
            self._start_pipeline(rid, p, now)
            return
        self._route(index, now)

    def _route(self, index: int, now: float) -> None:
        """The router's choice among routable instances, with its admission control."""
        rid = f"req-{index}"
        p = self._planned[rid]
        rec = self.records[rid]
        tried = self._attempts.setdefault(rid, set())
        board = self.board if not tried else None  # no faults: every instance is routable
        front = self.front if board is not None else [i for i in self.front if i.routable and i.name not in tried]
        if not front:
            self._fail(
                rec, now, "no healthy backend can serve this request", "no_backend" if not tried else "backend_failed"
            )
            return
        snaps = None if board is not None else [i.snapshot() for i in front]
        if (
            board.all_waiting_at_least(self.max_waiting)
            if board is not None
            else all(s.num_waiting >= self.max_waiting for s in snaps)
        ):
            self._fail(rec, now, "every backend's queue is at router.admission.maxWaitingPerBackend", "overloaded")
            return
        if board is not None:
            inst = front[board.least_loaded(self.policy.next_turn())]
        else:
            # Block hashes are computed once per block size (cached): prefix-affinity routes on the
            # leading blocks, and the chosen engine caches by the same hashes.
            routing = RoutingRequest(rid, self._hashes(p, front[0].block_size), None, p.input_len)
            inst = front[self.policy.choose(snaps, routing)]
        if inst.stretch is not None:  # its API server streams the steps that ended, then takes this request
            self._stream_stretch(inst, inst.stretch, int(np.searchsorted(inst.stretch.ends, now, side="left")))
        tried.add(inst.name)
        inst.api_queued += 1
        if self.board is not None:
            self.board.api_moved(inst)
        inst.api_free_s = max(now, inst.api_free_s) + self.api.request_s(p.input_len)
        self.events.push(inst.api_free_s + self.api.latency_s, "arrival", (index, inst, inst.epoch))

    def _stream(self, inst: SimInstance, ends: np.ndarray, outputs: int) -> float:
        """When clients see the tokens of the last of the steps ending at ``ends``: each step's
        streaming work waits for the API server's loop (FIFO with the requests it takes in):
        o_k = max(e_k, o_k-1) + c, so o_n = n c + max(o_0, max_k (e_k - (k-1) c)). A stretch is a
        few steps as a rule: plain floats then, the same operations as numpy's, so the same bits."""
        c = self.api.step_s(outputs)
        n = len(ends)
        if n <= 32:
            latest = -math.inf
            for j, e in enumerate(ends.tolist()):
                v = e - j * c
                if v > latest:
                    latest = v
        else:
            latest = float(np.max(ends - np.arange(n, dtype=np.float64) * c))
        inst.api_free_s = c * n + max(inst.api_free_s, latest)
        return inst.api_free_s

    def _stream_one(self, inst: SimInstance, end: float, outputs: int) -> float:
        """``_stream`` for one step, without arrays."""
        inst.api_free_s = max(end, inst.api_free_s) + self.api.step_s(outputs)
        return inst.api_free_s

    def _client_done(self, rec: RequestRecord) -> None:
        """A request ended (completed or failed); closed-loop clients send their next one."""
        self._attempts.pop(rec.request_id, None)  # memory follows the requests in flight, not the trace
        if rec.request_id in self._connected:  # its connection is free: the longest-waiting request takes it
            self._connected.discard(rec.request_id)
            if self._conn_queue:
                index = self._conn_queue.popleft()
                self._connected.add(f"req-{index}")
                # an event, not a call: a request that fails at once would otherwise recurse through the queue
                self.events.push(rec.finish_s if rec.finish_s is not None else rec.arrival_s, "connected", index)
        if self.clients is not None and rec.finish_s is not None:
            self._send(self.clients.on_done(int(rec.request_id.split("-")[1]), rec.finish_s))

    # ---- requests --------------------------------------------------------------
    def _hashes(self, p: PlannedRequest, block_size: int) -> tuple[int, ...]:
        if not p.segments:
            return ()
        key = (p.segments, block_size)  # pooled prompts repeat: hash each distinct prompt once
        cache = self._hash_cache
        hashes = cache.pop(key, None)
        if hashes is None:
            hashes = hashes_from_segments(p.segments, block_size)
            if len(cache) >= HASH_CACHE_SIZE:  # bounded: memory follows the live prompts, not the trace
                del cache[next(iter(cache))]
        cache[key] = hashes  # most recently used last
        return hashes

    def _on_arrival(self, now: float, payload: tuple[int, SimInstance, int]) -> None:
        index, inst, epoch = payload
        if epoch != inst.epoch:  # sent to a process that died meanwhile: the router retries it
            self._retry_or_fail(f"req-{index}", now, f"{inst.name} died")
            return
        self._settle(inst, now, exact=bool(self.stores))
        inst.api_queued -= 1
        if self.board is not None:
            self.board.api_moved(inst)
        rid = f"req-{index}"
        p = self._planned[rid]
        rec = self.records[rid]
        role = "producer" if holds_kv_for_peer(inst.role) and p.output_len > 1 else "none"
        req = Request(rid, p.input_len, p.output_len, now, self._hashes(p, inst.block_size), kv_role=role)
        self._mark(rid, "arrival", now)
        if self._maybe_fetch(inst, req, rec, now):
            return  # admitted when the store's blocks land
        self._admit(inst, req, rec, now)

    def _admit(self, inst: SimInstance, req: Request, rec: RequestRecord, now: float) -> None:
        self._settle(inst, now, exact=bool(self.stores))
        rejected = inst.scheduler.add_request(req, during_step=inst.in_flight > 0)
        if rejected is not None:
            self._fail(rec, now, req.error or "rejected")
            return
        inst.live[req.request_id] = req
        rec.instance = inst.name
        self._try_launch(inst, now)

    def _fail(self, rec: RequestRecord, now: float, error: str, code: str = "request_failed") -> None:
        if rec.finish_s is not None and rec.error is not None:
            return  # already ended
        rec.ok = False
        rec.error = error
        rec.error_code = code
        rec.finish_s = now
        pipe = self._pipes.pop(rec.request_id, None)
        if pipe is not None:
            rec.stages = pipe.stages
        self._client_done(rec)

    def _retry_or_fail(self, rid: str, now: float, why: str) -> None:
        """Before the first byte reached the client, the router may retry elsewhere (within its budget)."""
        rec = self.records[rid]
        if len(self._attempts.get(rid, ())) < self.max_attempts and self.budget.try_retry(now):
            self._route(int(rid.split("-")[1]), now)
        else:
            self._fail(rec, now, f"every backend tried failed ({why})", "backend_failed")

    # ---- instances ---------------------------------------------------------------
    def _on_launch(self, now: float, inst: SimInstance) -> None:
        inst.launch_pending = False
        self._try_launch(inst, now)

    def _try_launch(self, inst: SimInstance, now: float) -> None:
        if inst.in_flight >= inst.pp or inst.down or inst.hung:
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
        if self.stores and sched.kv.pool.evicted:
            self._drain_evictions(inst, now)
        for rid in out.kv_pulls:
            self._start_pull(inst, rid, now)
        if out.is_empty:
            return
        st = inst.cost.step_time(out.shape)
        total_s, interval_s = st.total_s * inst.slowdown, st.interval_s * inst.slowdown
        inst.in_flight += 1
        inst.busy_s += interval_s
        self.events.push(
            now + total_s, "batch_done", (inst, out, None, inst.epoch), observing=holds_kv_for_peer(inst.role)
        )
        if inst.pp > 1:
            inst.next_launch_s = now + interval_s
            if inst.in_flight < inst.pp and not inst.launch_pending:
                inst.launch_pending = True
                self.events.push(inst.next_launch_s, "launch", inst)

    def _try_stretch(self, inst: SimInstance, now: float) -> bool:
        sched = inst.scheduler
        horizon, kv_sum = sched.steady_decode_plan(MAX_STRETCH_STEPS)
        if horizon < 2:
            return False
        batch = len(sched.running)
        dts = inst.cost.decode_stretch_s(batch, kv_sum, horizon)
        if inst.slowdown != 1.0:  # (a multiplication by one changes no bit: skipped)
            dts = dts * inst.slowdown
        ends = np.add.accumulate(np.concatenate(([now], dts)))[1:]
        # An event that may reach any instance (a fault, a KV hand-off) ends the stretch before it; a
        # request routed here settles it when it comes (_settle), so other instances' traffic does not.
        n = int(np.searchsorted(ends, self.events.next_observing(), side="left"))  # n <= horizon
        if n < 2:
            return False
        inst.in_flight += 1
        self._plan_stretch(inst, _Stretch(now, ends[:n]))
        return True

    def _plan_stretch(self, inst: SimInstance, st: _Stretch) -> None:
        inst.stretch = st
        self.events.push(
            float(st.ends[-1]), "batch_done", (inst, None, st, inst.epoch), observing=holds_kv_for_peer(inst.role)
        )

    def _stream_stretch(self, inst: SimInstance, st: _Stretch, upto: int) -> None:
        """The API server streams the tokens of the stretch's steps up to ``upto`` (their outputs are
        every running request's: none finishes before the stretch's last step)."""
        if upto > st.streamed:
            st.seen = self._stream(inst, st.ends[st.streamed : upto], len(inst.scheduler.running))
            st.streamed = upto

    def _settle(self, inst: SimInstance, now: float, exact: bool = True) -> None:
        """Something reaches an instance mid-stretch: the steps that ended before ``now`` are applied
        (their tokens streamed), the step under way finishes on its own and the rest of the stretch is
        dropped. Routing reads only queue lengths, which a stretch leaves unchanged until its last step
        ends. ``exact``: the step under way takes its KV blocks now, as the engine did when it started
        it (a decode choice by free blocks, a prefix lookup that its evictions change); otherwise it
        stays a one-step stretch applied when it ends, which costs less and changes nothing else."""
        st = inst.stretch
        if st is None:
            return
        # steps that ended before now; the stretch's own event has run by then, so k < len(st.ends)
        k = int(np.searchsorted(st.ends, now, side="left"))
        if not exact and k == 0 and len(st.ends) == 1:
            return  # already no more than the step under way
        inst.stretch = None
        if k:
            self._stream_stretch(inst, st, k)
            results = inst.scheduler.advance_steady(st.ends[:k])
            inst.busy_s += float(st.ends[k - 1] - st.start_s)
            self._handle_results(inst, results, float(st.ends[k - 1]), st.seen)
        start = float(st.ends[k - 1]) if k else st.start_s
        if not exact:
            self._plan_stretch(inst, _Stretch(start, st.ends[k : k + 1]))
            return
        out = inst.scheduler.schedule(start)
        step = inst.cost.step_time(out.shape)
        inst.busy_s += step.interval_s * inst.slowdown
        self.events.push(
            start + step.total_s * inst.slowdown,
            "batch_done",
            (inst, out, None, inst.epoch),
            observing=holds_kv_for_peer(inst.role),
        )

    def _on_batch_done(self, now: float, payload: tuple) -> None:
        inst, output, stretch, epoch = payload
        if epoch != inst.epoch:
            return  # the step of a process that was killed
        if stretch is not None and inst.stretch is not stretch:
            return  # a stretch that was settled early: its step under way ends on its own
        inst.in_flight -= 1
        if stretch is None:
            sched = inst.scheduler
            results = sched.update_from_output(output, now)
            seen = self._stream_one(inst, now, sched.last_num_outputs)
            for req in sched.first_tokens:  # first tokens reach their clients through the API server
                rec = self.records.get(req.request_id)
                if req.request_id not in inst.live or rec is None:
                    continue
                if req.kv_role != "producer":  # (a P/D prefill's token stays there: the client's comes from the decode)
                    if rec.first_token_s is not None:
                        continue  # a first token again (recomputed after a preemption): its blocks went already
                    rec.first_token_s = seen
                if self.stores and is_front(inst.role):  # the prompt is computed: write-through sends its blocks
                    self._prefill_written(inst, req, now)
        else:
            st, inst.stretch = stretch, None
            self._stream_stretch(inst, st, len(st.ends))
            results = inst.scheduler.advance_steady(st.ends)
            inst.busy_s += float(st.ends[-1] - st.start_s)
            seen = st.seen
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
            rec.error_code = None if rec.ok else "request_failed"
            rec.output_tokens = req.num_output_tokens
            rec.finish_s = seen
            rec.instance = inst.name
            rec.cached_tokens = max(rec.cached_tokens, req.num_cached_tokens)
            rec.preemptions += req.num_preemptions
            # the client sees every token shifted by the streaming path (seen - now); a P/D client's
            # tokens all come from the decode instance
            shift = seen - now
            if req.num_output_tokens > 1:
                if self.stream_interval == 1:
                    rec.itl_max_ms = req.max_itl_s * 1e3
                else:  # the client's longest wait is between two of the API server's sends
                    rec.itl_max_ms = float(np.max(np.diff(delivered(req.token_times(), self.stream_interval)))) * 1e3
            if (
                rec.ok
                and ro.request_id in self._pipes
                and self._generate_done(
                    ro.request_id, req, rec, delivered(req.token_times(), self.stream_interval) + shift, seen
                )
            ):
                continue  # the pipeline's next stage runs
            self._pipes.pop(ro.request_id, None)
            self._client_done(rec)

    # ---- P/D ---------------------------------------------------------------------
    def _hand_off(self, prefill: SimInstance, req: Request, rec: RequestRecord, now: float) -> None:
        rec.prefill_instance = prefill.name
        self._mark(req.request_id, "handoff", now)
        rec.cached_tokens = req.num_cached_tokens
        rec.preemptions += req.num_preemptions
        if not self.decoders:
            prefill.scheduler.release_kv(req.request_id)
            self._fail(rec, now, "no decode instance")
            return
        p = self._planned[req.request_id]
        decoders = [d for d in self.decoders if d.routable]
        if not decoders:
            prefill.scheduler.release_kv(req.request_id)
            self._fail(rec, now, "no healthy decode instance", "backend_failed")
            return
        for d in decoders:  # the decode choice reads free KV blocks, which a stretch changes step by step
            self._settle(d, now)
        snaps = [d.snapshot() for d in decoders]
        dec = decoders[self.decode_policy.choose(snaps, RoutingRequest(req.request_id))]
        consumer = Request(
            req.request_id,
            req.num_prompt_tokens,
            req.max_tokens,
            req.arrival_s,
            self._hashes(p, dec.block_size),
            kv_role="consumer",
        )
        rejected = dec.scheduler.add_request(consumer)
        if rejected is not None:
            prefill.scheduler.release_kv(req.request_id)
            self._fail(rec, now, consumer.error or "rejected by decode")
            return
        dec.live[req.request_id] = consumer
        nbytes = prefill.cost.kv_transfer_bytes(req.num_prompt_tokens)
        self.transfers[req.request_id] = _Transfer(prefill, dec, nbytes, prefill_epoch=prefill.epoch)
        self._try_launch(dec, now)

    def _start_pull(self, dec: SimInstance, rid: str, now: float) -> None:
        """The decode's blocks are set aside: after the hand-off path (the engine's fitted fixed cost:
        the router's second leg, the decode's intake, its KV connector's set-up) the pull starts."""
        tr = self.transfers[rid]
        tr.start_s = now + self.api.pd_handoff_s
        if tr.prefill_epoch != tr.prefill.epoch or self.cut_pairs.get((tr.prefill.name, dec.name)):
            self._transfer_failed(rid, now)  # the prefill died, or the link is cut: answered at once
            return
        tier = self.topo.tier_between(tr.prefill.setup.instance, dec.setup.instance)
        extra = sum(lat for _, lat in self.link_changes.get((tr.prefill.name, dec.name), []))
        self.events.push(tr.start_s + tier.latency_s + extra, "flow_start", (rid, tier.name))

    def _transfer_failed(self, rid: str, now: float) -> None:
        """router.pdFallback: recompute the prompt on the decode instance, or fail the request."""
        tr = self.transfers.pop(rid, None)
        if tr is None:
            return
        if rid in self.net.flows:
            self.net.remove(rid, now)
            self._reschedule_flows(now)
        dec = tr.decode
        self._settle(dec, now)
        self._settle(tr.prefill, now)
        if tr.prefill_epoch == tr.prefill.epoch:
            tr.prefill.scheduler.release_kv(rid)
        if rid not in dec.scheduler.pulling:
            return
        if self.recompute:
            dec.scheduler.recompute_remote(rid)
            self._try_launch(dec, now)
            return
        dec.scheduler.abort(rid)
        dec.live.pop(rid, None)
        self._fail(self.records[rid], now, "KV transfer failed", "request_failed")

    def _on_flow_start(self, now: float, payload: tuple[str, str]) -> None:
        rid, tier = payload
        tr = self.transfers.get(rid)
        if tr is None:
            return  # failed meanwhile
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
        landed = self._flow_done.pop(rid, None)
        if landed is not None:  # a KV-store fetch or write
            landed(now)
            return
        tr = self.transfers.pop(rid)
        self._settle(tr.decode, now)
        self._settle(tr.prefill, now)
        if rid not in tr.decode.scheduler.pulling:
            return  # its decode died meanwhile
        self.records[rid].kv_transfer_s = now - tr.start_s
        tr.decode.scheduler.finish_remote_kv(rid, now)
        tr.prefill.scheduler.release_kv(rid)
        self._try_launch(tr.decode, now)
        self._try_launch(tr.prefill, now)

    # ---- faults (the same schedule the local cluster and the operator play) ---------------
    def _on_fault_start(self, now: float, f: Fault) -> None:
        entry = {"name": f.name, "kind": f.kind, "targets": list(f.instances) or [list(g) for g in f.groups]}
        self.timeline.append({**entry, "start_s": now, "end_s": None})
        for name in f.instances:
            self._settle(self.by_name[name], now)
        if f.kind == "kill":
            for name in f.instances:
                self._kill(self.by_name[name], now)
            self.events.push(now + RESTART_S, "restart", (f, [self.by_name[n] for n in f.instances]), observing=True)
            return
        for name in f.instances:
            inst = self.by_name[name]
            if f.kind == "slow":
                inst.slowdown = f.factor
            elif f.kind == "hang":
                inst.hung = True
                self.events.push(now + self.detect_hang_s, "eject", (inst, inst.epoch), observing=True)
                self.events.push(now + self.idle_s, "stall_check", (inst, inst.epoch, "idle"), observing=True)
                self.events.push(
                    now + self.first_byte_s, "stall_check", (inst, inst.epoch, "first_byte"), observing=True
                )
        if f.kind in ("link", "partition"):
            switches = phases(f, now, now + (f.duration_s or 1e12))
            self._set_links(f, switches[0][1], True, now)
            for t, cut in switches[1:]:
                self.events.push(t, "fault_switch", (f, cut), observing=True)
        if f.duration_s is not None:
            self.events.push(now + f.duration_s, "fault_end", f, observing=True)

    def _on_fault_switch(self, now: float, payload: tuple[Fault, bool]) -> None:
        f, cut = payload
        if any(e["name"] == f.name and e["end_s"] is None for e in self.timeline):
            self._set_links(f, not cut, False, now)  # undo the previous phase, then apply this one
            self._set_links(f, cut, True, now)

    def _on_fault_end(self, now: float, f: Fault) -> None:
        for e in self.timeline:
            if e["name"] == f.name and e["end_s"] is None:
                e["end_s"] = now
        for name in f.instances:
            inst = self.by_name[name]
            self._settle(inst, now)
            if f.kind == "slow":
                inst.slowdown = 1.0
            elif f.kind == "hang":
                inst.hung = False
                self.events.push(now + self.readmit_s, "readmit", (inst, inst.epoch), observing=True)
                self._try_launch(inst, now)
        if f.kind in ("link", "partition"):
            elapsed = now - next(e["start_s"] for e in self.timeline if e["name"] == f.name)
            self._set_links(f, f.kind == "partition" or cut_at(f, elapsed), False, now)

    def _set_links(self, f: Fault, cut: bool, on: bool, now: float) -> None:
        """Apply (or undo) a link or partition fault on its pairs: a cut fails transfers at once (they fall
        back); a degraded link slows the sender's side and adds latency to transfers it starts."""
        step = 1 if on else -1
        for sender, peer in f.pairs():
            if ROUTER in (sender, peer):
                continue
            pair = (sender, peer)
            if f.kind == "partition" or cut:
                self.cut_pairs[pair] = self.cut_pairs.get(pair, 0) + step
                if on:
                    for rid, tr in list(self.transfers.items()):
                        if (tr.prefill.name, tr.decode.name) == pair and rid in self.net.flows:
                            self._transfer_failed(rid, now)
            else:
                changes = self.link_changes.setdefault(pair, [])
                change = (f.bandwidth_factor, f.added_latency_s)
                if on:
                    changes.append(change)
                elif change in changes:
                    changes.remove(change)
                self._apply_rate(self.by_name[sender], now)
        if f.kind == "partition":
            a, b = f.groups
            cut_off = b if ROUTER in a else a if ROUTER in b else ()
            for name in cut_off:
                if name != ROUTER:
                    self.by_name[name].unreachable = on

    def _apply_rate(self, inst: SimInstance, now: float) -> None:
        """The sender's tx capacity: the tier's, times the lowest factor of its active link faults."""
        factors = [fac for (s, _), ch in self.link_changes.items() if s == inst.name for fac, _ in ch]
        factor = min(factors, default=1.0)
        for tier in {self.topo.scale_up, self.topo.scale_out}:
            cap = tier.bandwidth * inst.setup.instance.num_gpus * factor
            self.net.set_capacity(f"{inst.name}:tx:{tier.name}", cap)
        self._reschedule_flows(now)

    def _kill(self, inst: SimInstance, now: float) -> None:
        """The process dies: requests that streamed nothing are retried elsewhere, streamed ones fail;
        KV it held is gone (decodes waiting for it fall back); it restarts cold."""
        self._settle(inst, now)
        inst.down = True
        inst.epoch += 1
        inst.in_flight = 0
        inst.launch_pending = False
        inst.api_queued = 0
        lost = list(inst.live.values())
        inst.live = {}
        inst.scheduler = Scheduler(inst.setup.engine, report_every_output=False)
        for rid, tr in list(self.transfers.items()):
            if tr.prefill is inst:
                self._transfer_failed(rid, now)
            elif tr.decode is inst:
                self.transfers.pop(rid, None)
                if rid in self.net.flows:
                    self.net.remove(rid, now)
                    self._reschedule_flows(now)
        for req in lost:
            rid = req.request_id
            rec = self.records[rid]
            if rec.first_token_s is None and rec.prefill_instance is not None:
                self._redecode(inst, req, rec, now)  # a P/D decode leg that sent nothing: another decode takes it
            elif rec.first_token_s is None:
                self._retry_or_fail(rid, now, f"{inst.name} died")
            else:
                self._fail(rec, now, f"backend {inst.name} failed mid-stream", "backend_failed")

    def _on_restart(self, now: float, payload: tuple[Fault, list[SimInstance]]) -> None:
        f, insts = payload
        for inst in insts:
            inst.down = False
            inst.api_free_s = now
        for e in self.timeline:
            if e["name"] == f.name and e["end_s"] is None:
                e["end_s"] = now

    def _on_eject(self, now: float, payload: tuple[SimInstance, int]) -> None:
        inst, epoch = payload
        if inst.hung and epoch == inst.epoch:
            inst.ejected = True

    def _on_readmit(self, now: float, payload: tuple[SimInstance, int]) -> None:
        inst, _ = payload
        if not inst.hung:
            inst.ejected = False

    def _on_stall_check(self, now: float, payload: tuple[SimInstance, int, str]) -> None:
        """A hung instance, as the router's timeouts see it: a stream it was sending stalls past
        ``idle`` and fails explicitly; a request it never answered passes ``first_byte`` and is retried
        elsewhere (a P/D decode leg: another decode instance recomputes the prompt)."""
        inst, epoch, stage = payload
        if not inst.hung or epoch != inst.epoch:
            return
        self._settle(inst, now)
        for rid in list(inst.live):
            req, rec = inst.live[rid], self.records[rid]
            streamed_here = req.num_output_tokens > 0
            if streamed_here != (stage == "idle"):
                continue
            inst.scheduler.abort(rid)
            inst.live.pop(rid)
            self.transfers.pop(rid, None)
            if stage == "idle":
                self._fail(rec, now, f"backend {inst.name} stalled mid-stream", "backend_failed")
            elif rec.prefill_instance is None:
                self._retry_or_fail(rid, now, f"{inst.name} did not answer")
            else:
                self._redecode(inst, req, rec, now)

    def _redecode(self, failed: SimInstance, req: Request, rec: RequestRecord, now: float) -> None:
        others = [d for d in self.decoders if d.routable and d is not failed]
        if not others or not self.budget.try_retry(now):
            self._fail(rec, now, f"decode {failed.name} did not answer", "backend_failed")
            return
        for d in others:
            self._settle(d, now)
        dec = others[self.decode_policy.choose([d.snapshot() for d in others], RoutingRequest(req.request_id))]
        again = Request(req.request_id, req.num_prompt_tokens, req.max_tokens, req.arrival_s)
        if dec.scheduler.add_request(again) is not None:
            self._fail(rec, now, again.error or "rejected by decode", "backend_failed")
            return
        dec.live[req.request_id] = again
        self._try_launch(dec, now)

    # ---- results -------------------------------------------------------------------
    def _result(self, end: float) -> SimResult:
        for rec in self.records.values():
            if rec.finish_s is None and rec.error is None:
                rec.error = "did not complete: the cluster could never schedule it"
        ordered = sorted(
            (r for r in self.records.values() if not self.plan.is_warmup(int(r.request_id.split("-")[1]))),
            key=lambda r: int(r.request_id.split("-")[1]),
        )
        for rec in ordered:  # the router's deadline ends what would have run longer
            if rec.ok and rec.finish_s is not None and rec.finish_s - rec.arrival_s > self.request_s:
                rec.ok, rec.error, rec.error_code = False, "the request's deadline passed", "deadline_exceeded"
        slo = self.cluster.spec.slo
        summary = summarize(ordered, slo.ttft_ms, slo.tpot_ms, slo.e2e_ms)
        summary["faults"] = fault_accounting(ordered, self.timeline, slo.ttft_ms, slo.tpot_ms, end)
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
        instances.update(self.stage_stats(end))
        if self.stores:
            summary["kvstore"] = _store_summary([instances[st.name] for st in self.stores])
        return SimResult(self.cluster.name, ordered, summary, instances, self.events.processed, end)


def simulate(
    cluster: InferenceCluster, plan: RequestPlan, *, bulk: bool = True, profile: EngineProfile | None = None
) -> SimResult:
    return Simulation(cluster, plan, bulk=bulk, profile=profile).run()


def _store_summary(stores: list[dict]) -> dict:
    """The KV tier as a whole: hit rate over the blocks engines asked for, bytes both ways."""
    asked = sum(s["lookup_blocks"] for s in stores)
    return {
        "hit_rate": sum(s["hit_blocks"] for s in stores) / asked if asked else 0.0,
        "bytes_fetched": sum(s["bytes_fetched"] for s in stores),
        "bytes_written": sum(s["bytes_written"] for s in stores),
        "evicted_blocks": sum(s["evicted_blocks"] for s in stores),
    }
