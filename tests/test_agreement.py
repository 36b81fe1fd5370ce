"""Emulation against simulation: the same spec, plan and seed through real processes and through
the simulator agree on TTFT and TPOT (means within 5%, p90 within 10%), and the workers' engine steps
wake within 2 ms of the modelled time 99% of the time (a run's late steps tested against that rate).

The client is `infemu run`'s: its event loop, the due time it stamps on every request and the way
back it measures on its first tokens (``emulator.client.ClusterLink``), so the emulation's own HTTP
path is taken out of the model's time. Measured with it (2026-11-27, this 2-core host,
`benchmarks/emulation_fidelity.py` with each case's rate and requests): the quickstart (TTFT ~43 ms)
at D=1 +2.0% to +4.5% TTFT mean (too close to the 5% bound for a fresh CI machine), at D=2 and D=3
-0.7% to -1.0% (p90 +5.0% to +5.5%, TPOT within 0.1%), so it runs at D=3 (it ran at D=8 before the
client's stamps: D=4 read 4.5-5.6% high); the P/D example (TTFT ~150 ms, four processes and the
client on two cores) at D=2 +1.2% to +1.7%, at D=3 +0.7% (p90 0.0%), run at D=3 (was D=4). The RAG example
(retriever, KV store, P/D; each request a retrieval and a generation the router runs through itself) at
D=6, where it measured TTFT mean +2.0%, and each stage of the breakdown (API intake, KV fetch, prefill,
KV pull, decode, retrieval) within 0.5 ms of the simulator's; the AFD
example (TTFT ~30 ms, its engine's steps waiting on real exchanges with the FFN process) at D=6, where
two runs on this 2-core host measured TTFT mean +1.5%, p90 +1.3%, TPOT within 0.1%.
"""

from __future__ import annotations

import math

import pytest
import yaml
from conftest import example, metric_value, skip_if_workers_overloaded

from emulator import event_loop
from emulator.catalog.models import get_model
from emulator.client import ClusterLink, run_plan
from emulator.cluster.local import LocalCluster
from emulator.overrides import WorkloadOverrides, apply_overrides
from emulator.results import summarize
from emulator.sim.simulator import simulate
from emulator.spec import load_clusters
from emulator.workload.plan import build_plan

pytestmark = pytest.mark.slow


def _steps(url: str, le: str) -> tuple[float, float]:
    """(steps that woke within ``le`` seconds of the model, all steps) from a worker's histogram."""
    name = "infemu_iteration_timing_error_seconds"
    return metric_value(url, f"{name}_bucket", le=le), metric_value(url, f"{name}_count")


@pytest.mark.parametrize(
    "name, rate, requests, dilation, lengths, engine",
    [
        ("quickstart.yaml", 11.0, 100, 3.0, {}, {}),  # about half of the ~22 req/s saturation
        # async scheduling's admission lag (off in the profiles): the workers hold a newcomer back a step as
        # the simulator does
        pytest.param("quickstart.yaml", 11.0, 60, 3.0, {}, {"asyncScheduling": True}, id="quickstart-async"),
        ("pd-llama70b-h100.yaml", 7.0, 120, 3.0, {}, {}),  # about half of the prefill pools' saturation
        # attention-FFN disaggregation: the attention engine's process exchanges its activations with the FFN
        # instance's process every step; short answers keep the run (x6 in wall time) short
        ("moe-qwen3-30b-afd.yaml", 10.0, 40, 6.0, {"input_len": 512, "output_len": 48}, {}),
        # RAG pipelines: retriever, KV store, P/D; each request is a retrieval then a generation that the
        # router runs through itself (two more HTTP hops than a plain request)
        ("rag.yaml", 8.0, 32, 6.0, {"output_len": 32}, {}),
    ],
)
def test_emulation_agrees_with_simulation(tmp_path, name, rate, requests, dilation, lengths, engine):
    with open(example(name), encoding="utf-8") as fh:
        docs = list(yaml.safe_load_all(fh))
    docs[0]["spec"]["emulation"] = {"timeDilation": dilation}
    docs[0]["spec"].setdefault("engine", {}).update(engine)
    spec_path = tmp_path / name
    spec_path.write_text(yaml.safe_dump_all(docs))
    overrides = WorkloadOverrides(rate=rate, requests=requests, **lengths)
    cluster = apply_overrides(load_clusters(str(spec_path))[0], overrides)
    plan = build_plan(cluster.spec.workload)
    sim = simulate(cluster, plan).summary

    lc = LocalCluster(str(spec_path), cluster.name, run_dir=str(tmp_path / "run"))
    state = lc.start()
    try:
        records, _ = event_loop.run(  # as `infemu run` drives it: its loop, its stamps and its way back
            run_plan(
                state.router,
                cluster.spec.model.name,
                plan,
                get_model(cluster.spec.model.name).vocab,
                dilation=dilation,
                link=ClusterLink(state.token),
            )
        )
        steps = [_steps(p.url, "0.002") for p in state.engines()]
        skip_if_workers_overloaded([p.url for p in state.engines()])
    finally:
        lc.stop()
    emu = summarize(records, cluster.spec.slo.ttft_ms, cluster.spec.slo.tpot_ms)
    assert emu["failed"] == 0
    keys = ("ttft_ms", "tpot_ms", "e2e_ms") if cluster.spec.workload.pipeline_mix else ("ttft_ms", "tpot_ms")
    if cluster.spec.workload.pipeline_mix:  # pipelines: the router's per-stage account matches the simulator's
        sim_parts = {k: v["mean"] for k, v in sim["pipeline"]["stages_ms"].items()}
        emu_parts = {k: v["mean"] for k, v in emu["pipeline"]["stages_ms"].items()}
        for part, ms in sim_parts.items():  # each part within 10% or 1.5 ms
            assert emu_parts.get(part, 0.0) == pytest.approx(ms, rel=0.10, abs=1.5), (part, emu_parts, sim_parts)
    for key in keys:
        assert emu[key]["mean"] == pytest.approx(sim[key]["mean"], rel=0.05), (key, emu[key], sim[key])
        assert emu[key]["p90"] == pytest.approx(sim[key]["p90"], rel=0.10), (key, emu[key], sim[key])
    # 99% of all the cluster's engine steps wake within 2 ms of the modelled time. Pooled over the
    # workers: a P/D prefill worker sees only ~200 steps, so its own p99 is its second-worst wake-up
    # (1.3-3.3 ms measured on a fresh 2-core CI machine) and too noisy to gate on. Measured here:
    # 99.85% (quickstart, 1349 steps) and 99.6% (P/D, 2180 steps, 118 of them on prefill). A run is a
    # sample: the gate fails when its late steps are more than a 1% late rate gives in 99 runs of 100
    # (the RAG run has ~475 steps, where five late ones read 98.9%: one fresh-clone run of 2026-11-27).
    within, total = (sum(x) for x in zip(*steps, strict=True))
    assert total > 0 and total - within <= _late_allowance(int(total)), steps


def _late_allowance(n: int, rate: float = 0.01, q: float = 0.99) -> int:
    """The most late steps of ``n`` that a true late ``rate`` stays at or under with probability ``q``
    (the binomial quantile)."""
    cdf, k = 0.0, 0
    while True:
        cdf += math.comb(n, k) * rate**k * (1 - rate) ** (n - k)
        if cdf >= q:
            return k
        k += 1
