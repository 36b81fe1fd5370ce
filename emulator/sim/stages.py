"""The simulator's multi-stage parts: retrievers, the remote KV store and pipelines, in virtual time.

``StagesMixin`` is part of ``Simulation`` (``simulator.py`` keeps the engines, routing, P/D and
faults). A retriever is a batching server: queries wait in one FIFO, an idle retriever takes up to
``maxBatch`` of them and is busy for the batch's modelled time. A KV store holds blocks by prefix
hash; an engine that finds the next blocks of a prompt there fetches them over the store's tier (a
flow on the same max-min fair network as P/D transfers) when that beats recomputing them, and
writes blocks back after each prefill or as its own cache evicts them. A pipeline request runs its
stages one after the other (``workload/pipelines.py``); each stage's time is recorded so that the
breakdown adds up to the end-to-end latency.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from emulator.catalog.links import LinkTier
from emulator.engine.request import Request
from emulator.kvstore.decide import plan_prompt_fetch
from emulator.kvstore.store import KVStore
from emulator.rag.retriever import RetrieverModel
from emulator.results import RequestRecord
from emulator.roles import is_front
from emulator.workload.pipelines import Generate, Pipeline, Retrieve, Think, pipeline_stages
from emulator.workload.plan import PlannedRequest

STORE_FLOW = "kvf:"  # flow ids of store fetches
WRITE_FLOW = "kvw:"  # flow ids of write-backs


class SimRetriever:
    def __init__(self, inst, pool, gpu) -> None:
        self.name = inst.name
        self.spec = pool.rag
        self.model = RetrieverModel(pool.rag, gpu)
        self.queue: deque[tuple[str, Retrieve, float]] = deque()
        self.in_batch = 0
        self.batches = 0
        self.queries = 0
        self.busy_s = 0.0

    def stats(self, end: float) -> dict:
        return {
            "role": "rag",
            "batches": self.batches,
            "queries": self.queries,
            "mean_batch": self.queries / self.batches if self.batches else 0.0,
            "busy_fraction": self.busy_s / end if end > 0 else 0.0,
        }


class SimStore:
    def __init__(self, inst, pool, block_bytes: float, tier: LinkTier, endpoints: int) -> None:
        self.name = inst.name
        self.spec = pool.kvstore
        self.store = KVStore(pool.kvstore.capacity_gb * 1e9, block_bytes)
        self.tier = tier
        self.endpoints = endpoints  # the store node's NICs, one per GPU slot
        self.rate = tier.bandwidth * endpoints
        self.bytes_fetched = 0.0
        self.bytes_written = 0.0

    def stats(self) -> dict:
        st = self.store.stats
        return {
            "role": "kvstore",
            **st.to_json(),
            "hit_rate": st.hit_blocks / st.lookup_blocks if st.lookup_blocks else 0.0,
            "bytes_fetched": self.bytes_fetched,
            "bytes_written": self.bytes_written,
            "used_bytes": self.store.used_bytes,
            "capacity_bytes": self.store.capacity_blocks * self.store.block_bytes,
        }


@dataclass
class PipeState:
    gen: Pipeline
    kind: str
    origin: float  # when the pipeline started: stages' start_ms count from it (as the router's do)
    started: bool = False
    stage: object = None
    stage_start: float = 0.0
    stages: list = field(default_factory=list)
    breakdown: dict = field(default_factory=dict)
    marks: dict = field(default_factory=dict)  # the current generate stage's arrival / admission times


class StagesMixin:
    """Retrieval, the KV store and pipelines for ``Simulation`` (which provides events, records, the
    network and the engine paths ``_route`` / ``_admit`` / ``_fail``)."""

    def _init_stages(self, spec, topo, setups) -> None:
        pools = {p.name: p for p in spec.pools}
        self.retrievers = [
            SimRetriever(i, pools[i.pool], topo.gpu) for i in topo.instances if pools[i.pool].role == "rag"
        ]
        self.stores: list[SimStore] = []
        self._flow_done: dict[str, object] = {}
        self._writes = 0
        front = [s for s in setups if is_front(s.instance.role)]
        store_insts = [i for i in topo.instances if pools[i.pool].role == "kvstore"]
        if store_insts and front:
            tier = topo.host_tier(store_insts[0])  # one store instance (the kvstore role's checks)
            self.block_bytes = front[0].cost.kv_transfer_bytes(front[0].engine.block_size)
            for i in store_insts:
                st = SimStore(i, pools[i.pool], self.block_bytes, tier, topo.gpus_per_node)
                self.stores.append(st)
                self.net.set_capacity(f"{st.name}:tx:{tier.name}", st.rate)
                self.net.set_capacity(f"{st.name}:rx:{tier.name}", st.rate)
            for s in front:
                for d in ("tx", "rx"):
                    key = f"{s.instance.name}:{d}:{tier.name}"
                    if key not in self.net.capacity:
                        self.net.set_capacity(key, tier.bandwidth * s.instance.num_gpus)
        self._pipes: dict[str, PipeState] = {}

    # ---- the KV store ----------------------------------------------------------------------
    @property
    def _store(self) -> SimStore:
        return self.stores[0]  # one store instance (the kvstore role's checks)

    def _maybe_fetch(self, inst, req: Request, rec: RequestRecord, now: float) -> bool:
        """Fetch the prompt's next blocks from the store when that beats recomputing them; True when the
        request waits for the fetch (it is admitted when the blocks land)."""
        if not self.stores or not req.block_hashes or not inst.scheduler.config.enable_prefix_caching:
            return False
        kv = inst.scheduler.kv
        local = kv.cached_prefix_blocks(req.block_hashes, req.num_prompt_tokens)
        st = self._store
        found = st.store.lookup(req.block_hashes, start=local)
        bs = inst.block_size
        plan = plan_prompt_fetch(
            inst.cost,
            local_blocks=local,
            store_blocks=found,
            prompt_tokens=req.num_prompt_tokens,
            block_size=bs,
            block_bytes=st.store.block_bytes,
            tier=st.tier,
            endpoints=min(st.endpoints, inst.setup.instance.num_gpus),
        )
        if not plan.fetch:
            return False
        hashes = req.block_hashes[local : local + plan.blocks]
        st.store.fetched(plan.blocks)
        nbytes = plan.blocks * st.store.block_bytes
        st.bytes_fetched += nbytes
        fid = f"{STORE_FLOW}{req.request_id}"
        epoch = inst.epoch

        def landed(t: float) -> None:
            rec.kv_fetch_s = (rec.kv_fetch_s or 0.0) + (t - now)
            if epoch != inst.epoch:  # the engine died meanwhile: the router retries the request
                self._retry_or_fail(req.request_id, t, f"{inst.name} died")
                return
            self._settle(inst, t)
            inst.scheduler.kv.pool.install(list(hashes))
            rec.kv_fetched_tokens += plan.blocks * bs
            self._mark(req.request_id, "admitted", t)
            self._admit(inst, req, rec, t)

        self._flow_done[fid] = landed
        resources = (f"{st.name}:tx:{st.tier.name}", f"{inst.name}:rx:{st.tier.name}")
        self.events.push(now + st.tier.latency_s, "store_flow", (fid, nbytes, resources), observing=True)
        return True

    def _on_store_flow(self, now: float, payload: tuple) -> None:
        fid, nbytes, resources = payload
        self.net.add(fid, nbytes, resources, now)
        self._reschedule_flows(now)

    def _write_back(self, inst, hashes: tuple[int, ...] | list[int], now: float) -> None:
        """Send the blocks the store lacks; they are stored when they land."""
        if not self.stores or not hashes:
            return
        st = self._store
        missing = st.store.missing(hashes)
        if not missing:
            st.store.put(hashes)  # refresh their recency
            return
        nbytes = len(missing) * st.store.block_bytes
        st.bytes_written += nbytes
        self._writes += 1
        fid = f"{WRITE_FLOW}{self._writes}"
        self._flow_done[fid] = lambda t, st=st, hs=tuple(hashes): st.store.put(hs)
        resources = (f"{inst.name}:tx:{st.tier.name}", f"{st.name}:rx:{st.tier.name}")
        self.events.push(now + st.tier.latency_s, "store_flow", (fid, nbytes, resources), observing=True)

    def _prefill_written(self, inst, req: Request, now: float) -> None:
        """Write-through: a finished prefill's full prompt blocks go to the store."""
        if self.stores and self.stores[0].spec.write_policy == "write-through":
            full = min(len(req.block_hashes), req.num_prompt_tokens // inst.block_size)
            self._write_back(inst, req.block_hashes[:full], now)

    def _drain_evictions(self, inst, now: float) -> None:
        """On-evict: blocks the engine's cache just evicted go to the store."""
        evicted = inst.scheduler.kv.pool.evicted
        if evicted:
            inst.scheduler.kv.pool.evicted = []
            self._write_back(inst, evicted, now)

    # ---- retrieval ----------------------------------------------------------------------------
    def _retrieve(self, rid: str, stage: Retrieve, now: float) -> None:
        rec = self.records[rid]
        if not self.retrievers:
            self._fail(rec, now, "a retrieval stage needs a pool with role rag", "no_backend")
            return
        r = min(self.retrievers, key=lambda x: len(x.queue) + x.in_batch)
        if len(r.queue) >= r.spec.max_waiting:
            self._fail(rec, now, f"{r.name}: retrieval queue full (rag.maxWaiting)", "overloaded")
            return
        r.queue.append((rid, stage, now))
        self._start_retrieval(r, now)

    def _start_retrieval(self, r: SimRetriever, now: float) -> None:
        if r.in_batch or not r.queue:
            return
        batch = [r.queue.popleft() for _ in range(min(r.spec.max_batch, len(r.queue)))]
        found, t = r.model.batch([(s.query, s.query_tokens, s.top_k, s.among) for _, s, _ in batch])
        r.in_batch = len(batch)
        r.batches += 1
        r.queries += len(batch)
        r.busy_s += t.total_s
        self.events.push(now + t.total_s, "retrieval_done", (r, batch, found, t, now), observing=True)

    def _on_retrieval_done(self, now: float, payload: tuple) -> None:
        r, batch, found, t, started = payload
        r.in_batch = 0
        for (rid, stage, queued), docs in zip(batch, found, strict=False):
            pipe = self._pipes.get(rid)
            if pipe is None:
                continue  # the request ended meanwhile
            self._stage(
                pipe,
                "retrieval",
                now,
                hop=stage.hop,
                retriever=r.name,
                documents=len(docs),
                queue_ms=(started - queued) * 1e3,
                **t.to_json(),
            )
            self._advance(rid, now, docs)
        self._start_retrieval(r, now)

    # ---- pipelines ------------------------------------------------------------------------------
    def _start_pipeline(self, rid: str, p: PlannedRequest, now: float) -> None:
        spec = p.pipeline
        gen = pipeline_stages(spec, p.index, p.input_len, p.output_len, p.segments)
        self._pipes[rid] = PipeState(gen, spec.type, now)
        self.records[rid].pipeline = spec.type
        self._advance(rid, now, None)

    def _mark(self, rid: str, key: str, t: float) -> None:
        pipe = self._pipes.get(rid)
        if pipe is not None:
            pipe.marks[key] = t

    def _stage(self, pipe: PipeState, kind: str, now: float, **extra) -> None:
        ms = (now - pipe.stage_start) * 1e3
        pipe.stages.append({"stage": kind, "start_ms": (pipe.stage_start - pipe.origin) * 1e3, "ms": ms, **extra})
        if kind != "generate":
            pipe.breakdown[kind] = pipe.breakdown.get(kind, 0.0) + ms

    def _advance(self, rid: str, now: float, result) -> None:
        pipe = self._pipes[rid]
        rec = self.records[rid]
        try:
            stage = pipe.gen.send(result) if pipe.started else next(pipe.gen)
        except StopIteration:
            self._pipes.pop(rid, None)
            rec.stages, rec.breakdown_ms = pipe.stages, pipe.breakdown
            self._client_done(rec)
            return
        pipe.started = True
        pipe.stage, pipe.stage_start, pipe.marks = stage, now, {}
        if isinstance(stage, Retrieve):
            self._retrieve(rid, stage, now)
        elif isinstance(stage, Think):
            self.events.push(now + stage.seconds, "think_done", rid, observing=True)
        else:
            index = int(rid.split("-")[1])
            self._planned[rid] = PlannedRequest(index, now, stage.prompt_tokens, stage.max_tokens, stage.segments)
            rec.first_token_s = rec.first_scheduled_s = rec.kv_transfer_s = None
            rec.prefill_instance = None
            self._attempts[rid] = set()
            self._route(index, now)

    def _on_think_done(self, now: float, rid: str) -> None:
        pipe = self._pipes.get(rid)
        if pipe is not None:
            self._stage(pipe, "think", now, hop=pipe.stage.hop)
            self._advance(rid, now, None)

    def _generate_done(self, rid: str, req: Request, rec: RequestRecord, times, end: float) -> bool:
        """A pipeline's generate stage ended (``times``: its tokens as the client saw them). Records the
        stage and starts the next one; True when the request goes on (the caller must not end it)."""
        pipe = self._pipes.get(rid)
        if pipe is None:
            return False
        stage: Generate = pipe.stage
        marks = pipe.marks
        t0 = pipe.stage_start
        arrived = marks.get("arrival", t0)
        admitted = marks.get("admitted", arrived)
        scheduled = rec.first_scheduled_s if rec.first_scheduled_s is not None else admitted
        first = float(times[0]) if len(times) else end
        visible = float(times[stage.hidden_tokens]) if len(times) > stage.hidden_tokens else end
        # P/D: the prefill ends at the hand-off; from there to the KV in the decode's memory is the network
        # (the hand-off path and the pull); the decode's work up to the first token belongs to the decode
        handoff = marks.get("handoff")
        pd = handoff is not None and req.kv_ready_s is not None
        network = req.kv_ready_s - handoff if pd else 0.0
        head = first - req.kv_ready_s if pd else 0.0
        parts = {
            "api": arrived - t0,
            "kv_fetch": admitted - arrived,
            "queue": max(scheduled - admitted, 0.0),
            "prefill": first - max(scheduled, admitted) - network - head,
            "reasoning": visible - first,
            "network": network,
            "decode": end - visible + head,
        }
        for k, v in parts.items():
            if v:
                pipe.breakdown[k] = pipe.breakdown.get(k, 0.0) + v * 1e3
        self._stage(
            pipe,
            "generate",
            end,
            hop=stage.hop,
            instance=rec.instance,
            prompt_tokens=stage.prompt_tokens,
            cached_tokens=req.num_cached_tokens,
            output_tokens=req.num_output_tokens,
        )
        if not stage.final:
            self._advance(rid, end, None)
            return True
        self._pipes.pop(rid, None)
        rec.stages, rec.breakdown_ms = pipe.stages, pipe.breakdown
        rec.first_token_s = visible
        rec.output_tokens = max(req.num_output_tokens - stage.hidden_tokens, 1)
        rec.prompt_tokens = stage.prompt_tokens
        return False

    def stage_stats(self, end: float) -> dict[str, dict]:
        out = {r.name: r.stats(end) for r in self.retrievers}
        out.update({s.name: s.stats() for s in self.stores})
        return out
