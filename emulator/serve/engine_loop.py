"""The real-time driver: the simulator's engine objects, stepped on asyncio against the wall clock.

Each step is scheduled, priced by the cost model, and completed by a timer at
an absolute deadline: when work continues, the next step starts at the previous
deadline, not at the (late) wake-up, so lateness never accumulates. The
lateness itself is measured and exported (``infemu_iteration_timing_error_*``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from emulator.costmodel.interface import CostModel
from emulator.engine.outputs import SchedulerOutput
from emulator.engine.request import Request
from emulator.engine.scheduler import Scheduler
from emulator.serve.api_path import ApiServerPath
from emulator.serve.metrics import EngineMetrics
from emulator.trust import MIN_TIMED_STEPS, TIMING_BUDGET, suggested_dilation

log = logging.getLogger("infemu.engine")

KVPull = Callable[[Request, dict], Awaitable[None]]


@dataclass
class StreamEvent:
    kind: str  # tokens | finish | error
    count: int = 0
    at: float = 0.0  # tokens: when the model releases them to their streams (the loop's clock)
    reason: str | None = None
    message: str | None = None
    # an error's HTTP status: 400 when the request itself can never run here (the client's to fix),
    # 503 when the server failed it (shutting down, a KV transfer lost): the router retries those
    status: int = 503


@dataclass
class Handle:
    request: Request
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    kv_source: dict | None = None
    # Takes an event where it is delivered, without waking the request's task (True: taken). A
    # streaming handler sets it to write a step's tokens straight to its socket: waking one task per
    # stream per step cost more than building and writing the tokens.
    sink: Callable[[StreamEvent], bool] | None = None


def _deliver(events: list[tuple[Handle, StreamEvent]]) -> None:
    for handle, ev in events:
        sink = handle.sink
        if sink is None or not sink(ev):
            handle.queue.put_nowait(ev)


class RealTimeEngine:
    def __init__(
        self,
        scheduler: Scheduler,
        cost: CostModel,
        metrics: EngineMetrics,
        pp: int = 1,
        kv_pull: KVPull | None = None,
        dilation: float = 1.0,
        api_path: ApiServerPath | None = None,
        exchanger=None,
    ) -> None:
        self.scheduler = scheduler
        self.cost = cost
        self.metrics = metrics
        self.pp = pp
        self.kv_pull = kv_pull
        self.dilation = dilation  # wall seconds per emulated second
        metrics.suggested_dilation.set(dilation)  # until enough steps say otherwise
        self.api_path = api_path  # when set, tokens reach their streams when the modelled API server has sent them
        self.exchanger = exchanger  # AFD: the step's activations really go to the FFN instances and back
        kernels = getattr(cost, "kernels", None)
        self._afd_terms = getattr(kernels, "terms", None)
        self._afd_tier = kernels.afd.tier.name if self._afd_terms is not None else ""
        self.handles: dict[str, Handle] = {}
        self.in_flight = 0
        self._next_launch = 0.0
        self._launch_timer: asyncio.TimerHandle | None = None
        self._last_stats = scheduler.stats()
        self._errors: collections.deque[float] = collections.deque(maxlen=1000)
        self._durations: collections.deque[float] = collections.deque(maxlen=1000)
        self.timing_error_ratio = 0.0  # the last step-timing error p99 / median modelled step (0 until measured)
        self._warned_at = -1e9
        self._pulls: set[asyncio.Task] = set()
        # requests the modelled API server still holds: (their admission timer, their handle)
        self._pending: dict[str, tuple[asyncio.TimerHandle, Handle]] = {}
        self._busy_until = 0.0  # logical end of the last step: a backdated arrival cannot start before it
        self._lead_s = 0.0  # timers fire this early: the median wake-up lateness, learned (no busy-waiting)
        self._raw_late: collections.deque[float] = collections.deque(maxlen=200)
        self._steps_timed = 0
        self.closed = False
        # fault injection (serve/faults.py): a slowed GPU multiplies every step; a hung one launches none
        self.slowdown = 1.0
        self.paused = False
        self.kv_timeout_s: float | None = None  # a pull slower than this fails (wall seconds)
        self.recompute_on_kv_failure = True  # router.pdFallback: prefill locally instead of failing

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def now(self) -> float:
        return self.loop.time()

    # ---- intake ------------------------------------------------------------------
    def add(self, req: Request, kv_source: dict | None = None, start_at: float | None = None) -> Handle:
        """Queue a request; its rejection (if any) arrives as the handle's first event.

        ``req.arrival_s`` may lie slightly in the past (when the router or the HTTP layer
        received it): an idle engine then starts the step at that moment, so HTTP parsing
        does not delay the modelled GPU work. ``start_at``: the engine sees the request only
        then (the modelled API server is still taking it in)."""
        handle = Handle(req, kv_source=kv_source)
        if start_at is not None and start_at > self.now():
            self._pending[req.request_id] = (self.loop.call_at(start_at, self._admit, handle, start_at), handle)
            return handle
        return self._admit(handle, start_at)

    def _admit(self, handle: Handle, start_at: float | None) -> Handle:
        req = handle.request
        self._pending.pop(req.request_id, None)
        if self.closed:
            handle.queue.put_nowait(StreamEvent("error", message="the server is shutting down"))
            return handle
        rejected = self.scheduler.add_request(req, during_step=self.in_flight > 0)
        if rejected is not None:
            handle.queue.put_nowait(StreamEvent("error", message=req.error, status=400))
            return handle
        self.handles[req.request_id] = handle
        begin = req.arrival_s if start_at is None else start_at
        self._try_launch(max(min(begin, self.now()), self._busy_until))
        return handle

    def abort(self, request_id: str) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:  # still in the modelled API server: it never reaches the engine
            pending[0].cancel()
            self.metrics.success["abort"].inc()
            return
        if self.handles.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)
            self.metrics.success["abort"].inc()

    # ---- stepping ------------------------------------------------------------------
    def resume(self) -> None:
        """A hang ended: steps start again from now."""
        self.paused = False
        self._try_launch(self.now())

    def _try_launch(self, start: float) -> None:
        if self.closed or self.paused or self.in_flight >= self.pp:
            return
        if start < self._next_launch:
            if self._launch_timer is None:
                self._launch_timer = self.loop.call_at(self._next_launch, self._timer_launch)
            return
        out = self.scheduler.schedule(start)
        for rid in out.kv_pulls:
            self._start_pull(rid)
        if out.is_empty:
            return
        st = self.cost.step_time(out.shape)
        scale = self.dilation * self.slowdown
        total_s, interval_s = st.total_s * scale, st.interval_s * scale
        deadline = start + total_s
        self.in_flight += 1
        self.metrics.modelled.observe(total_s)  # wall seconds: what the timing error is compared with
        exchange = None
        if self._afd_terms is not None:  # an AFD engine: where its step went, per side and on the wire
            terms = self._afd_terms(out.shape, self.cost.graph_tokens(out.shape))
            self.metrics.afd_step(terms, self._afd_tier)
            if self.exchanger is not None:
                exchange = asyncio.ensure_future(self.exchanger.run(terms["exchange_bytes_each_way"], self.metrics))
        self.metrics.iteration_tokens.observe(out.shape.num_tokens)
        self._busy_until = max(self._busy_until, deadline if self.pp == 1 else start + interval_s)
        self.loop.call_at(deadline - self._lead_s, self._complete, out, deadline, total_s, exchange)
        if self.pp > 1:
            self._next_launch = start + interval_s
            if self.in_flight < self.pp and self._launch_timer is None:
                self._launch_timer = self.loop.call_at(self._next_launch, self._timer_launch)

    def _timer_launch(self) -> None:
        self._launch_timer = None
        self._try_launch(self._next_launch)

    def _complete(
        self, out: SchedulerOutput, deadline: float, duration: float, exchange: asyncio.Future | None = None
    ) -> None:
        if exchange is not None and not exchange.done():
            # the activations are not back yet (a slow or degraded link): the step ends when they are
            exchange.add_done_callback(lambda _: self._end_step(out, max(deadline, self.now()), duration, False))
            return
        self._end_step(out, deadline, duration, True)

    def _end_step(self, out: SchedulerOutput, deadline: float, duration: float, on_time: bool) -> None:
        """The step's tokens to their streams; the rest waits for ``_after_step``.

        Only the tokens are what the clients see. The rest is the engine's own bookkeeping: timing
        statistics, the finished requests' histograms, and launching the next step, which starts at
        this deadline whenever it is launched. Engines that share a process (instancesPerProcess) end
        their steps in the same wake-up, and each one's bookkeeping lay between the next one's deadline
        and its tokens, so it runs once the wake-up's other steps have delivered. 32 instances on 2
        processes at D=8, worst step-timing error p99 (2026-11-29, each pair alternated in one sitting):
        4.5-5.6 ms with all of it inside the step's end, then 2.6-3.5 ms with the launch deferred; 3.0-4.7
        ms with the launch deferred, then 2.1-3.6 ms with the statistics and histograms deferred too."""
        lateness = self.now() - deadline
        self.in_flight -= 1
        results = self.scheduler.update_from_output(out, deadline)
        release = self.api_path.release(deadline, len(results)) if self.api_path is not None else deadline
        events: list[tuple[Handle, StreamEvent]] = []
        firsts: list[tuple[Handle, StreamEvent]] = []
        finished: list[Request] = []
        for ro in results:
            handle = self.handles.get(ro.request_id)
            if handle is None:
                continue
            if ro.new_tokens:
                ev = (handle, StreamEvent("tokens", ro.new_tokens, release))
                # first tokens go out ahead of the step's other tokens: every process on the way back
                # (worker, router, client) handles a step's tokens one stream after the other, and
                # a first token waiting behind the batch's would read as TTFT the model never had
                (firsts if handle.request.first_token_s == deadline else events).append(ev)
            if ro.finished and ro.finish_reason == "error":  # the scheduler ended it (it could never run)
                self.handles.pop(ro.request_id, None)
                events.append((handle, StreamEvent("error", message=handle.request.error or "request failed")))
            elif ro.finished:
                reason = ro.finish_reason or "length"
                del self.handles[ro.request_id]
                if reason != "remote_decode":  # a P/D prefill's request is observed where it decodes
                    finished.append(handle.request)
                events.append((handle, StreamEvent("finish", reason=reason)))
        if firsts:
            events = firsts + events
        if release > self.now():
            self.loop.call_at(release, _deliver, events)
        else:
            _deliver(events)
        # an overloaded host must not fall ever further behind: the next step starts from now then
        start = deadline if lateness < 0.05 else self.now()
        # a step held back by its exchange says nothing about this host's timer accuracy
        self.loop.call_soon(self._after_step, lateness if on_time else None, duration, finished, start)

    def _after_step(self, lateness: float | None, duration: float, finished: list[Request], start: float) -> None:
        if lateness is not None:
            self._learn_lead(lateness)  # before the launch: its timer fires early by the lead
        self._try_launch(start)
        if lateness is not None:
            self._record_timing(lateness, duration)
        for req in finished:
            self._observe_request(req)

    def _observe_request(self, req: Request) -> None:
        """Per-request histograms in emulated seconds (wall seconds / dilation)."""
        m = self.metrics
        d = self.dilation
        arrival, first, finish = req.arrival_s, req.first_token_s, req.finish_s
        if first is not None:  # a P/D decode's too: its first token is the client's (vLLM records it there)
            m.ttft.observe((first - arrival) / d)
        if finish is not None:
            m.e2e.observe((finish - arrival) / d)
        if req.first_scheduled_s is not None:
            m.queue.observe((req.first_scheduled_s - arrival) / d)
            if finish is not None:
                m.inference.observe((finish - req.first_scheduled_s) / d)
            if first is not None:
                m.prefill.observe((first - req.first_scheduled_s) / d)
        if first is not None and finish is not None:
            m.decode.observe((finish - first) / d)
            if req.num_output_tokens > 1:
                m.request_tpot.observe((finish - first) / d / (req.num_output_tokens - 1))
        if req.first_scheduled_s is not None and first is not None and req.num_prompt_tokens > 0:
            m.prefill_per_token.observe((first - req.first_scheduled_s) / d / req.num_prompt_tokens)
        m.req_max_generation_tokens.observe(req.max_tokens)
        m.req_params_n.observe(1)  # n > 1 is refused at the API
        m.req_params_max_tokens.observe(req.max_tokens)
        gaps = np.diff(req.token_times()) / d
        m.itl.observe_many(gaps)
        m.tpot.observe_many(gaps)
        m.req_prompt_tokens.observe(req.num_prompt_tokens)
        m.req_generation_tokens.observe(req.num_output_tokens)

    # ---- P/D: pulling KV -----------------------------------------------------------
    def _start_pull(self, rid: str) -> None:
        handle = self.handles.get(rid)
        if handle is None or self.kv_pull is None or handle.kv_source is None:
            self.scheduler.abort(rid)
            if handle is not None:
                self.handles.pop(rid, None)
                handle.queue.put_nowait(StreamEvent("error", message="no KV source for a remote-prefill request"))
            return
        task = asyncio.ensure_future(self._pull(handle))
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)

    async def _pull(self, handle: Handle) -> None:
        rid = handle.request.request_id
        try:
            await asyncio.wait_for(self.kv_pull(handle.request, handle.kv_source), self.kv_timeout_s)
        except Exception as exc:  # the transfer failed or timed out: recompute here, or an explicit error
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
            if rid not in self.handles:
                return
            if self.recompute_on_kv_failure and rid in self.scheduler.pulling:
                log.warning("KV pull for %s failed (%s): recomputing the prompt here", rid, reason)
                self.metrics.count_kv_failure("recompute")
                self.scheduler.recompute_remote(rid)
                self._try_launch(self.now())
                return
            log.warning("KV pull for %s failed: %s", rid, reason)
            self.metrics.count_kv_failure("failed")
            self.handles.pop(rid, None)
            self.scheduler.abort(rid)
            handle.queue.put_nowait(StreamEvent("error", message=f"KV transfer failed: {reason}"))
            return
        if rid not in self.handles:
            return  # aborted meanwhile
        self.scheduler.finish_remote_kv(rid, self.now())
        self._try_launch(self.now())

    def _learn_lead(self, lateness: float) -> None:
        """asyncio timers fire late (epoll rounds timeouts up to the next millisecond); firing
        early by the median lateness centres the error on zero at no CPU cost."""
        self._raw_late.append(lateness + self._lead_s)
        self._steps_timed += 1  # the deques stop growing when full: count steps, not their length
        if len(self._raw_late) >= 20 and self._steps_timed % 10 == 0:
            # statistics sorts the deque in C: numpy first copies it element by element into an array
            self._lead_s = min(max(statistics.median(self._raw_late), 0.0), 0.002)

    # ---- observation ----------------------------------------------------------------
    def _record_timing(self, lateness: float, duration: float) -> None:
        self.metrics.timing_error.observe(lateness)
        self._errors.append(lateness)
        self._durations.append(duration)
        if len(self._errors) >= MIN_TIMED_STEPS and self._steps_timed % 25 == 0:
            p99 = statistics.quantiles(self._errors, n=100, method="inclusive")[98]  # numpy's default p99
            median = statistics.median(self._durations)
            self.metrics.timing_error_p99.set(p99)
            self.timing_error_ratio = p99 / median if median > 0 else 0.0
            self.metrics.timing_error_ratio.set(self.timing_error_ratio)
            overloaded = p99 > TIMING_BUDGET * median
            self.metrics.overloaded.set(1 if overloaded else 0)
            self.metrics.suggested_dilation.set(suggested_dilation(self.dilation, p99 / median if median > 0 else 0.0))
            if overloaded and self.now() - self._warned_at > 10:
                self._warned_at = self.now()
                log.warning(
                    "host too loaded to emulate faithfully: step timing error p99 %.2f ms > 5%% of the"
                    " median step %.2f ms",
                    p99 * 1e3,
                    median * 1e3,
                )

    def sync_metrics(self) -> None:
        """Bring the engine-state gauges and the token counters up to the scheduler's running totals.
        Called when /metrics is scraped, not per step: between scrapes nobody reads them, and setting
        a dozen families every step was a fixed cost of each step on the worker's hot path."""
        s = self.scheduler.stats()
        last = self._last_stats
        m = self.metrics
        m.running.set(s.num_running)
        m.waiting.set(s.num_waiting)
        m.waiting_capacity.set(s.num_waiting - s.num_waiting_deferred)
        m.waiting_deferred.set(s.num_waiting_deferred)
        m.count_prompt_sources(s)
        m.kv_usage.set(s.kv_usage)
        m.gpu_cache_usage.set(s.kv_usage)
        for counter, delta in (
            ((m.prompt_tokens,), s.prompt_tokens - last.prompt_tokens),
            ((m.generation_tokens,), s.generation_tokens - last.generation_tokens),
            ((m.prefix_queries, m.gpu_prefix_queries), s.prefix_queries - last.prefix_queries),
            ((m.prefix_hits, m.gpu_prefix_hits), s.prefix_hits - last.prefix_hits),
            ((m.preemptions,), s.num_preemptions - last.num_preemptions),
        ):
            if delta:
                for c in counter:
                    c.inc(delta)
        self._last_stats = s

    async def close(self) -> None:
        self.closed = True
        for timer, handle in self._pending.values():
            timer.cancel()
            handle.queue.put_nowait(StreamEvent("error", message="the server is shutting down"))
        self._pending.clear()
        for task in list(self._pulls):
            task.cancel()
        for rid, handle in list(self.handles.items()):
            handle.queue.put_nowait(StreamEvent("error", message="the server is shutting down"))
            self.handles.pop(rid, None)
