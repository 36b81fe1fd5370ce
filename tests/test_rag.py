"""The rag role: the corpus, the retrieval cost model on hand-worked cases, the retriever service,
and pipelines (rag, multihop, reasoning, agentic) whose stage timings add up to the end-to-end."""

from __future__ import annotations

import asyncio
import copy
import math

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from conftest import example

from emulator.catalog.gpus import get_gpu
from emulator.costmodel.retrieval import HOST, RetrievalCostModel
from emulator.errors import SpecError
from emulator.rag.corpus import Corpus, document_text
from emulator.serve.tokens import tokenize
from emulator.sim.simulator import simulate
from emulator.spec import CorpusSpec, InferenceCluster, PipelineSpec, RagSpec, parse_cluster, validate_document
from emulator.validation import cross_field_problems
from emulator.workload.pipelines import Generate, Retrieve, Think, pipeline_stages
from emulator.workload.plan import plan_for

H100 = get_gpu("h100-sxm")


def rag_doc() -> dict:
    with open(example("rag.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def rag_model(**kw) -> RetrievalCostModel:
    return RetrievalCostModel(RagSpec.model_validate(kw), H100)


# ---- the corpus ----------------------------------------------------------------------------------


def test_the_corpus_is_a_pure_function_of_its_seed_and_popular_documents_recur():
    c = Corpus(CorpusSpec(documents=1_000_000, popularity=1.1))
    assert c.search("what is a kv cache", 4) == c.search("what is a kv cache", 4)
    assert len({d.id for d in c.search("q", 16)}) == 16  # distinct documents
    other = Corpus(CorpusSpec(documents=1_000_000, popularity=1.1, seed=1))
    assert other.search("q", 4) != c.search("q", 4)
    hits = [d.id for q in range(500) for d in c.search(f"q{q}", 4)]
    top = c.doc_of_rank(0)
    assert hits.count(top) > 50  # Zipf: the most popular document is in > 10% of the answers
    law = c.spec.doc_tokens
    lengths = [c.doc_tokens(i) for i in range(5000)]
    assert all(law.min <= n <= law.max for n in lengths)
    assert abs(sum(lengths) / len(lengths) - law.mean) / law.mean < 0.05  # E[length] = mean


def test_a_filter_returns_exactly_the_named_documents_and_their_text_has_their_token_length():
    c = Corpus(CorpusSpec(documents=1000))
    docs = c.search("replay", 3, among=(7, 42, 999))
    assert [d.id for d in docs] == [7, 42, 999]
    assert all(len(tokenize(document_text(d), 1 << 20)) == d.tokens for d in docs)


# ---- the retrieval cost model on hand-worked cases -------------------------------------------------


def test_hnsw_search_costs_ef_times_2m_dependent_reads_plus_the_upper_layers():
    m = rag_model(corpus={"documents": 1_000_000, "dimension": 256}, index={"type": "hnsw", "m": 16, "efSearch": 64})
    evals = 64 * 2 * 16 + 16 * math.log(1e6) / math.log(16)
    per = HOST.dram_latency_s + 4 * 256 / HOST.core_stream_bw + 2 * 256 / HOST.core_flops
    assert m.search_one_s() == pytest.approx(evals * per, rel=1e-12)
    # 32 cores: 32 queries take one query's time, 33 take two
    assert m.search_s(32) == pytest.approx(m.search_one_s())
    assert m.search_s(33) == pytest.approx(2 * m.search_one_s())
    # USearch BENCHMARKS.md (M=16, ef=64, 256-d float32, 64 Graviton-3 cores): 131,654 QPS = 486 us per
    # query per core; a check of the model's order of magnitude, not a fit
    assert 486e-6 / 2 < m.search_one_s() < 486e-6 * 2


def test_flat_search_reads_the_corpus_once_per_batch_and_ivfpq_scans_nprobe_lists():
    flat = rag_model(corpus={"documents": 100_000, "dimension": 128}, index={"type": "flat"})
    compute = 2 * 8 * 1e5 * 128 / (32 * HOST.core_flops * HOST.gemm_efficiency)
    memory = 4 * 1e5 * 128 / min(32 * HOST.core_stream_bw, HOST.socket_bw)
    assert flat.search_s(8) == pytest.approx(max(compute, memory))
    assert flat.search_s(8) < 2 * flat.search_s(1)  # batched queries share the corpus read
    ivf = rag_model(
        corpus={"documents": 1_000_000, "dimension": 128},
        index={"type": "ivfpq", "nlist": 1024, "nprobe": 16, "pqBytes": 64},
    )
    codes = 16 * 1e6 / 1024
    expected = (2 * 1024 * 128 + 2 * 256 * 128) / HOST.core_flops + codes * 64 / HOST.lut_ops_per_s
    assert ivf.search_one_s() == pytest.approx(expected)
    assert (
        rag_model(
            corpus={"documents": 1_000_000, "dimension": 128},
            index={"type": "ivfpq", "nlist": 1024, "nprobe": 32, "pqBytes": 64},
        ).search_one_s()
        > 1.9 * ivf.search_one_s()
    )  # recall costs: twice the lists, about twice the time


def test_encoders_follow_the_roofline_and_a_gpu_batch_shares_one_weight_read():
    cpu = rag_model()
    one = cpu.batch_time([32])
    assert one.embed_s == pytest.approx(2 * 335e6 * 32 / (32 * HOST.core_flops * HOST.gemm_efficiency))
    assert cpu.batch_time([600]).embed_s == pytest.approx(cpu.batch_time([512]).embed_s)  # truncated at 512
    gpu = rag_model(device="gpu", index={"type": "flat"}, corpus={"documents": 100_000})
    single = gpu.batch_time([32]).embed_s
    assert gpu.batch_time([32] * 8).embed_s < 1.5 * single  # weight-bound: a batch costs about one query
    rerank = rag_model(device="gpu", index={"type": "flat"}, rerank={"params": 560e6}, rerankCandidates=4)
    t = rerank.batch_time([32], [[100, 200, 700, 50, 999]])  # 4 candidates scored, each pair capped at 512
    pairs = (32 + 100) + (32 + 200) + 512 + (32 + 50)
    assert t.rerank_s == pytest.approx(rerank.encoder_s(560e6, pairs))
    assert rag_model().batch_time([32], [[100]]).rerank_s == 0.0  # no reranker configured


# ---- the retriever service ------------------------------------------------------------------------


def rag_cluster(dilation: float = 1.0, **pool):
    doc = rag_doc()
    doc["spec"]["emulation"] = {"timeDilation": dilation}
    doc["spec"]["pools"][0]["rag"].update(pool)
    return parse_cluster(doc)


async def test_the_retriever_batches_concurrent_queries_and_answers_in_the_modelled_time():
    from emulator.serve.rag_app import create_rag_app
    from emulator.topology import place

    cluster = rag_cluster(dilation=4.0, maxBatch=8)
    topo = place(cluster.spec)
    inst = topo.by_name("retriever-0")
    app = create_rag_app(cluster, inst, topo)
    model = RetrievalCostModel(cluster.spec.pools[0].rag, topo.gpu)
    async with TestClient(TestServer(app)) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await client.post("/v1/retrieve", json={"query": "what is prefill", "top_k": 3, "query_tokens": 40})
        wall = loop.time() - t0
        body = await r.json()
        assert r.status == 200 and len(body["data"]) == 3
        expected = model.batch_time([40])
        assert body["timing"]["search_ms"] == pytest.approx(expected.search_s * 1e3)
        assert wall >= expected.total_s * 4 * 0.99  # dilation 4: the batch lasted D x the model
        assert [d["id"] for d in body["data"]] == [
            d.id for d in Corpus(cluster.spec.pools[0].rag.corpus).search("what is prefill", 3)
        ]
        answers = await asyncio.gather(
            *(client.post("/v1/retrieve", json={"query": f"q{i}", "query_tokens": 16}) for i in range(12))
        )
        batches = [(await a.json())["timing"]["batch"] for a in answers]
        assert max(batches) > 1 and max(batches) <= 8  # concurrent queries share batches of at most maxBatch
        text = await (await client.get("/metrics")).text()
        assert "infemu_retrieval_queries_total 13.0" in text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "query"),
        ({"query": ""}, "query"),
        ({"query": "x", "top_k": 0}, "top_k"),
        ({"query": "x", "top_k": 65}, "top_k"),
        ({"query": "x", "top_k": True}, "top_k"),
        ({"query": "x", "query_tokens": 10**9}, "query_tokens"),
        ({"query": "x", "filter": {"ids": list(range(65))}}, "filter"),
        ({"query": "x", "filter": {"ids": [-1]}}, "filter"),
        ({"query": "x", "filter": "all"}, "filter"),
        ({"query": "x", "include_text": "yes"}, "include_text"),
        ({"query": "x" * 70_000}, "query"),
    ],
)
async def test_bad_retrieval_requests_are_400s_that_name_the_field(body, field):
    from emulator.serve.rag_app import create_rag_app
    from emulator.topology import place

    cluster = rag_cluster()
    topo = place(cluster.spec)
    async with TestClient(TestServer(create_rag_app(cluster, topo.by_name("retriever-0"), topo))) as client:
        r = await client.post("/v1/retrieve", json=body)
        assert r.status == 400
        assert (await r.json())["error"]["param"] == field


