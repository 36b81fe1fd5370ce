"""The scheduler of one serving instance, vLLM v1 style: synchronous and deterministic.

``schedule(now) -> SchedulerOutput``; the driver runs it for the cost model's
time; ``update_from_output(output, now) -> list[RequestOutput]``. No wall clock,
no asyncio, no sockets: the simulator and the real-time worker both drive it.

Policy, in order each step: running requests first (FCFS), each gets its
missing tokens up to the token budget (chunked prefill) and KV slots, preempting
the newest running request by recompute when blocks run out; then requests
whose remote KV must be pulled get their blocks; then waiting requests are
admitted while the budget, ``max_num_seqs`` and free blocks allow.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from emulator.costmodel.interface import BatchShape
from emulator.engine.config import EngineConfig
from emulator.engine.kv_cache import KVCacheManager
from emulator.engine.outputs import RequestOutput, ScheduledRequest, SchedulerOutput, SchedulerStats
from emulator.engine.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: EngineConfig, report_every_output: bool = True) -> None:
        self.config = config
        # steady decodes take _schedule's fast path (False: the general loop only — the reference a
        # test compares the fast path with; an attribute, since the compiled core takes no subclasses)
        self.fast_decodes = True
        self.kv = KVCacheManager(config.num_gpu_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.remote_waiting: deque[Request] = deque()  # consumers whose blocks are not yet allocated
        self.pulling: dict[str, Request] = {}  # consumers whose KV pull is in flight
        # consumers whose pulled KV has arrived: they hold their blocks, so they are admitted ahead of
        # `waiting` (a head request that cannot get blocks must never block the ones holding them)
        self.kv_ready: deque[Request] = deque()
        self.held: dict[str, Request] = {}  # producers holding KV until the pull completes
        # requests the scheduler ended with an error between steps: reported by the next update
        self.errored: list[RequestOutput] = []
        self.running: list[Request] = []
        self.in_flight: set[str] = set()  # scheduled in a batch that has not finished (pipeline parallel)
        self.num_preemptions = 0
        self.num_iterations = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_prompt_tokens = 0
        self.remote_prompt_tokens = 0
        self.version = 0  # bumped by every call that can change the queues (a router's cached view keys on it)
        # False (the simulator): update_from_output returns the outputs of finished requests only and
        # leaves the rest as counts — a worker streams every token, a simulator acts on ends and firsts
        self.report_every_output = report_every_output
        self.last_num_outputs = 0  # outputs of the last update: errors reported plus tokens sampled
        self.first_tokens: list[Request] = []  # requests whose first token the last update sampled
        self.changes: set[Scheduler] | None = None  # where a watcher (the simulator's load board) hears of it
        self.schedule_calls = 0  # async scheduling's lag counts a request's wait in scheduler calls

    def _changed(self) -> None:
        self.version += 1
        if self.changes is not None:
            self.changes.add(self)

    # ---- intake --------------------------------------------------------------
    def add_request(self, req: Request, during_step: bool = False) -> RequestOutput | None:
        """Queue a request, or reject it at once (returned output) when it can never run.

        ``during_step``: a step is running as it comes. An async-scheduling engine decided the next
        step when that one started, so the request can join the step after it at the earliest."""
        self._changed()
        error = self._admission_error(req)
        if error is not None:
            req.status = RequestStatus.FINISHED_ERROR
            req.error = error
            req.finish_reason = "error"
            return RequestOutput(req.request_id, 0, True, "error")
        self.requests[req.request_id] = req
        if req.kv_role == "consumer":
            req.status = RequestStatus.WAITING_FOR_REMOTE_KV
            self.remote_waiting.append(req)
        else:
            self.waiting.append(req)
            if during_step and self.config.async_scheduling:
                req.admit_from_call = self.schedule_calls + 2
        return None

    def _admission_error(self, req: Request) -> str | None:
        cfg = self.config
        if req.num_prompt_tokens < 1:
            return "the prompt is empty"
        if req.max_tokens < 1:
            return "max_tokens must be at least 1"
        total = req.num_prompt_tokens + req.max_tokens
        # the context window first, as vLLM's API server checks it before the engine sees the request:
        # a request past both limits is told the one its client can act on
        if total > cfg.max_model_len:
            return (
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
                f"{total} tokens ({req.num_prompt_tokens} in the messages, {req.max_tokens} in the completion)."
            )
        if -(-total // cfg.block_size) > cfg.num_gpu_blocks:
            return (
                f"the request needs {total} tokens of KV cache but this instance holds only "
                f"{cfg.num_gpu_blocks * cfg.block_size}"
            )
        # a P/D consumer receives its prompt's KV from the prefill instance and never prefills it
        # here, so the token budget (a TensorRT-LLM decode server's is its batch size) does not apply
        prefills_here = req.kv_role != "consumer"
        if prefills_here and not cfg.enable_chunked_prefill and req.num_prompt_tokens > cfg.prefill_chunk_limit:
            return (
                f"the prompt ({req.num_prompt_tokens} tokens) exceeds max_num_batched_tokens "
                f"({cfg.prefill_chunk_limit}{' per attention-DP rank' if cfg.max_prefill_chunk else ''}) "
                "and chunked prefill is off"
            )
        return None

    def abort(self, request_id: str) -> None:
        self._changed()
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for q in (self.waiting, self.remote_waiting, self.kv_ready):
            if req in q:
                q.remove(req)
        self.pulling.pop(request_id, None)
        self.held.pop(request_id, None)
        if req in self.running:
            self.running.remove(req)
        self.in_flight.discard(request_id)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED_ABORTED
        req.finish_reason = "abort"

    # ---- P/D hand-off ----------------------------------------------------------
    def finish_remote_kv(self, request_id: str, now: float) -> None:
        """Consumer: the pulled KV has arrived; the request becomes schedulable for decode. Its first
        step recomputes the prompt's last token and samples the first output token, which the client
        receives from this (decode) instance: KV alone gives no logits, so vLLM treats a prompt whose KV
        all came from outside as cached up to its last token (KVCacheManager.get_computed_blocks'
        max_cache_hit_length = num_tokens - 1; its PromptTokenStats count the external transfer and one
        recomputed token), and the prefill's own sampled token is discarded (max_tokens 1 there)."""
        self._changed()
        req = self.pulling.pop(request_id)
        req.num_computed_tokens = req.num_prompt_tokens - 1
        self.remote_prompt_tokens += req.num_prompt_tokens
        req.kv_ready_s = now
        req.status = RequestStatus.WAITING
        self.kv.cache_full_blocks(req)
        self.kv_ready.append(req)

    def recompute_remote(self, request_id: str) -> None:
        """Consumer whose KV pull failed (its prefill died, the link is cut): drop the blocks reserved
        for the pull and prefill the prompt here instead, as an ordinary request (vLLM's recompute on
        KV-load failure); the client has seen nothing yet, its tokens all come from here."""
        self._changed()
        req = self.pulling.pop(request_id)
        self.kv.free(req)
        req.kv_role = "none"
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def release_kv(self, request_id: str) -> None:
        """Producer: the consumer has the KV; free the blocks."""
        self._changed()
        req = self.held.pop(request_id, None)
        if req is not None:
            self.kv.free(req)
            self.requests.pop(request_id, None)

    # ---- one step -------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.remote_waiting or self.kv_ready)

    def schedule(self, now: float) -> SchedulerOutput:
        """The next step. Mixed engines (vLLM, TensorRT-LLM) put decodes and prefill chunks in one
        step; prefill-first engines (SGLang) run a prefill-only step whenever a prompt can make
        progress and pause decoding for it, else a decode-only step.

        Async scheduling leaves out the requests that came during the running step (their step was
        decided without them), unless nothing else would run: an engine whose next step is empty
        decides it when they come (vLLM's batch queue schedules nothing ahead then)."""
        self._changed()
        self.schedule_calls += 1
        out = self._schedule_step(now)
        if out.scheduled or not self.config.async_scheduling:
            return out
        if not any(r.admit_from_call > self.schedule_calls for r in self.waiting):
            return out  # (empty for another reason: blocks, limits, nothing waiting)
        for req in self.waiting:
            req.admit_from_call = 0
        again = self._schedule_step(now)
        if not out.kv_pulls and not out.preempted:
            return again
        return SchedulerOutput(
            again.scheduled, again.shape, out.kv_pulls + again.kv_pulls, out.preempted + again.preempted
        )

    def _schedule_step(self, now: float) -> SchedulerOutput:
        if not self.config.prefill_first:
            return self._schedule(now, decode=True, prefill=True)
        if self._prefill_possible():
            out = self._schedule(now, decode=False, prefill=True)
            if out.scheduled or out.kv_pulls:
                return out
        return self._schedule(now, decode=True, prefill=False)

    def _prefill_possible(self) -> bool:
        if any(
            r.num_computed_tokens < r.num_prompt_tokens and r.request_id not in self.in_flight for r in self.running
        ):
            return True
        head = self.waiting[0] if self.waiting else None
        if head is not None and head.admit_from_call > self.schedule_calls:
            return False
        return (
            head is not None
            and head.num_computed_tokens < head.num_prompt_tokens
            and len(self.running) < self.config.max_num_seqs
        )

    def _schedule(self, now: float, *, decode: bool, prefill: bool) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        chunk_limit = cfg.prefill_chunk_limit
        scheduled: list[ScheduledRequest] = []
        prefill_chunks: list[tuple[int, int]] = []
        num_decode = 0
        decode_kv = 0
        preempted: list[str] = []

        # The running requests, in order. A decode whose last block has room skips the allocation
        # (allocate_slots' own first check): a simulated fleet takes this loop for every running
        # sequence of every step.
        running, in_flight, held_by, bs = self.running, self.in_flight, self.kv.req_blocks, cfg.block_size
        i = 0
        if decode and not in_flight and self.fast_decodes:
            # The leading steady decodes (one new token, and room in their last block or a free block
            # for it: the general loop's outcome for them, without its branches) — most of a busy
            # instance's batch. The first that cannot get its block goes to the general loop (preemption).
            end = min(len(running), budget)
            kv = self.kv
            while i < end:
                req = running[i]
                computed = req.num_computed_tokens
                if computed < req.num_prompt_tokens or req.num_prompt_tokens + req.num_output_tokens != computed + 1:
                    break
                held = held_by.get(req.request_id)
                if held is None or req.first_scheduled_s is None:
                    break
                if computed >= len(held) * bs and not kv.allocate_slots(req, 1):
                    break
                scheduled.append(ScheduledRequest(req.request_id, 1, computed, req))
                decode_kv += computed + 1
                i += 1
            num_decode = i
            budget -= i
        while i < len(running) and budget > 0:
            req = running[i]
            computed, prompt = req.num_computed_tokens, req.num_prompt_tokens
            is_decode = computed >= prompt
            if req.request_id in in_flight or (is_decode and not decode) or (not is_decode and not prefill):
                i += 1
                continue
            n = min(prompt + req.num_output_tokens - computed, budget if is_decode else min(budget, chunk_limit))
            if n <= 0:
                i += 1
                continue
            held = held_by.get(req.request_id)
            if held is None or computed + n > len(held) * bs:  # needs blocks: allocate, preempting if short
                while not self.kv.allocate_slots(req, n):
                    victim = self._pick_victim() if decode else None
                    if victim is None or victim is req:
                        if victim is req:
                            self._preempt(req)
                            preempted.append(req.request_id)
                        n = 0
                        break
                    self._preempt(victim)
                    preempted.append(victim.request_id)
                if n == 0:
                    if req not in running:
                        continue  # req itself was preempted; the list shifted
                    i += 1
                    continue
            self._account(req, n, now, scheduled, prefill_chunks)
            if is_decode:
                num_decode += 1
                decode_kv += computed + n
            budget -= n
            i += 1

        kv_pulls: list[str] = []
        while self.remote_waiting:
            req = self.remote_waiting[0]
            if not self.kv.allocate_slots(req, req.num_prompt_tokens):
                break
            self.remote_waiting.popleft()
            self.pulling[req.request_id] = req
            kv_pulls.append(req.request_id)

        if decode:
            ready_decode, ready_kv = self._admit_kv_ready(now, budget, scheduled)
            num_decode += ready_decode
            decode_kv += ready_kv
            budget -= ready_decode
        if not preempted:  # a decode-only step admits only requests whose prompt is computed (P/D consumers)
            admitted_decode, admitted_kv = self._admit(
                now, budget, scheduled, prefill_chunks, computed_only=not prefill
            )
            num_decode += admitted_decode
            decode_kv += admitted_kv

        shape = BatchShape(prefill_chunks=tuple(prefill_chunks), num_decode=num_decode, decode_kv_sum=decode_kv)
        self.in_flight.update([s.request_id for s in scheduled])
        if scheduled:
            self.num_iterations += 1
        return SchedulerOutput(tuple(scheduled), shape, tuple(kv_pulls), tuple(preempted))

    def _admit_kv_ready(self, now: float, budget: int, scheduled: list) -> tuple[int, int]:
        """Start consumers whose KV has arrived (their blocks are already theirs). Their first step
        recomputes one token over the whole prompt's KV: a decode's work, so it is priced as one."""
        num_decode = decode_kv = 0
        while self.kv_ready and budget > num_decode and len(self.running) < self.config.max_num_seqs:
            req = self.kv_ready[0]
            n = req.num_new_tokens
            if not self.kv.allocate_slots(req, n):
                break
            self.kv_ready.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._account(req, n, now, scheduled, None)
            num_decode += 1
            decode_kv += req.num_computed_tokens + n
        return num_decode, decode_kv

    def _admit(
        self, now: float, budget: int, scheduled: list, prefill_chunks: list, computed_only: bool = False
    ) -> tuple[int, int]:
        """Admit waiting requests while the budget, max_num_seqs and free blocks allow.

        Returns the decodes among them (requests whose prompt is already computed, e.g. a P/D
        consumer whose KV arrived) and their KV sum."""
        cfg = self.config
        num_decode = decode_kv = 0
        reserved = self._reserved_blocks() if cfg.reserve_full_sequence else 0
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            if req.admit_from_call > self.schedule_calls:
                break  # (FCFS: the ones behind it came later still)
            if computed_only and req.num_computed_tokens < req.num_prompt_tokens:
                break
            if cfg.reserve_full_sequence:
                whole = self._blocks_for(req.num_prompt_tokens + req.max_tokens)
                if self.kv.num_free_blocks - reserved < whole:
                    break
                reserved += whole - self._blocks_for(req.num_tokens)
            computed: list[int] = []
            if req.num_computed_tokens == 0 and self.kv.num_blocks_of(req) == 0:
                computed, hit = self.kv.get_computed_blocks(req)
            else:
                hit = 0
            n = req.num_tokens - req.num_computed_tokens - hit
            if not cfg.enable_chunked_prefill and n > cfg.prefill_chunk_limit:
                # preempted, it must recompute its prompt and what it generated in one step: past the
                # whole budget it could never run again, so it ends with an error instead of waiting forever
                self.waiting.popleft()
                req.error = (
                    f"preempted with {req.num_tokens} tokens to recompute, more than max_num_batched_tokens "
                    f"({cfg.prefill_chunk_limit}) with chunked prefill off"
                )
                self._finish(req, RequestStatus.FINISHED_ERROR, now)
                self.errored.append(RequestOutput(req.request_id, 0, True, "error"))
                continue
            if not cfg.enable_chunked_prefill and n > budget:
                break
            n = min(n, budget, cfg.prefill_chunk_limit)
            if not self.kv.allocate_slots(req, n, computed):
                break
            self.waiting.popleft()
            if hit:
                req.num_computed_tokens = hit
                if req.first_scheduled_s is None:
                    req.num_cached_tokens = hit
                    self.cached_prompt_tokens += hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._account(req, n, now, scheduled, prefill_chunks)
            if req.num_computed_tokens >= req.num_prompt_tokens:
                num_decode += 1
                decode_kv += req.num_computed_tokens + n
            budget -= n
        return num_decode, decode_kv

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _reserved_blocks(self) -> int:
        """Blocks the running requests will still need to reach their max tokens (set aside)."""
        return sum(
            max(0, self._blocks_for(r.num_prompt_tokens + r.max_tokens) - self.kv.num_blocks_of(r))
            for r in self.running
        )

    def _account(self, req: Request, n: int, now: float, scheduled: list, prefill: list | None) -> None:
        """``prefill``: where a prompt chunk is listed for pricing (None: the step is priced as a decode)."""
        if req.first_scheduled_s is None:
            req.first_scheduled_s = now
        scheduled.append(ScheduledRequest(req.request_id, n, req.num_computed_tokens, req))
        if prefill is not None and req.num_computed_tokens < req.num_prompt_tokens:
            prefill.append((n, req.num_computed_tokens))

    def _pick_victim(self) -> Request | None:
        for req in reversed(self.running):
            if req.request_id not in self.in_flight:
                return req
        return None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, output: SchedulerOutput, now: float) -> list[RequestOutput]:
        self._changed()
        results, self.errored = self.errored, []
        num_errored = len(results)
        report = self.report_every_output
        firsts: list[Request] = []
        finished_any = False
        in_flight = self.in_flight
        scheduled = output.scheduled
        if len(in_flight) == len(scheduled):
            in_flight.clear()  # nothing else in flight (no pipeline): the step's requests are all of it
        else:
            in_flight.difference_update([s.request_id for s in scheduled])
        sampled = 0
        for s in scheduled:
            req = s.request
            if req.status.finished:
                continue  # aborted while in flight
            n = s.num_new_tokens
            computed = req.num_computed_tokens
            prompt = req.num_prompt_tokens
            if computed < prompt:
                if not (req.kv_role == "consumer" and computed == prompt - 1 and not req.num_output_tokens):
                    self.prompt_tokens += min(n, prompt - computed)  # not a P/D decode's recomputed last token
                req.num_computed_tokens = computed = computed + n
                self.kv.cache_full_blocks(req)
            else:
                req.num_computed_tokens = computed = computed + n
                if req.kv_role == "consumer":  # its prompt arrived computed: named at its first step
                    self.kv.cache_full_blocks(req)
            out = req.num_output_tokens
            if computed < prompt + out:
                continue  # a partial prefill chunk samples nothing
            req.num_output_tokens = out = out + 1
            sampled += 1
            req.add_token_time(now)
            if req.first_token_s is None:
                req.first_token_s = now
                firsts.append(req)
            if req.kv_role == "producer":
                self._finish(req, RequestStatus.FINISHED_REMOTE_DECODE, now, hold=True)
                finished_any = True
                results.append(RequestOutput(req.request_id, 1, True, "remote_decode"))
            elif out >= req.max_tokens:
                self._finish(req, RequestStatus.FINISHED_LENGTH, now)
                finished_any = True
                results.append(RequestOutput(req.request_id, 1, True, "length"))
            elif report:
                results.append(RequestOutput(req.request_id, 1, False))
        self.generation_tokens += sampled
        self.last_num_outputs = num_errored + sampled
        self.first_tokens = firsts
        if finished_any:
            self.running = [r for r in self.running if not r.status.finished]
        return results

    def _finish(self, req: Request, status: RequestStatus, now: float, hold: bool = False) -> None:
        req.status = status
        req.finish_reason = status.value
        req.finish_s = now
        if hold:
            self.held[req.request_id] = req
        else:
            self.kv.free(req)
            self.requests.pop(req.request_id, None)

    # ---- bulk decode (the simulator's fast path) ------------------------------
    def steady_decode_horizon(self, max_steps: int) -> int:
        """How many upcoming steps are guaranteed identical pure-decode steps if nothing arrives.

        True when every running request is decoding, nothing can be admitted, no
        batch is in flight, and the KV blocks the steps need are free. The last of
        these steps may finish requests. Returns 0 when the next step is not such a step.
        """
        return self.steady_decode_plan(max_steps)[0]

    def steady_decode_plan(self, max_steps: int) -> tuple[int, int]:
        """(``steady_decode_horizon``, the running sequences' KV sum at the first of those steps),
        read in one pass over the batch (the simulator plans a stretch after nearly every step)."""
        if not self.running or self.in_flight or self.remote_waiting or self.kv_ready or self.errored:
            return 0, 0
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            return 0, 0
        if len(self.running) > self.config.max_num_batched_tokens:
            return 0, 0
        last = self.running[-1]  # the latest admitted: the one most likely still in its prefill
        if last.num_computed_tokens < last.num_prompt_tokens or last.kv_role == "producer":
            return 0, 0
        bs = self.config.block_size
        held_by = self.kv.req_blocks
        horizon = max_steps
        kv_sum = 0
        firsts = []  # per sequence: the first step (1-based) that needs a new block
        for r in self.running:
            computed = r.num_computed_tokens
            if (
                r.num_prompt_tokens + r.num_output_tokens - computed != 1
                or computed < r.num_prompt_tokens
                or r.kv_role == "producer"
            ):
                return 0, 0
            left = r.max_tokens - r.num_output_tokens
            if left < horizon:
                horizon = left
            kv_sum += computed + 1
            # step j holds computed + j tokens; a new block is needed when that exceeds the blocks held
            firsts.append(len(held_by.get(r.request_id, ())) * bs - computed + 1)
        if horizon <= 0:
            return 0, 0
        return self._block_limited_horizon(horizon, firsts), kv_sum

    def _block_limited_horizon(self, horizon: int, firsts: list[int]) -> int:
        """Largest k <= horizon whose new-block demand over k steps fits in the free blocks."""
        bs = self.config.block_size
        free = self.kv.num_free_blocks
        if min(firsts) > horizon:
            return horizon  # no sequence fills its last block within the horizon
        if sum((horizon - f) // bs + 1 for f in firsts if f <= horizon) <= free:
            return horizon  # (in Python: a batch's few dozen sequences cost less than numpy's calls)
        first = np.asarray(firsts, dtype=np.int64)
        counts = np.where(first <= horizon, (horizon - first) // bs + 1, 0)
        steps = np.sort(np.concatenate([f + bs * np.arange(c) for f, c in zip(first, counts, strict=True) if c > 0]))
        return int(steps[free]) - 1  # the (free+1)-th allocation cannot be served

    def advance_steady(self, end_times: np.ndarray) -> list[RequestOutput]:
        """Apply ``len(end_times)`` pure-decode steps at once; equal to stepping one by one. Returns
        the outputs of the requests that finished (the others each sampled ``len(end_times)`` tokens:
        the simulator, this method's one caller, streams them by count and acts on finishes only).
        One pass over the batch: counters, token times and the KV blocks each sequence now needs;
        the blocks are taken before anyone finishes, as request-by-request allocation would."""
        self._changed()
        n = len(end_times)
        running = self.running
        times: list[float] = end_times.tolist()  # a few steps as a rule: floats beat numpy's calls here
        first, last = times[0], times[-1]
        inner_gap = 0.0  # the stretch's largest gap between consecutive steps, as np.max(np.diff(...))
        if n > 1:
            inner_gap = times[1] - first
            for i in range(2, n):
                gap = times[i] - times[i - 1]
                if gap > inner_gap:
                    inner_gap = gap
        bs = self.config.block_size
        held_by = self.kv.req_blocks
        short: list[tuple[list[int], int]] = []
        ended: list[Request] = []
        for r in running:
            computed = r.num_computed_tokens = r.num_computed_tokens + n
            held = held_by[r.request_id]
            need = -(-computed // bs) - len(held)
            if need > 0:
                short.append((held, need))
            out = r.num_output_tokens = r.num_output_tokens + n
            r.add_token_times(end_times, first, last, inner_gap)
            if out >= r.max_tokens:
                ended.append(r)
        if short:
            self.kv.grow_decodes(short)
        results: list[RequestOutput] = []
        for r in ended:
            self._finish(r, RequestStatus.FINISHED_LENGTH, last)
            results.append(RequestOutput(r.request_id, n, True, "length"))
        self.generation_tokens += n * len(running)
        self.num_iterations += n
        if results:
            self.running = [r for r in running if not r.status.finished]
        return results

    # ---- observation -------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        """Requests not yet running: waiting, waiting for their KV to be allocated, pulled or admitted."""
        return len(self.waiting) + len(self.remote_waiting) + len(self.pulling) + len(self.kv_ready)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=self.num_waiting,
            kv_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_gpu_blocks=self.config.num_gpu_blocks,
            prefix_queries=self.kv.prefix_queries,
            prefix_hits=self.kv.prefix_hits,
            num_preemptions=self.num_preemptions,
            num_iterations=self.num_iterations,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            remote_prompt_tokens=self.remote_prompt_tokens,
            num_waiting_deferred=len(self.pulling),
        )

    def check_invariants(self) -> None:
        """KV conservation and queue consistency; tests call this after every step."""
        pool = self.kv.pool
        referenced = sum(1 for c in pool.ref_cnt if c > 0)
        assert referenced + pool.num_free == pool.num_blocks, "allocated + free != total"
        assert all(c >= 0 for c in pool.ref_cnt)
        assert len(self.running) <= self.config.max_num_seqs
        for r in self.running:
            assert r.status == RequestStatus.RUNNING
            assert self.kv.num_blocks_of(r) * self.config.block_size >= r.num_computed_tokens
        ids = [r.request_id for r in (*self.running, *self.waiting, *self.kv_ready)]
        assert len(ids) == len(set(ids)), "a request is queued twice"