# ---- pipelines ------------------------------------------------------------------------------------


def _drive(gen, corpus):
    stages, stage, result = [], next(gen), None
    while True:
        stages.append(stage)
        result = corpus.search(stage.query, stage.top_k, stage.among) if isinstance(stage, Retrieve) else None
        try:
            stage = gen.send(result)
        except StopIteration:
            return stages


def test_each_pipeline_type_yields_its_stages_and_prompts_quote_what_was_retrieved():
    corpus = Corpus(CorpusSpec())
    rag = _drive(pipeline_stages(PipelineSpec(type="rag", topK=3, systemTokens=100), 5, 40, 20), corpus)
    assert [type(s) for s in rag] == [Retrieve, Generate]
    docs = corpus.search(rag[0].query, 3)
    assert rag[1].prompt_tokens == 100 + sum(d.tokens for d in docs) + 40 and rag[1].final
    hops = _drive(pipeline_stages(PipelineSpec(type="multihop", hops=3), 5, 40, 20), corpus)
    assert [type(s) for s in hops] == [Retrieve, Generate] * 3
    assert [g.final for g in hops[1::2]] == [False, False, True]
    assert hops[4].query_tokens == 40 + 2 * 20  # the question and both earlier answers
    reason = _drive(pipeline_stages(PipelineSpec(type="reasoning", reasoningTokens=300), 5, 40, 20), corpus)
    assert [type(s) for s in reason] == [Generate] and reason[0].max_tokens == 320
    agent = _drive(pipeline_stages(PipelineSpec(type="agentic", turns=3, toolTokens=50), 5, 40, 20), corpus)
    assert [type(s) for s in agent] == [Generate, Think, Generate, Think, Generate]
    assert agent[2].segments[: len(agent[0].segments)] == agent[0].segments  # the context grows by appending
    assert agent[2].prompt_tokens == agent[0].prompt_tokens + 20 + 50


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("rag", {}),
        ("multihop", {"hops": 2}),
        ("reasoning", {"retrieve": True, "reasoningTokens": 64}),
        ("agentic", {"turns": 2}),
    ],
)
def test_stage_timings_add_up_to_the_end_to_end_latency(kind, extra):
    doc = rag_doc()
    doc["spec"]["workload"].update({"pipeline": {"type": kind, **extra}, "requests": 30, "rate": 6})
    cluster = parse_cluster(doc)
    assert cross_field_problems(cluster) == []
    res = simulate(cluster, plan_for(cluster))
    done = [r for r in res.records if r.ok]
    assert len(done) == 30
    for r in done:
        assert sum(r.breakdown_ms.values()) == pytest.approx(r.e2e_ms, rel=1e-9)
        assert sum(s["ms"] for s in r.stages) == pytest.approx(r.e2e_ms, rel=1e-9)  # stages tile the timeline
        assert r.stages[0]["start_ms"] == 0.0  # counted from the pipeline's start, as the router counts
        assert r.ttft_ms <= r.e2e_ms and r.pipeline == kind
    if kind == "reasoning":  # the visible answer starts after the hidden decode
        assert all(r.breakdown_ms["reasoning"] > 0 and r.ttft_ms > r.breakdown_ms["reasoning"] for r in done)
    if kind == "agentic":
        assert all(r.breakdown_ms["think"] == pytest.approx(cluster.spec.workload.pipeline.think_time_ms) for r in done)
    assert set(res.summary["pipeline"]["stages_ms"]) >= {"prefill", "decode"}


def test_an_e2e_slo_counts_against_attainment():
    doc = rag_doc()
    doc["spec"]["workload"]["requests"] = 20
    loose = simulate(parse_cluster(doc), plan_for(parse_cluster(doc))).summary["slo_attainment"]
    doc["spec"]["slo"]["e2eMs"] = 1.0  # no pipeline finishes in 1 ms
    tight = parse_cluster(doc)
    assert loose > 0.5 and simulate(tight, plan_for(tight)).summary["slo_attainment"] == 0.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s["pools"].pop(0),
            "spec.workload.pipeline.type: 'rag' retrieves documents; add a pool with role rag",
        ),
        (lambda s: s["pools"][1].update(replicas=2), "one kvstore pool with replicas: 1"),
        (lambda s: s["pools"][1]["kvstore"].update(tier="nvlink4"), "spec.pools[1].kvstore.tier: 'nvlink4'"),
        (
            lambda s: s["pools"][0]["rag"].update(device="gpu"),
            "spec.pools[0].rag.index.type: hnsw is modelled on cpu only",
        ),
        (
            lambda s: s["pools"].append({"name": "agg", "role": "aggregated", "blockSize": 32}),
            "a KV store keys blocks of one size",
        ),
        (lambda s: s["pools"][2].update(prefixCaching=False), "spec.pools[2].prefixCaching: false"),
    ],
)
def test_rag_and_kvstore_specs_that_cannot_work_are_refused_naming_the_field(edit, message):
    doc = rag_doc()
    edit(doc["spec"])
    problems = cross_field_problems(validate_document(InferenceCluster, doc, ""))
    assert any(message in p for p in problems), problems


def test_role_sections_belong_to_their_role():
    from emulator.errors import SpecError

    doc = rag_doc()
    doc["spec"]["pools"][2]["rag"] = {}
    with pytest.raises(SpecError, match=r"spec.pools\[2\].*rag: only a pool with role rag takes it"):
        parse_cluster(copy.deepcopy(doc))


@pytest.mark.slow
def test_a_rag_run_through_real_processes_reports_every_stage(tmp_path):
    import json

    from conftest import run_infemu

    r = run_infemu(
        "run", example("rag.yaml"), "--requests", "12", "--rate", "6", "--out", "rep", "--json", "--shaping", "inproc",
        cwd=str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["completed"] == 12 and set(summary["pipeline"]["stages_ms"]) >= {"retrieval", "prefill", "decode"}
    records = [json.loads(line) for line in (tmp_path / "rep" / "requests.jsonl").read_text().splitlines()]
    for rec in records:  # the router's stages tile each request: they add up to what the client measured
        assert rec["pipeline"] == "rag" and [s["stage"] for s in rec["stages"]] == ["retrieval", "generate"]
        assert sum(rec["breakdown_ms"].values()) == pytest.approx(rec["e2e_ms"], rel=0.05, abs=2.0)
    inst = json.loads((tmp_path / "rep" / "instances.json").read_text())
    assert inst["retriever-0"]["retrieval_queries"] == 12
    assert inst["store-0"]["lookup_blocks"] > 0
    assert "Pipeline stages" in (tmp_path / "rep" / "report.html").read_text()


@pytest.mark.slow
def test_locust_rag_users_retrieve_from_the_clusters_retriever(tmp_path):
    import csv
    import json

    from conftest import run_infemu

    r = run_infemu(
        "run", example("rag.yaml"), "--workload", "rag", "--concurrency", "2", "--duration", "6", "--out", "rep",
        "--json", "--shaping", "inproc",
        cwd=str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["failed"] == 0
    with open(tmp_path / "rep" / "locust_stats.csv", newline="") as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    assert int(rows["retrieve"]["Request Count"]) > 0 and int(rows["retrieve"]["Failure Count"]) == 0
    inst = json.loads((tmp_path / "rep" / "instances.json").read_text())
    assert inst["retriever-0"]["retrieval_queries"] == int(rows["retrieve"]["Request Count"])


def _pipeline_body(**over) -> dict:
    return {"model": "llama-3.1-8b", "pipeline": {"type": "rag"}, "question_tokens": 8, "max_tokens": 4, **over}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "llama-3.1-8b", "question_tokens": 8, "max_tokens": 4}, "pipeline"),
        (_pipeline_body(pipeline={"type": "search"}), "pipeline"),
        (_pipeline_body(pipeline={"type": "rag", "hops": 99}), "pipeline"),
        (_pipeline_body(question_tokens=0), "question_tokens"),
        (_pipeline_body(index=-1), "index"),
        (_pipeline_body(segments=[[1, 10**7]]), "segments"),
        (_pipeline_body(segments=[[1]]), "segments"),
    ],
)
async def test_bad_pipeline_requests_are_400s_naming_the_field_and_no_retriever_is_a_503(body, param):
    from emulator.router.proxy import RouterSettings, create_router_app

    app = create_router_app(RouterSettings("llama-3.1-8b", 8192, "least_loaded", ()))
    async with TestClient(TestServer(app)) as client:
        r = await client.post("/v1/pipelines", json=body)
        assert r.status == 400 and (await r.json())["error"]["param"] == param
        r = await client.post("/v1/retrieve", json={"query": "x"})
        assert r.status == 503 and (await r.json())["error"]["code"] == "no_backend"


def test_a_pipeline_mix_draws_each_requests_type_by_weight_the_same_way_every_time():
    doc = rag_doc()
    del doc["spec"]["workload"]["pipeline"]
    doc["spec"]["workload"].update(
        requests=400, pipelines=[{"type": "rag", "weight": 3}, {"type": "agentic", "turns": 2, "weight": 1}]
    )
    cluster = parse_cluster(doc)
    plan = plan_for(cluster)
    kinds = [p.pipeline.type for p in plan.requests]
    assert kinds == [p.pipeline.type for p in plan_for(parse_cluster(doc)).requests]  # seeded
    assert 0.68 < kinds.count("rag") / 400 < 0.82  # 3:1
    res = simulate(cluster, plan)
    by_type = res.summary["pipeline"]["by_type"]
    assert res.summary["pipeline"]["type"] == "mix" and by_type["rag"]["requests"] == kinds.count("rag")
    assert by_type["agentic"]["e2e_ms"]["mean"] > by_type["rag"]["e2e_ms"]["mean"]  # two turns and a tool call
    doc["spec"]["workload"]["pipeline"] = {"type": "rag"}
    with pytest.raises(SpecError, match=r"set pipeline \(every request\) or pipelines \(a mix\), not both"):
        parse_cluster(doc)
